"""The fast decode step on the CPU: compiled whole (fullgraph, Inductor), same tokens as eager, and the fallbacks.

The compile is the expensive part of this file (about a minute cold on a 2-core CI machine, seconds with
Inductor's on-disk cache warm), so it happens once: `compiled` below builds the fast path of one small pool
through `enable_fast_path`, exactly as the handler does. On the CPU only the largest shape is compiled (no
compile budget there). CUDA graphs themselves need a GPU: tests/gpu/.

The fallback tests need no compile: they hand `enable_fast_path` a fast step that misbehaves on purpose.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch
from torch._dynamo.utils import counters

from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.engine.compiled import FastStep, fast_shapes
from handler.engine.fast_path import compare_tokens, enable_fast_path, self_check_requests
from handler.engine.step import decode_one_token
from tests.engine.conftest import EOS

# The pool of the compiled tests; tests/engine/test_fast_path_handler.py starts a handler with the same pool so
# that Inductor's cache serves its compile.
SHAPE = PoolShape(max_slots=2, max_len=64, max_top_k=8)

MODES = [
    GenerationParams(max_new_tokens=20),
    GenerationParams(max_new_tokens=14, top_k=7, penalty_alpha=0.3),
    GenerationParams(max_new_tokens=18, do_sample=True, temperature=0.7),
    GenerationParams(decoding="greedy", max_new_tokens=22),
    GenerationParams(decoding="sample", do_sample=True, max_new_tokens=16, top_k=50, top_p=0.9),
]


def mixed_requests(model, n: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [Request(f"r{i}", [rng.randrange(1, model.vocab_size) for _ in range(rng.randint(1, 30))],
                    MODES[i % len(MODES)], EOS, seed=rng.randrange(2**32)) for i in range(n)]


@pytest.fixture(scope="session")
def compiled(fp32_model):
    """(engine with the compiled step installed, its FastPathReport, graph breaks and graphs Dynamo counted)."""
    _, model = fp32_model
    counters.clear()
    engine = Engine(model, SHAPE, sync_every=3)
    report = enable_fast_path(engine, "on")
    return engine, report, dict(counters["graph_break"]), counters["stats"]["unique_graphs"]


def test_the_step_compiles_as_one_graph(compiled):
    engine, report, graph_breaks, graphs = compiled
    assert report.error is None, report.error
    assert report.path == engine.step_path == "compiled"
    assert report.graphs == "none"  # no CUDA graphs on the CPU
    assert report.shapes == [(2, 8, True, False)]  # the full pool, largest candidate bucket, sampler on, no extras
    assert report.skipped_shapes == [(1, 8, True, False), (2, 8, True, True)]  # the CPU compiles the first only
    assert graph_breaks == {}  # fullgraph=True would have raised; nothing was split either
    assert graphs == 1
    assert report.compile_s > 0 and report.capture_s == 0 and report.graph_pool_reserved == 0
    print(f"\ncompiled the tiny model's step (pool {SHAPE}) in {report.compile_s:.1f} s")


def test_the_self_check_compared_every_step_and_counted_every_token(compiled):
    engine, report, _, _ = compiled
    check, agreement = report.step_check, report.agreement
    assert check["passed"] is True and check["failures"] == 0 and check["compared"] > 0
    assert max(check["worst"].values()) <= check["tolerance"] == 1e-4  # float32
    assert agreement["requests"] == SHAPE.max_slots + 1 and agreement["agreement"] == 1.0
    expected = sum(r.params.max_new_tokens for r in self_check_requests(engine))
    assert agreement["tokens"] == expected  # no eos in the self-check: every request runs to its length


def test_compiled_tokens_are_eager_tokens_for_every_mode(compiled, fp32_model):
    """A mix of modes, more requests than slots (joins, departures), compiled vs eager at the same shapes."""
    engine, report, _, _ = compiled
    _, model = fp32_model
    requests = mixed_requests(model, 7, seed=11)
    fast = engine.run_to_completion(requests)
    assert engine.step_path == "compiled" and engine.step_error is None
    eager_engine = Engine(model, SHAPE, sync_every=3)
    eager_engine.set_step(None, report.shapes)
    eager = eager_engine.run_to_completion(requests)
    assert all(g.error is None for g in fast + eager)
    assert sum(len(g.tokens) for g in fast) > 50
    assert [g.tokens for g in fast] == [g.tokens for g in eager]


def test_fast_path_costs_no_compile_after_start(compiled, fp32_model):
    engine, _, _, _ = compiled
    before = counters["stats"]["unique_graphs"]
    engine.run_to_completion(mixed_requests(fp32_model[1], 3, seed=5))
    assert counters["stats"]["unique_graphs"] == before


EXTRAS = [
    GenerationParams(max_new_tokens=18, repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.3,
                     logit_bias=((5, 2.0), (260, -4.0)), min_tokens=5, logprobs=5),
    GenerationParams(decoding="sample", do_sample=True, max_new_tokens=16, top_k=50, frequency_penalty=0.7,
                     logprobs=3, logprobs_source="processed"),
    GenerationParams(decoding="greedy", max_new_tokens=20, logprobs=20, repetition_penalty=1.3),
    GenerationParams(max_new_tokens=12),  # asks for nothing, beside those that do
]


def test_the_step_with_its_extras_compiles_as_one_graph_and_decodes_as_eager(fp32_model):
    """decode_shapes: fixed compiles the one full shape with the extras on (penalties, logprobs)."""
    _, model = fp32_model
    counters.clear()
    engine = Engine(model, SHAPE, sync_every=3, fixed_shapes=True)
    report = enable_fast_path(engine, "on")
    assert report.error is None and report.path == engine.step_path == "compiled", report.reason
    assert report.shapes == [(2, 8, True, True)] and dict(counters["graph_break"]) == {}
    assert report.step_check["passed"] and report.step_check["compared"] > 0
    assert report.step_check["worst"]["lp_token"] <= 1e-4 and report.agreement["agreement"] == 1.0
    rng = random.Random(4)
    requests = [Request(f"x{i}", [rng.randrange(1, model.vocab_size) for _ in range(rng.randint(1, 20))],
                        EXTRAS[i % len(EXTRAS)], EOS, seed=rng.randrange(2**32)) for i in range(6)]
    fast = engine.run_to_completion(requests)
    eager = Engine(model, SHAPE, sync_every=3, fixed_shapes=True).run_to_completion(requests)
    assert engine.step_path == "compiled" and all(g.error is None for g in fast + eager)
    assert [g.tokens for g in fast] == [g.tokens for g in eager]
    for f, e in zip(fast, eager):
        assert len(f.logprobs) == len(e.logprobs) == (len(e.tokens) if e.request.params.logprobs is not None else 0)
        for a, b in zip(f.logprobs, e.logprobs):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) <= 1e-4


# ---- the shapes ----


@pytest.mark.parametrize("slots,rows", [
    (1, [1]), (2, [2, 1]), (8, [8, 1, 2]), (32, [32, 1, 8, 2]), (128, [128, 1, 32, 8]), (5, [5, 1]),
])
def test_fast_shapes_full_pool_first_then_one_slot_then_quarters(slots, rows):
    shape = PoolShape(slots, 64, 16)
    shapes = fast_shapes(shape)
    assert [r for r, _, _, extras in shapes if not extras] == rows
    assert shapes[-1] == (slots, shape.candidates, True, True)  # last: the full pool with the extras, covers all
    assert all(k == shape.candidates and sampling for _, k, sampling, _ in shapes)
    assert len(fast_shapes(shape, max_shapes=2)) == min(2, len(rows)) + 1


def test_a_covering_set_of_shapes_gives_the_bucket_tokens(fp32_model):
    """Eager at the fast path's few shapes = eager at every bucket, bit for bit (the slot's tokens and context)."""
    _, model = fp32_model
    shape = PoolShape(4, 64, 16)
    requests = mixed_requests(model, 6, seed=3)
    buckets = Engine(model, shape, sync_every=2)
    few = Engine(model, shape, sync_every=2)
    few.set_step(None, fast_shapes(shape))
    assert few.step_shapes() == sorted(fast_shapes(shape)) and len(buckets.step_shapes()) > len(few.step_shapes())
    assert [g.tokens for g in few.run_to_completion(requests)] == [g.tokens for g in buckets.run_to_completion(requests)]


def test_a_shape_set_must_cover_the_full_pool(fp32_model):
    engine = Engine(fp32_model[1], PoolShape(4, 32, 8))
    with pytest.raises(ValueError, match="do not cover the full pool"):
        engine.set_step(None, [(4, 8, False, True), (1, 8, True, True)])


# ---- the fallbacks: a fast step that misbehaves never serves ----


class FakeFastStep:
    """Stands in for FastStep: runs the eager step, then misbehaves as told (no compile)."""

    path = "compiled"

    def __init__(self, model, pool, shapes, *, graphs="auto", budget_s=None, fault=None, fail_after=None):
        self.model, self.pool, self.shapes = model, pool, shapes
        self.fault, self.fail_after, self.calls = fault, fail_after, 0

    def prepare(self):
        if self.fault == "prepare":
            raise RuntimeError("injected: capture failed")
        from handler.engine.compiled import PrepareReport

        return PrepareReport("none", list(self.shapes), [], 0.01, 0.0, 0, 0)

    def __call__(self, rows, k, sampling, extras):
        self.calls += 1
        if self.fault == "raise" or (self.fail_after is not None and self.calls > self.fail_after):
            raise RuntimeError("injected: replay failed")
        view = self.pool.view(rows)
        decode_one_token(self.model, view, k, sampling, extras)
        if self.fault == "mismatch":  # one slot's newest token off by one, as a stale graph input would do
            st = view.state
            last = (st.generated[:1] - 1).clamp(min=0)
            view.tokens[:1].scatter_(1, last[:, None], (view.tokens[:1].gather(1, last[:, None]) + 1) % 50)


def fake(**kw):
    return lambda *a, **k: FakeFastStep(*a, **{**k, **kw})


@pytest.mark.parametrize("fault,words", [
    ("mismatch", "self-check: "),
    ("prepare", "injected: capture failed"),
    ("raise", "injected: replay failed"),
])
def test_a_failing_fast_step_leaves_the_engine_eager_and_says_why(fp32_model, caplog, fault, words):
    _, model = fp32_model
    engine = Engine(model, PoolShape(2, 48, 8), sync_every=2)
    with caplog.at_level(logging.WARNING, logger="handler.engine"):
        report = enable_fast_path(engine, "on", build=fake(fault=fault))
    assert report.path == engine.step_path == "eager"
    assert words in report.reason
    assert report.fast_step is None
    logged = [r for r in caplog.records if r.name == "handler.engine.fast_path" and r.levelno >= logging.WARNING]
    assert logged and ("serving eager" in logged[-1].getMessage() or "rejected" in logged[-1].getMessage())
    if fault == "mismatch":
        first = report.step_check["first_failure"]
        assert report.step_check["passed"] is False and report.step_check["failures"] > 0
        assert report.fallback == "self-check" and any(why.startswith("token ") for why in first["why"])
    # the engine serves, eager, every bucket again
    assert len(engine.step_shapes()) > 2 and engine.step_error is None
    requests = mixed_requests(model, 3, seed=8)
    reference = Engine(model, PoolShape(2, 48, 8)).run_to_completion(requests)
    assert [g.tokens for g in engine.run_to_completion(requests)] == [g.tokens for g in reference]


def test_a_fast_step_that_fails_while_serving_is_dropped_for_eager(fp32_model):
    _, model = fp32_model
    engine = Engine(model, PoolShape(2, 48, 8), sync_every=2)
    report = enable_fast_path(engine, "on", build=fake())
    assert report.path == engine.step_path == "compiled"
    report.fast_step.fail_after = report.fast_step.calls + 5  # it passed the self-check; now it breaks
    long = [Request(f"l{i}", [5 + i, 6, 7], GenerationParams(max_new_tokens=40), ()) for i in range(2)]
    failed = engine.run_to_completion(long)
    assert engine.step_path == "eager" and "injected: replay failed" in engine.step_error
    assert any(g.error is not None for g in failed)  # the step's live requests fail with it
    after = engine.run_to_completion([Request("after", [5, 6, 7], GenerationParams(max_new_tokens=10), ())])
    assert after[0].error is None and len(after[0].tokens) == 10


@pytest.mark.parametrize("setting,reason", [("off", "compile: off"), ("auto", "auto on the CPU serves eager")])
def test_settings_that_serve_eager_on_the_cpu_compile_nothing(fp32_model, setting, reason):
    engine = Engine(fp32_model[1], PoolShape(2, 32, 4))

    def must_not_build(*a, **k):
        raise AssertionError("built a fast step")

    report = enable_fast_path(engine, setting, build=must_not_build)
    assert report.path == "eager" and reason in report.reason and report.error is None


def test_an_unknown_setting_is_refused(fp32_model):
    with pytest.raises(ValueError, match="compile must be one of"):
        enable_fast_path(Engine(fp32_model[1], PoolShape(1, 16, 2)), "always")


def test_cuda_graphs_need_cuda(fp32_model):
    engine = Engine(fp32_model[1], PoolShape(1, 16, 2))
    with pytest.raises(ValueError, match="need a CUDA device"):
        FastStep(engine.model, engine.pool, [(1, 4, True)], graphs="manual")


def test_compare_tokens_counts_every_differing_position():
    reqs = [Request("a", [1], GenerationParams(decoding="greedy", max_new_tokens=4), ()),
            Request("b", [1], GenerationParams(decoding="greedy", max_new_tokens=4), ())]
    total, differing, first = compare_tokens(reqs, [[1, 2, 3, 4], [5, 6]], [[1, 2, 3, 4], [5, 7, 8]])
    assert (total, differing) == (6, 2)
    assert first == {"request": "b", "mode": "greedy", "do_sample": False, "position": 1, "eager": 6, "fast": 7}
    assert compare_tokens(reqs, [[1], [2]], [[1], [2]]) == (2, 0, None)
