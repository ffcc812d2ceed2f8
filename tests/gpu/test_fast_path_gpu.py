"""The fast decode step on a CUDA GPU: graphs replay the compiled step exactly, the handler serves them, the
cudagraph-trees alternative keeps its graphs, float16 graphs pass the step-by-step self-check (end-to-end
agreement printed, not gated), the fallback gives its memory back, and TorchServe's TF32 is undone.

Every test needs a CUDA GPU; without one they are skipped. The pool is the one of
tests/memory/test_gpu_memory.py (4 slots of 128 positions, top-k 8), so that Inductor's on-disk cache
serves one compile to both files.
"""

from __future__ import annotations

import json
import random
from dataclasses import fields

import pytest
import torch

from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.engine.compiled import FastStep, fast_shapes
from handler.engine.fast_path import enable_fast_path
from handler.engine.model import load_gpt2

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
pytestmark = needs_gpu

SHAPE = PoolShape(max_slots=4, max_len=128, max_top_k=8)  # tests/memory/test_gpu_memory.py's worker pool
MODES = [GenerationParams(max_new_tokens=40), GenerationParams(decoding="greedy", max_new_tokens=36),
         GenerationParams(decoding="sample", do_sample=True, top_k=50, top_p=0.9, max_new_tokens=32),
         GenerationParams(do_sample=True, temperature=0.7, max_new_tokens=30),
         GenerationParams(top_k=8, penalty_alpha=0.3, max_new_tokens=38)]


@pytest.fixture(scope="module")
def fp16_model(tiny_model_dir):
    return load_gpt2(tiny_model_dir, torch.device("cuda", 0), torch.float16)[1]


def requests(model, n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [Request(f"r{i}", [rng.randrange(1, model.vocab_size) for _ in range(rng.randint(2, 40))],
                    MODES[i % len(MODES)], (), seed=rng.randrange(2**32)) for i in range(n)]


def pool_tensors(pool) -> dict[str, torch.Tensor]:
    out = {n: getattr(pool, n) for n in ("kv", "hidden", "valid", "tokens", "logits")}
    for group in ("state", "params"):
        g = getattr(pool, group)
        out.update({f"{group}.{f.name}": getattr(g, f.name) for f in fields(g)})
    return out


@pytest.fixture(scope="module")
def graphs(fp16_model):
    engine = Engine(fp16_model, SHAPE, sync_every=4)
    fast = FastStep(fp16_model, engine.pool, fast_shapes(SHAPE), graphs="manual")
    prep = fast.prepare()
    return engine, fast, prep


def test_every_shape_is_captured_and_its_memory_counted(graphs):
    _, fast, prep = graphs
    assert prep.graphs == "manual" and prep.shapes and not prep.skipped_shapes
    assert set(fast.ready) == set(prep.shapes)
    assert prep.graph_pool_reserved > 0
    print(f"\ncompile {prep.compile_s:.1f} s, capture {prep.capture_s:.2f} s for {prep.shapes}; graphs' pool "
          f"{prep.graph_pool_reserved / 2**20:.1f} MiB reserved")


def test_a_replay_is_the_compiled_step(graphs, capsys):
    """From the same pool state, one step through the compiled function and one graph replay leave the same pool:
    the graph reads the pool where it lives now (fixed addresses), nothing stale, nothing missed. Tokens and
    every integer or flag exactly; floats within float16 rounding (the same kernels, but cuBLAS may pick its
    workspace per stream, and capture ran on a side stream), and whether they are bitwise equal is printed."""
    engine, fast, prep = graphs
    for r in requests(engine.model, SHAPE.max_slots, seed=1):
        engine.submit(r)
    engine._admit({})  # prefilled, not yet decoded: every slot live
    for shape in prep.shapes:
        before = {k: v.clone() for k, v in pool_tensors(engine.pool).items()}
        with torch.inference_mode():
            fast._direct(shape)()
        torch.cuda.synchronize()
        direct = {k: v.clone() for k, v in pool_tensors(engine.pool).items()}
        for k, v in pool_tensors(engine.pool).items():
            v.copy_(before[k])
        fast.step(*shape)
        torch.cuda.synchronize()
        replayed = pool_tensors(engine.pool)
        assert any(not torch.equal(direct[k], before[k]) for k in direct), shape  # the step did something
        bitwise = []
        for k in direct:
            if direct[k].is_floating_point():
                diff = (direct[k].float() - replayed[k].float()).abs().max().item()
                assert diff <= 1e-2, (shape, k, diff)
                bitwise.append(diff == 0)
            else:
                assert torch.equal(direct[k], replayed[k]), (shape, k)
        with capsys.disabled():
            print(f"\nshape {shape}: replay == compiled step bit for bit: {all(bitwise)}")
        for k, v in pool_tensors(engine.pool).items():
            v.copy_(before[k])
    for gen in list(engine.running.values()):
        engine.cancel(gen.request_id)


def test_float16_graphs_and_eager_agree(fp16_model, capsys):
    """The fast path's tokens against eager's at the same shapes (float16: the compiler's arithmetic differs
    from eager kernels; each divergence is printed). The tiny model's distributions have clear tops."""
    reqs = requests(fp16_model, 9, seed=4)
    eager = Engine(fp16_model, SHAPE, sync_every=4)
    eager.set_step(None, fast_shapes(SHAPE))
    reference = [g.tokens for g in eager.run_to_completion(reqs)]
    engine = Engine(fp16_model, SHAPE, sync_every=4)
    report = enable_fast_path(engine, "auto")
    assert report.path == "cuda-graphs", report.as_dict()
    out = [g.tokens for g in engine.run_to_completion(reqs)]
    total = sum(len(t) for t in reference)
    same = sum(a == b for r, o in zip(reference, out) for a, b in zip(r, o))
    with capsys.disabled():
        print(f"\nfloat16 eager vs CUDA graphs end to end (not gated): {same}/{total} tokens agree "
              f"({same / total:.3f}); step-by-step self-check {report.step_check}")
    check = report.step_check
    assert check["passed"] and check["failures"] == 0 and check["compared"] > 0
    assert max(check["worst"].values()) <= check["tolerance"]


def test_the_handler_serves_cuda_graphs_and_reports_them(tiny_model_dir):
    from gpt2ops.local_server import model_config
    from handler.gpt2_handler import ContrastiveGPT2Handler
    from tests.ts_context import Frontend, make_context

    config = model_config(batchSize=SHAPE.max_slots, limits={"max_prompt_tokens": 64, "max_new_tokens": 64,
                                                             "max_top_k": SHAPE.max_top_k})
    context = make_context(tiny_model_dir, config, gpu=0)
    h = ContrastiveGPT2Handler()
    h.initialize(context)
    step = json.loads(h.describe_handle())["decode_step"]
    assert step["live"] == step["path"] == "cuda-graphs", step
    assert step["step_check"]["passed"] and step["graph_mib"] > 0 and step["capture_s"] > 0
    precision = json.loads(h.describe_handle())["precision"]
    assert precision["float32_matmul_precision"] == "highest" == torch.get_float32_matmul_precision()
    if torch.cuda.get_device_capability() >= (8, 0):  # TorchServe's import had turned TF32 on
        assert precision["found"] == "high" and precision["changed"] is True
    if h.memory_report.get("driver_figure"):
        assert "graphs" in h.memory_report["parts_mib"]
    codes, texts, _ = Frontend(h, context).serve([{"prompt": "你好", "max_new_tokens": 20},
                                                  {"prompt": "hi", "decoding": "sample", "do_sample": True}])
    assert codes == [200, 200], texts
    assert h.engine.step_path == "cuda-graphs" and h.engine.step_error is None


def test_cudagraph_trees_keep_their_graphs_over_the_mutated_pool(fp16_model):
    """mode="reduce-overhead": the pool's views are marked static, so no graph is skipped for mutated inputs;
    and its tokens are the manual graphs' tokens."""
    from torch._dynamo.utils import counters

    reqs = requests(fp16_model, 6, seed=9)
    counters["inductor"].clear()
    trees = Engine(fp16_model, SHAPE, sync_every=4)
    report = enable_fast_path(trees, "auto", graphs="trees", max_shapes=1)
    assert report.path == "cuda-graph-trees", report.as_dict()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    # and no input is copied into a static buffer before each replay: the weights and the pool are used in place
    assert counters["inductor"]["cudagraph_recorded_non_static_inputs"] == 0, dict(counters["inductor"])
    manual = Engine(fp16_model, SHAPE, sync_every=4)
    assert enable_fast_path(manual, "auto", max_shapes=1).path == "cuda-graphs"
    assert [g.tokens for g in trees.run_to_completion(reqs)] == [g.tokens for g in manual.run_to_completion(reqs)]


@pytest.mark.parametrize("graphs", ["manual", "trees"])
def test_a_fast_step_that_will_not_serve_gives_its_memory_back(fp16_model, graphs):
    """release(): the graphs, their pool (the trees' manager's too) and the capture stream's cuBLAS workspace."""
    engine = Engine(fp16_model, SHAPE, sync_every=4)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    fast = FastStep(fp16_model, engine.pool, fast_shapes(SHAPE)[:1], graphs=graphs)
    prep = fast.prepare()
    assert prep.graph_pool_reserved > 0
    kept = fast.release()
    print(f"\n{graphs}: graphs' pool {prep.graph_pool_reserved / 2**20:.1f} MiB, kept after release "
          f"{kept / 2**20:.1f} MiB")
    assert kept <= 2 * 2**20  # at most the allocator's rounding
