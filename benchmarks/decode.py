#!/usr/bin/env python3
"""Decoding speed of the engine: ms per step and tokens/s per mode and batch size, with random weights.

    python -m benchmarks.decode                                  # 110M shape on the CPU: batch 1, 8, 32, eager
    python -m benchmarks.decode --compile --modes contrastive --batch 1   # + the compiled step beside it
    python -m benchmarks.decode --device cuda --shape 110m 3.5b --new-tokens 128   # eager, compiled, graphs
    python -m benchmarks.decode --device cuda --steps eager graphs trees --json out.json
    python -m benchmarks.decode --extras-cost --batch 8 32       # the step before/after issue 22, extras' cost

Each configuration: a 16-token prompt per row, `--new-tokens` new tokens, no early stop
(no end-of-text token), timed after a warm-up run. ms/step is the time of one decoding
step for the whole batch (prefill included, divided by the steps); tokens/s counts
generated tokens of all rows. `hf-greedy` is transformers' own `generate` (greedy, its
dynamic cache) on the same weights, for scale: transformers 5 has no contrastive search.

Decode steps, side by side in one run (`--steps`; the default is eager, compiled and graphs on CUDA, eager on
the CPU, where `--compile` adds the compiled step):

- eager     `decode_one_token` as the engine runs it without the fast path, in the smallest bucket per step;
- compiled  `torch.compile(fullgraph=True)` of the same step (handler.engine.compiled.FastStep, no graphs);
- graphs    the compiled step captured in a CUDA graph per shape, replayed (the handler's `compile: auto`);
- trees     the compiled step with mode="reduce-overhead" (cudagraph trees), the alternative to manual capture.

`--extras-cost` prints another table instead (`extras_cost`): ms per decode step of one pool, the step as it was
before logits processing and logprobs existed (handler/engine/step.py at BEFORE_REV, loaded from git) against
today's step with its `extras` flag off (what a batch that asks for none of it runs) and on (penalties, bias,
min_tokens and logprobs asked by every row), timed in interleaved blocks on the same pool so that drift and the
growing context fall on every variant alike; the median block is reported. The engine-level cost (host
transfers of the logprobs included) is in the main table's `+penalties` and `+logprobs` modes.

A fast step runs one shape here: the full pool with the largest candidate bucket and the sampler on (what
the handler's fast shapes are), so the sampler's sort over the vocabulary is in its time even when no row
samples. "compile s" is compiling (and capturing) that shape. "agree" is the share of generated tokens
equal to the eager step's on the same prompts and seeds: 1.0 in float32; in float16 rounding differs
between compiled and eager kernels, and one different token changes the rest of its row.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch


from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.engine.model import CompactGPT2
from handler.memory.plan import REFERENCE_SHAPES, config_kwargs

STEPS = {"eager": None, "compiled": "none", "graphs": "manual", "trees": "trees"}  # -> FastStep's graphs

SHAPES = {name: config_kwargs(shape) for name, shape in REFERENCE_SHAPES.items()}  # GPT2Config kwargs
MODES = {
    "contrastive": GenerationParams(penalty_alpha=0.6, top_k=4),
    "contrastive-sampling": GenerationParams(penalty_alpha=0.6, top_k=4, do_sample=True, temperature=0.7),
    "greedy": GenerationParams(decoding="greedy"),
    "sample": GenerationParams(decoding="sample", top_k=50, top_p=0.95, do_sample=True),
    "contrastive+penalties": GenerationParams(penalty_alpha=0.6, top_k=4, repetition_penalty=1.2,
                                              presence_penalty=0.5, frequency_penalty=0.5, logit_bias=((5, 2.0),)),
    "contrastive+logprobs": GenerationParams(penalty_alpha=0.6, top_k=4, logprobs=5),
}
BEFORE_REV = "d3270e2"  # main before issue 22: its handler/engine/step.py is the "before" step of --extras-cost


def build(shape: str, device: torch.device, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    with torch.device(device):
        hf = GPT2LMHeadModel(GPT2Config(**SHAPES[shape])).to(dtype).eval()
    hf.requires_grad_(False)
    return hf, CompactGPT2(hf)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_engine(model, mode: str, batch: int, prompt_len: int, new: int, device, step: str = "eager") -> dict:
    """`batch` requests of `mode` submitted together to a pool of `batch` slots (prefill included), decoded with
    the `step` kind; returns seconds, the tokens, and the fast step's compile (and capture) seconds."""
    params = GenerationParams(**{**MODES[mode].__dict__, "max_new_tokens": new})
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(1, model.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    engine = Engine(model, PoolShape(batch, prompt_len + new, params.num_candidates), sync_every=16)
    compile_s = None
    if step != "eager":
        from handler.engine.compiled import FastStep

        shapes = [(batch, engine.shape.candidates, True)]
        fast = FastStep(model, engine.pool, shapes, graphs=STEPS[step])
        prep = fast.prepare()
        compile_s = prep.compile_s + prep.capture_s
        engine.set_step(fast, shapes, fast.path)

    def run(tag: str) -> list:
        return engine.run_to_completion([Request(f"{tag}{i}", p, params, (), seed=i) for i, p in enumerate(prompts)])

    run("warm-up")
    sync(device)
    start = time.perf_counter()
    results = run("timed")
    sync(device)
    seconds = time.perf_counter() - start
    assert all(r.error is None and len(r.tokens) == new for r in results), [r.error for r in results]
    assert engine.step_path == ("eager" if step == "eager" else engine.step_path) and engine.step_error is None
    return {"seconds": seconds, "tokens": [r.tokens for r in results], "compile_s": compile_s}


@torch.inference_mode()
def time_hf_greedy(hf, batch: int, prompt_len: int, new: int, device) -> float:
    ids = torch.randint(1, hf.config.vocab_size, (batch, prompt_len), device=device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    hf.generate(ids, **kw)
    sync(device)
    start = time.perf_counter()
    hf.generate(ids, **kw)
    sync(device)
    return time.perf_counter() - start


def base_parser(doc: str) -> argparse.ArgumentParser:
    """The options this benchmark shares with benchmarks/hf_contrastive.py."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", nargs="+", default=["110m"], choices=sorted(SHAPES))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 128 on GPU, 32 on CPU")
    return parser


def start_table(args, about: str) -> tuple[torch.device, torch.dtype, int]:
    """Print the table's header (machine, lengths); returns (device, dtype, new tokens)."""
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    new = args.new_tokens or (128 if device.type == "cuda" else 32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    print(f"# device: {device} ({name}); torch {torch.__version__}; {about}; dtype {str(dtype)[6:]}; "
          f"threads {torch.get_num_threads()}; cpus {os.cpu_count()}")
    print(f"# prompt {args.prompt_tokens} tokens, {new} new tokens per row")
    print("| shape | mode | batch | ms/step | tokens/s |")
    print("|---|---|---:|---:|---:|")
    return device, dtype, new


def agreement(reference: list[list[int]], tokens: list[list[int]]) -> float:
    total = sum(len(r) for r in reference)
    same = sum(a == b for ref, out in zip(reference, tokens) for a, b in zip(ref, out))
    return same / total if total else 1.0


def forget_compiled(device) -> None:
    """Drop what a fast step left behind (Dynamo's caches, graphs' memory) before the next configuration."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def step_before(rev: str = BEFORE_REV):
    """handler/engine/step.py as it was at `rev`, as a module (it runs on today's pool: the fields it knows)."""
    import subprocess
    import types

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = subprocess.run(["git", "show", f"{rev}:handler/engine/step.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType("step_before")
    exec(compile(source, f"step.py@{rev}", "exec"), module.__dict__)
    return module


def extras_cost(model, batch: int, prompt_len: int, steps: int, device, kind: str, block: int = 8) -> dict:
    """ms per step (median block) of: the step before issue 22, today's step with extras off, and on."""
    from handler.engine.pool import SlotPool
    from handler.engine.step import decode_one_token, prefill_slot

    before = step_before()
    variants = {"before": (before.decode_one_token, ()), "extras off": (decode_one_token, (False,)),
                "extras on": (decode_one_token, (True,))}
    warm = 2
    pool = SlotPool.allocate(model, PoolShape(batch, prompt_len + (steps + warm * block) * len(variants) + 1, 4))
    params = GenerationParams(penalty_alpha=0.6, top_k=4, max_new_tokens=pool.shape.max_len - prompt_len,
                              repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5,
                              logit_bias=((5, 2.0),), min_tokens=1, logprobs=5)
    g = torch.Generator().manual_seed(batch)
    view = pool.view(batch)
    K = pool.shape.candidates
    calls = {}
    for name, (fn, extra) in variants.items():
        if kind == "compiled":
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        calls[name] = (lambda fn=fn, extra=extra: fn(model, view, K, False, *extra))
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for slot in range(batch):
            prompt = torch.randint(1, model.vocab_size, (prompt_len,), generator=g).tolist()
            prefill_slot(model, pool, slot, prompt, params, (), seed=slot)
        order = list(variants)
        for n in range(steps // block + warm):
            order = order[1:] + order[:1]  # each variant first in turn
            for name in order:
                sync(device)
                start = time.perf_counter()
                for _ in range(block):
                    calls[name]()
                sync(device)
                if n >= warm:
                    times[name].append(1000 * (time.perf_counter() - start) / block)
        assert not pool.state.finished[:batch].any()
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main_extras_cost(args) -> int:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    steps = args.new_tokens or 64
    kinds = [s for s in (args.steps or ["eager"]) if s in ("eager", "compiled")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    print(f"# device: {device} ({name}); torch {torch.__version__}; dtype {str(dtype)[6:]}; "
          f"threads {torch.get_num_threads()}; cpus {os.cpu_count()}")
    print(f"# contrastive k=4, prompt {args.prompt_tokens} tokens, {steps} steps per variant in interleaved blocks "
          f"of 8 (median block); before: handler/engine/step.py at {BEFORE_REV}")
    print("| shape | step | batch | before ms/step | extras off ms/step | off / before | extras on ms/step "
          "| on / before |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shape:
        _, model = build(shape, device, dtype)
        for kind in kinds:
            for batch in args.batch:
                t = extras_cost(model, batch, args.prompt_tokens, steps, device, kind)
                print(f"| {shape} | {kind} | {batch} | {t['before']:.2f} | {t['extras off']:.2f} | "
                      f"{t['extras off'] / t['before']:.3f} | {t['extras on']:.2f} | "
                      f"{t['extras on'] / t['before']:.3f} |", flush=True)
                forget_compiled(device)
    return 0


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--modes", nargs="+", default=list(MODES) + ["hf-greedy"])
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=None,
                        help="decode steps side by side (default: eager compiled graphs on CUDA, eager on the CPU)")
    parser.add_argument("--compile", action="store_true", help="add the compiled step (the CPU's way to compare)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                        help="default: float16 on CUDA, float32 on the CPU")
    parser.add_argument("--json", default=None, help="also write every row to this file")
    parser.add_argument("--extras-cost", action="store_true",
                        help="the step before/after issue 22 and the extras' cost (module docstring)")
    args = parser.parse_args(argv)
    if args.extras_cost:
        return main_extras_cost(args)
    device = torch.device(args.device)
    steps = args.steps or (["eager", "compiled", "graphs"] if device.type == "cuda" else ["eager"])
    if args.compile and "compiled" not in steps:
        steps.append("compiled")
    if device.type != "cuda" and set(steps) & {"graphs", "trees"}:
        parser.error("CUDA graphs (graphs, trees) need --device cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    new = args.new_tokens or (128 if device.type == "cuda" else 32)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "CPU")
    print(f"# device: {device} ({name}); torch {torch.__version__}; dtype {str(dtype)[6:]}; "
          f"threads {torch.get_num_threads()}; cpus {os.cpu_count()}")
    print(f"# prompt {args.prompt_tokens} tokens, {new} new tokens per row; decode steps: {', '.join(steps)}")
    head = "| shape | mode | batch |" + "".join(f" {s} ms/step | {s} tokens/s |" for s in steps)
    head += "".join(f" {s} compile s | {s} agree |" for s in steps if s != "eager")
    print(head)
    print("|---|---|---:|" + "---:|" * (head.count("|") - 4))
    rows = []
    for shape in args.shape:
        hf, model = build(shape, device, dtype)
        for mode in args.modes:
            for batch in args.batch:
                row = {"shape": shape, "mode": mode, "batch": batch, "new_tokens": new, "dtype": str(dtype)[6:],
                       "device": name, "steps": {}}
                if mode == "hf-greedy":
                    seconds = time_hf_greedy(hf, batch, args.prompt_tokens, new, device)
                    row["steps"]["eager"] = {"ms_per_step": 1000 * seconds / new, "tokens_per_s": batch * new / seconds}
                else:
                    reference = None
                    for step in steps:
                        out = time_engine(model, mode, batch, args.prompt_tokens, new, device, step)
                        reference = reference or out["tokens"]
                        row["steps"][step] = {"ms_per_step": 1000 * out["seconds"] / new,
                                              "tokens_per_s": batch * new / out["seconds"],
                                              "compile_s": out["compile_s"],
                                              "agreement_with_first": agreement(reference, out["tokens"])}
                        if step != "eager":
                            forget_compiled(device)
                rows.append(row)
                print(format_row(row, steps), flush=True)
        del hf, model
        forget_compiled(device)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": name, "torch": torch.__version__, "steps": steps, "rows": rows}, f, indent=2)
    return 0


def format_row(row: dict, steps: list[str]) -> str:
    cells = [row["shape"], row["mode"], str(row["batch"])]
    for s in steps:
        r = row["steps"].get(s)
        cells += [f"{r['ms_per_step']:.2f}", f"{r['tokens_per_s']:,.0f}"] if r else ["-", "-"]
    for s in steps:
        if s == "eager":
            continue
        r = row["steps"].get(s)
        cells += [f"{r['compile_s']:.1f}", f"{r['agreement_with_first']:.3f}"] if r else ["-", "-"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(main())
