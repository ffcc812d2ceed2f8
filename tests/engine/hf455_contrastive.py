"""transformers 4.55.4's own contrastive search on cases given as JSON on stdin; prints the tokens as JSON.

Run by tests/engine/test_hf455_parity.py in a subprocess with PYTHONPATH=.hf455 (transformers 4.55.4,
tokenizers 0.21.4 and huggingface-hub 0.34.4 installed there by `make test`, torch from the project's venv):
transformers 5, the project's, no longer has contrastive search. Imports nothing from this repository.

stdin: {"model_dir": ..., "cases": [{"prompt": [...], "max_new_tokens": n, "penalty_alpha": a, "top_k": k,
"repetition_penalty": r, "min_new_tokens": m, "sequence_bias": [[id, bias], ...], "eos_token_id": e}, ...]}
stdout: {"transformers": version, "tokens": [[...], ...]} (generated tokens only, end-of-text included)
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from transformers import GPT2LMHeadModel


@torch.no_grad()
def main() -> int:
    job = json.load(sys.stdin)
    if transformers.__version__ != "4.55.4":
        sys.exit(f"needs transformers 4.55.4, found {transformers.__version__} at {transformers.__file__}")
    torch.set_grad_enabled(False)
    model = GPT2LMHeadModel.from_pretrained(job["model_dir"], torch_dtype=torch.float32, local_files_only=True)
    model.eval()
    out = []
    for case in job["cases"]:
        ids = torch.tensor([case["prompt"]])
        kw = dict(max_new_tokens=case["max_new_tokens"], penalty_alpha=case["penalty_alpha"], top_k=case["top_k"],
                  do_sample=False, eos_token_id=case["eos_token_id"], pad_token_id=case["eos_token_id"],
                  repetition_penalty=case.get("repetition_penalty", 1.0))
        if case.get("min_new_tokens"):
            kw["min_new_tokens"] = case["min_new_tokens"]
        if case.get("sequence_bias"):
            kw["sequence_bias"] = {(int(i),): float(b) for i, b in case["sequence_bias"]}
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        out.append(generated[0, ids.shape[1]:].tolist())
    json.dump({"transformers": transformers.__version__, "tokens": out}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
