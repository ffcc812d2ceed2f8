#!/usr/bin/env python3
"""The baseline: transformers 4.55's own contrastive search, timed like benchmarks/decode.py.

transformers 5 removed contrastive search from its core, so this runs in an environment of
its own with the last release that had it:

    make bench-hf          # creates .venv-hf (torch 2.13.0 CPU, transformers 4.55.4) and runs this

Same shapes, prompt and lengths as benchmarks/decode.py (random weights, 16-token prompt, no
early stop), so the two tables compare row by row on the same machine.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel


from benchmarks.decode import SHAPES, base_parser, start_table, sync


@torch.inference_mode()
def main(argv=None) -> int:
    args = base_parser(__doc__).parse_args(argv)
    if not transformers.__version__.startswith("4."):
        sys.exit(f"needs transformers 4.x (<= 4.55) for contrastive search, found {transformers.__version__}")
    device, dtype, new = start_table(args, f"transformers {transformers.__version__}")
    for shape in args.shape:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**SHAPES[shape])).to(device=device, dtype=dtype).eval()
        for batch in args.batch:
            ids = torch.randint(1, model.config.vocab_size, (batch, args.prompt_tokens), device=device)
            kw = dict(max_new_tokens=new, min_new_tokens=new, penalty_alpha=0.6, top_k=4, pad_token_id=0)
            model.generate(ids, **kw)
            sync(device)
            start = time.perf_counter()
            out = model.generate(ids, **kw)
            sync(device)
            seconds = time.perf_counter() - start
            assert out.shape[1] == args.prompt_tokens + new
            print(f"| {shape} | hf-4.55-contrastive | {batch} | {1000 * seconds / new:.1f} | "
                  f"{batch * new / seconds:,.0f} |", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
