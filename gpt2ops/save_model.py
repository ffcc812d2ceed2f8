#!/usr/bin/env python3
"""Save a GPT-2 for serving: fp16 safetensors, tokenizer files and generation config in one folder.

    .venv/bin/python scripts/save_model.py --tiny --out artifacts/models/tiny-gpt2
    .venv/bin/python scripts/save_model.py --model IDEA-CCNL/Wenzhong-GPT2-110M --out artifacts/models/Wenzhong-GPT2-110M

`--model` takes a Hugging Face Hub name (needs the network, or the model in the local Hugging Face
cache) or a local folder. Where the Hub cannot be reached (checked first, in a few seconds), it says
so in one line: save the model on a machine with network and copy the folder, or pass a local folder.
`--tiny` needs no network: a byte-level BPE tokenizer trained with `tokenizers` on
`data/corpus.txt` and a small GPT-2 (`GPT2Config`, 2 layers) trained on the same
corpus for a fixed number of steps on one CPU core (about 25 s), both
deterministic from `--seed` (gpt2ops.tiny_model).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from gpt2ops import REPO
from gpt2ops.errors import OpsError, cli
from gpt2ops.tiny_model import TINY_DEFAULTS, build_tiny_model

logger = logging.getLogger("save_model")
HUB_CHECK_SECONDS = 5.0


def hub_unreachable(endpoint: str, seconds: float = HUB_CHECK_SECONDS) -> str | None:
    """Why the Hub at `endpoint` cannot be reached (name lookup + TCP connect within `seconds`), or None."""
    parts = urlsplit(endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=seconds):
                result.append(None)
        except OSError as err:
            result.append(f"{type(err).__name__}: {err.strerror or err}")

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup ignores socket timeouts
    thread.start()
    thread.join(seconds)
    return result[0] if result else f"no answer within {seconds:g} s"


def hub_error(model_id: str, reason: str) -> OpsError:
    return OpsError(f"cannot download {model_id}: {reason}",
                    f"run this command on a machine that reaches the Hub and copy its --out folder here, "
                    f"then pass that folder (--model /path/to/folder, or straight to scripts/archive.sh)")


def check_source(model_id: str) -> None:
    """Fail fast, in one line, when `model_id` is neither a local folder nor obtainable from the Hub."""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(model_id).expanduser().is_dir():
        return
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise OpsError(f"no model folder at {model_id}", "pass an existing folder or a Hub name such as "
                       "IDEA-CCNL/Wenzhong-GPT2-110M")
    try:
        cached = isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except ValueError:  # not a valid repository name
        cached = False
    if cached:
        return  # from_pretrained uses the cache when the Hub cannot be reached
    if constants.HF_HUB_OFFLINE:
        raise hub_error(model_id, f"HF_HUB_OFFLINE=1 forbids the Hugging Face Hub and it is not in the local "
                                  f"cache ({constants.HF_HUB_CACHE})")
    reason = hub_unreachable(constants.ENDPOINT)
    if reason:
        raise hub_error(model_id, f"the Hugging Face Hub cannot be reached at {constants.ENDPOINT} ({reason})")


def save_pretrained_gpt2(model_id: str, out: Path, dtype_name: str) -> None:
    """Hub name or local folder -> `out` (weights in `dtype_name`, safetensors)."""
    check_source(model_id)
    import torch
    from transformers import AutoTokenizer, GenerationConfig, GPT2LMHeadModel

    dtype = getattr(torch, dtype_name)
    try:
        model = GPT2LMHeadModel.from_pretrained(model_id, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except OSError as err:  # transformers' "couldn't connect", "not a valid model identifier", missing files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OpsError(f"loading {model_id} failed: {first}",
                       "check the name (or folder), or save it on a machine with network and copy the folder") from None
    if model.config.model_type != "gpt2":
        raise OpsError(f"{model_id} is a {model.config.model_type!r} model", "this package serves GPT-2 models only")
    try:
        generation_config = GenerationConfig.from_pretrained(model_id)
    except OSError:
        generation_config = GenerationConfig.from_model_config(model.config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    generation_config.save_pretrained(out)


@cli
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
