#!/usr/bin/env python3
"""Predict a worker's GPU memory, part by part, and whether N workers fit on one GPU, before deploying.

    .venv/bin/python scripts/plan_memory.py --shape 110m --gpu h100
    .venv/bin/python scripts/plan_memory.py --shape 3.5b --gpu h100 --slots 8
    .venv/bin/python scripts/plan_memory.py artifacts/models/tiny-gpt2 --workers 4 --gpu-mib 16384 --json
    .venv/bin/python scripts/plan_memory.py --config config.json --measure-context   # context measured on this GPU
    .venv/bin/python scripts/plan_memory.py --shape 110m --gpu h100 --plot plan.png     # and draw it

The model is a saved model folder or a config.json, given as the first argument or with
--model-dir / --config, or a built-in shape (--shape).

The arithmetic is `handler.memory.plan.Plan`: CUDA context + weights + the
slot pool (KV cache, context hidden states and slot state: what the worker
allocates once at start) + activations of the largest prefill or step +
cuBLAS workspace + allocator slack, per worker; with `--decode-step graphs`
(the default: what `compile: auto` builds on a GPU) the step's activations are
the CUDA graphs' pool instead, beside the prefill's in the allocator's cache; every worker on a GPU pays all
of it again (its own context, its own copy of the weights, its own pool). The
defaults (8 slots of 512 positions, top-k 16) are the pool of the shipped
model-config.yaml: batchSize 8, max_top_k 16, max_prompt_tokens + max_new_tokens
= 256 + 256.
The CUDA context defaults to the H100 figure of `handler.memory.plan`
(lazy module loading); `--measure-context` measures it on this machine's GPU
with `scripts/measure_cuda_context.py`, `--context-mib` takes a figure you have.

Exit status: 0 when the workers fit on the card, 1 when they do not, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2ops import REPO
from gpt2ops.errors import report as report_error

from handler.memory.plan import (
    DEFAULT_CONTEXT_MIB,
    WORKSPACE_MIB_HOPPER,
    WORKSPACE_MIB_PRE_HOPPER,
    REFERENCE_SHAPES as SHAPES,
    ModelShape,
    Plan,
)

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
# card: (MiB as nvidia-smi reports the total, cuBLAS workspace MiB PyTorch keeps on that architecture)
GPUS = {
    "h100": ("NVIDIA H100 80GB HBM3", 81559, WORKSPACE_MIB_HOPPER),
    "h200": ("NVIDIA H200", 143771, WORKSPACE_MIB_HOPPER),
    "a10g": ("NVIDIA A10G", 23028, WORKSPACE_MIB_PRE_HOPPER),
    "t4": ("Tesla T4", 15360, WORKSPACE_MIB_PRE_HOPPER),
}
# config.json names other than GPT-2's own that mean the same (transformers' GPT2Config.attribute_map)
ALIASES = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
           "n_positions": "max_position_embeddings"}


class UsageError(Exception):
    """A bad option or input file: exit status 2."""


def shape_from_config_file(path: Path) -> ModelShape:
    """A GPT-2 config.json -> ModelShape."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    if config.get("model_type", "gpt2") != "gpt2":
        raise UsageError(f"{path} describes a {config['model_type']!r} model; this plan is for GPT-2")
    for name, alias in ALIASES.items():
        if config.get(name) is None and config.get(alias) is not None:
            config[name] = config[alias]
    missing = [k for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions") if config.get(k) is None]
    if missing:
        raise UsageError(f"{path} lacks {', '.join(missing)}")
    return ModelShape.from_config(config)


def resolve_shape(args) -> tuple[ModelShape, str]:
    if args.shape:
        return SHAPES[args.shape], f"built-in shape {args.shape}"
    if args.model is not None:  # positional: a folder or a config.json
        if args.model.is_dir():
            path = args.model / "config.json"
        elif args.model.is_file():
            path = args.model
        else:
            raise UsageError(f"no model folder or config.json at {args.model}")
    else:
        path = args.config if args.config else args.model_dir / "config.json"
    return shape_from_config_file(path), str(path)


def resolve_gpu(args) -> tuple[str, float, float]:
    """(name, MiB, cuBLAS workspace MiB) of the card."""
    name, mib, workspace = GPUS[args.gpu]
    if args.gpu_mib is not None:
        name, mib = f"{args.gpu_mib:g} MiB card", args.gpu_mib
    if args.workspace_mib is not None:
        workspace = args.workspace_mib
    return name, mib, workspace


def resolve_context(args) -> tuple[float, str]:
    if args.measure_context:
        import torch

        from gpt2ops.measure_cuda_context import context_mib

        if not torch.cuda.is_available():
            raise UsageError("--measure-context: no CUDA device on this machine; give --context-mib instead")
        try:
            return context_mib(args.device), f"measured on cuda:{args.device}"
        except RuntimeError as err:
            raise UsageError(f"--measure-context: {err}") from None
    if args.context_mib is not None:
        return args.context_mib, "given"
    return DEFAULT_CONTEXT_MIB, "default: H100, lazy module loading"


def plan_report(args) -> dict:
    shape, source = resolve_shape(args)
    if args.max_len > shape.n_positions:
        raise UsageError(f"--max-len {args.max_len} exceeds the model's {shape.n_positions} positions")
    gpu_name, gpu_mib, workspace = resolve_gpu(args)
    context, context_source = resolve_context(args)
    plan = Plan(shape, DTYPE_BYTES[args.dtype], args.workers, args.slots, args.top_k, args.max_len, context,
                workspace, graphs=args.decode_step == "graphs")
    per_worker = plan.per_worker()
    per_gpu = plan.per_gpu_mib()
    headroom = round(gpu_mib - per_gpu, 1)
    prompt = max(1, args.max_len // 2)
    return {
        "source": source,
        "shape": {k: getattr(shape, k) for k in shape.__dataclass_fields__},
        "parameters": shape.parameter_count(),
        "dtype": args.dtype,
        "slots": args.slots,
        "top_k": args.top_k,
        "max_len": args.max_len,
        "prompt_tokens": prompt,
        "new_tokens": args.max_len - prompt,
        "context_source": context_source,
        "decode_step": args.decode_step,
        "per_worker_mib": per_worker,
        "workers_per_gpu": args.workers,
        "per_gpu_mib": per_gpu,
        "gpu": gpu_name,
        "gpu_mib": gpu_mib,
        "fits": headroom >= 0,
        "headroom_mib": headroom,
        "max_workers_that_fit": int(gpu_mib // per_worker["total"]),
    }


def format_report(r: dict) -> str:
    s = r["shape"]
    lines = [
        f"model: {r['source']}: n_layer {s['n_layer']}, n_embd {s['n_embd']}, n_head {s['n_head']}, "
        f"vocab {s['vocab_size']}, n_positions {s['n_positions']} ({r['parameters'] / 1e6:,.1f} M parameters)",
        f"slot pool: {r['dtype']}, {r['slots']} slots of {r['max_len']} positions, top-k {r['top_k']} "
        f"(activations for a {r['prompt_tokens']}-token prompt); CUDA context {r['context_source']}; "
        f"decode step: {r['decode_step']}",
        "",
        f"{'part':<26}{'MiB per worker':>16}",
    ]
    for part, mib in r["per_worker_mib"].items():
        if part == "total":
            lines.append("-" * 42)
        lines.append(f"{part:<26}{mib:>16,.1f}")
    lines += [
        "",
        f"{r['workers_per_gpu']} worker(s) per GPU: {r['per_gpu_mib']:,.1f} MiB of {r['gpu_mib']:,.0f} MiB "
        f"({r['gpu']})",
        (f"FITS: headroom {r['headroom_mib']:,.1f} MiB ({100 * r['headroom_mib'] / r['gpu_mib']:.1f}% of the card)"
         if r["fits"] else f"DOES NOT FIT: {-r['headroom_mib']:,.1f} MiB short")
        + f"; at most {r['max_workers_that_fit']} such worker(s) fit on this card",
    ]
    return "\n".join(lines)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("model", nargs="?", type=Path, help="a saved model folder (or its config.json)")
    model.add_argument("--model-dir", type=Path, help="a saved model folder (reads its config.json)")
    model.add_argument("--config", type=Path, help="a GPT-2 config.json")
    model.add_argument("--shape", choices=sorted(SHAPES), help="a built-in shape: Wenzhong-GPT2-110M or the 3.5B")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float16")
    parser.add_argument("--workers", type=positive_int, default=1, help="workers per GPU (default 1)")
    parser.add_argument("--slots", "--batch", dest="slots", type=positive_int, default=8,
                        help="requests decoded at once: the pool's slots (default 8: batchSize)")
    parser.add_argument("--top-k", type=positive_int, default=16, help="contrastive candidates (default 16: max_top_k)")
    parser.add_argument("--max-len", type=positive_int, default=512, help="prompt + new tokens (default 512)")
    parser.add_argument("--decode-step", choices=("graphs", "eager"), default="graphs",
                        help="graphs: the step replays CUDA graphs (compile: auto on a GPU, the default); "
                             "eager: compile: off, or a worker whose fast step fell back")
    context = parser.add_mutually_exclusive_group()
    context.add_argument("--context-mib", type=positive_float,
                         help=f"CUDA context per worker (default {DEFAULT_CONTEXT_MIB:g}: H100, lazy loading)")
    context.add_argument("--measure-context", action="store_true",
                         help="measure the CUDA context on this machine's GPU (scripts/measure_cuda_context.py)")
    parser.add_argument("--device", type=int, default=0, help="--measure-context: CUDA device index (default 0)")
    card = parser.add_argument_group("card")
    card.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="card preset (default h100)")
    card.add_argument("--gpu-mib", type=positive_float, help="card memory in MiB as nvidia-smi shows it (overrides --gpu)")
    card.add_argument("--workspace-mib", type=non_negative_float,
                      help="cuBLAS workspace per worker (default from --gpu: 32 on Hopper, 8.125 before)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="also draw the plan (one worker's parts, and the card) to FILE (.png, .svg or .pdf)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = plan_report(args)
    except UsageError as err:
        report_error(err)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.plot is not None:
        from gpt2ops.plots import memory_plan_figure, save

        save(memory_plan_figure(report), args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0 if report["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
