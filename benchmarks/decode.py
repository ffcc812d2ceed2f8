#!/usr/bin/env python3
"""Decoding speed of the engine: ms per step and tokens/s per mode and batch size, with random weights.

    python benchmarks/decode.py                       # 110M shape on the CPU: batch 1, 8, 32
    python benchmarks/decode.py --device cuda --shape 110m 3.5b --new-tokens 128

Each configuration: a 16-token prompt per row, `--new-tokens` new tokens, no early stop
(no end-of-text token), timed after a warm-up run. ms/step is the time of one decoding
step for the whole batch (prefill included, divided by the steps); tokens/s counts
generated tokens of all rows. `hf-greedy` is transformers' own `generate` (greedy, its
dynamic cache) on the same weights, for scale: transformers 5 has no contrastive search.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch


from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.engine.model import CompactGPT2

SHAPES = {
    "110m": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "3.5b": dict(n_layer=30, n_embd=3072, n_head=32, vocab_size=50304, n_positions=1024),
}
MODES = {
    "contrastive": GenerationParams(penalty_alpha=0.6, top_k=4),
    "contrastive-sampling": GenerationParams(penalty_alpha=0.6, top_k=4, do_sample=True, temperature=0.7),
    "greedy": GenerationParams(decoding="greedy"),
    "sample": GenerationParams(decoding="sample", top_k=50, top_p=0.95, do_sample=True),
}


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


def time_engine(model, mode: str, batch: int, prompt_len: int, new: int, device) -> float:
    """Seconds for `batch` requests of `mode` submitted together to a pool of `batch` slots (prefill included)."""
    params = GenerationParams(**{**MODES[mode].__dict__, "max_new_tokens": new})
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(1, model.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    engine = Engine(model, PoolShape(batch, prompt_len + new, params.num_candidates), sync_every=16)

    def run(tag: str) -> list:
        return engine.generate([Request(f"{tag}{i}", p, params, (), seed=i) for i, p in enumerate(prompts)])

    run("warm-up")
    sync(device)
    start = time.perf_counter()
    results = run("timed")
    sync(device)
    assert all(len(r.tokens) == new for r in results)
    return time.perf_counter() - start


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


def main(argv=None) -> int:
    parser = base_parser(__doc__)
    parser.add_argument("--modes", nargs="+", default=list(MODES) + ["hf-greedy"])
    args = parser.parse_args(argv)
    device, dtype, new = start_table(args, "engine path: eager (no CUDA graphs)")
    for shape in args.shape:
        hf, model = build(shape, device, dtype)
        for mode in args.modes:
            for batch in args.batch:
                if mode == "hf-greedy":
                    seconds = time_hf_greedy(hf, batch, args.prompt_tokens, new, device)
                else:
                    seconds = time_engine(model, mode, batch, args.prompt_tokens, new, device)
                print(f"| {shape} | {mode} | {batch} | {1000 * seconds / new:.1f} | {batch * new / seconds:,.0f} |",
                      flush=True)
        del hf, model
    return 0


if __name__ == "__main__":
    sys.exit(main())
