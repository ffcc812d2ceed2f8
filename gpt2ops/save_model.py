#!/usr/bin/env python3
"""Save a GPT-2 for serving: fp16 safetensors, tokenizer files and generation config in one folder.

    python scripts/save_model.py --tiny --out artifacts/models/tiny-gpt2
    python scripts/save_model.py --model IDEA-CCNL/Wenzhong-GPT2-110M --out artifacts/models/Wenzhong-GPT2-110M

`--model` takes a Hugging Face Hub name (needs the network) or a local folder.
`--tiny` needs no network: a byte-level BPE tokenizer trained with `tokenizers` on
`data/corpus.txt` and a small GPT-2 (`GPT2Config`, 2 layers) trained on the same
corpus for a fixed number of steps on one CPU core (about 25 s), both
deterministic from `--seed` (gpt2ops.tiny_model).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from gpt2ops import REPO

from gpt2ops.tiny_model import TINY_DEFAULTS, build_tiny_model

logger = logging.getLogger("save_model")


def save_pretrained_gpt2(model_id: str, out: Path, dtype_name: str) -> None:
    """Hub name or local folder -> `out` (weights in `dtype_name`, safetensors)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2LMHeadModel

    dtype = getattr(torch, dtype_name)
    model = GPT2LMHeadModel.from_pretrained(model_id, dtype=dtype)
    if model.config.model_type != "gpt2":
        raise SystemExit(f"{model_id} is a {model.config.model_type!r} model; this package serves GPT-2")
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    try:
        generation_config = GenerationConfig.from_pretrained(model_id)
    except OSError:
        generation_config = GenerationConfig.from_model_config(model.config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generation_config.save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="Hub name (e.g. IDEA-CCNL/Wenzhong-GPT2-110M) or local folder")
    source.add_argument("--tiny", action="store_true", help="build the small local GPT-2 (no network)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=TINY_DEFAULTS["seed"], help="--tiny: seed of the initial weights and of the training's data order")
    parser.add_argument("--corpus", type=Path, default=REPO / "data" / "corpus.txt", help="--tiny: corpus of the tokenizer and the training")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.tiny:
        build_tiny_model(args.out, corpus=args.corpus, seed=args.seed, dtype_name=args.dtype)
    else:
        save_pretrained_gpt2(args.model, args.out, args.dtype)
    logger.info("saved %s to %s", "tiny GPT-2" if args.tiny else args.model, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
