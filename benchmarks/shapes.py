#!/usr/bin/env python3
"""What fixed step shapes cost: one request alone, and a full pool, with `decode_shapes: buckets` and `fixed`.

    .venv/bin/python -m benchmarks.shapes                      # tiny model shape, 8 slots, CPU
    .venv/bin/python -m benchmarks.shapes --shape 110m --slots 8 --device cuda

`buckets` (the default) runs each step in the smallest (slots, candidates) bucket holding the live slots;
`fixed` runs every step at the full pool with the largest candidate bucket and the sampler, whatever is
live: one shape, so the same bits on any device, at the cost of computing idle slots. Both give the same
tokens (checked here); the table gives ms per step for a lone request of each mode and for a full pool
of contrastive requests, engine only (no TorchServe), random weights.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.memory.plan import REFERENCE_SHAPES, config_kwargs

SHAPES = {**{name: config_kwargs(shape) for name, shape in REFERENCE_SHAPES.items()},
          "tiny": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=2048, n_positions=512, bos_token_id=0,
                       eos_token_id=0)}
MODES = {
    "greedy": GenerationParams(decoding="greedy"),
    "contrastive k4": GenerationParams(top_k=4),
    "sample": GenerationParams(decoding="sample", do_sample=True, top_k=50),
}


def build(shape: str, device: torch.device):
    from transformers import GPT2Config, GPT2LMHeadModel

    from handler.engine.model import CompactGPT2

    torch.manual_seed(0)
    with torch.device(device):
        hf = GPT2LMHeadModel(GPT2Config(**SHAPES[shape])).eval()
    hf.requires_grad_(False)
    return CompactGPT2(hf)


def timed(engine: Engine, requests: list[Request], repeats: int = 3) -> tuple[float, list[list[int]]]:
    """ms per step for these requests run together (the fastest of `repeats` runs), and their tokens."""
    engine.run_to_completion([Request(f"warm-{r.request_id}", r.prompt_ids, r.params, seed=r.seed) for r in requests])
    best = float("inf")
    for _ in range(repeats):
        steps = engine.stats().steps
        start = time.perf_counter()
        gens = engine.run_to_completion(requests)
        if engine.pool.kv.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, 1000 * (time.perf_counter() - start) / (engine.stats().steps - steps))
    return best, [g.tokens for g in gens]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--max-top-k", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = build(args.shape, device)
    pool = PoolShape(args.slots, 16 + args.new_tokens, args.max_top_k)
    engines = {name: Engine(model, pool, sync_every=8, fixed_shapes=name == "fixed") for name in ("buckets", "fixed")}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, model.vocab_size, (16,), generator=g).tolist()
    cases = {f"alone, {mode}": [Request("0", prompt, GenerationParams(**{**p.__dict__, "max_new_tokens": args.new_tokens}), seed=1)]
             for mode, p in MODES.items()}
    cases[f"full pool ({args.slots}), contrastive k4"] = [
        Request(str(i), torch.randint(1, model.vocab_size, (16,), generator=g).tolist(),
                GenerationParams(top_k=4, max_new_tokens=args.new_tokens)) for i in range(args.slots)]
    print(f"# {platform.node()} ({os.cpu_count()} CPUs), device {device}, torch {torch.__version__}, shape "
          f"{args.shape}, pool {args.slots} slots x {pool.max_len} positions, max_top_k {args.max_top_k}, "
          f"{args.new_tokens} new tokens")
    print("| case | buckets ms/step | fixed ms/step | fixed / buckets | same tokens |")
    print("|---|---:|---:|---:|---|")
    for case, requests in cases.items():
        (b_ms, b_tokens), (f_ms, f_tokens) = (timed(engines[n], requests) for n in ("buckets", "fixed"))
        print(f"| {case} | {b_ms:.2f} | {f_ms:.2f} | {f_ms / b_ms:.2f} | {'yes' if b_tokens == f_tokens else 'NO'} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
