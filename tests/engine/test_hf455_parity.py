"""Contrastive search with logits processors against transformers 4.55.4's own, token for token (tiny model,
float32, CPU): repetition_penalty (RepetitionPenaltyLogitsProcessor), min_tokens (min_new_tokens) and logit_bias
(sequence_bias with one-token sequences), alone and together, on a table of cases.

transformers 5 (the project's) has no contrastive search, so the 4.55.4 side runs in a subprocess
(tests/engine/hf455_contrastive.py) with PYTHONPATH=.hf455, where `make test` installs transformers 4.55.4 and
its pinned tokenizers and huggingface-hub (the Makefile's HF_BASELINE_PINS) with --no-deps; torch is the venv's.
Without that folder the test skips and says how to get it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from handler.engine import GenerationParams, Request, generate

REPO = Path(__file__).resolve().parents[2]
HF455 = REPO / ".hf455"
EOS_ID = 0

# (penalty_alpha, top_k, repetition_penalty, min_new_tokens, sequence_bias, prompt tokens, new tokens)
CASES = [
    (0.6, 4, 1.2, 0, (), 5, 24),
    (0.6, 4, 1.5, 0, (), 1, 24),
    (0.6, 4, 2.0, 0, (), 12, 20),
    (0.3, 2, 1.3, 0, (), 8, 24),
    (0.9, 6, 1.1, 0, (), 3, 20),
    (0.5, 8, 0.8, 0, (), 6, 20),  # below 1: repetition rewarded
    (0.0, 5, 1.4, 0, (), 4, 16),  # alpha 0: greedy over the processed logits
    (1.0, 3, 1.6, 0, (), 7, 16),
    (0.6, 4, 1.0, 10, ((0, 8.0),), 5, 20),  # end-of-text made likely, held back 10 tokens
    (0.6, 4, 1.3, 6, ((0, 5.0), (17, 3.0), (260, -50.0)), 4, 20),
    (0.4, 5, 1.0, 0, ((9, 4.0), (33, -2.5)), 9, 20),
    (0.6, 7, 1.7, 3, ((12, 1.5),), 2, 24),
]


def run_hf455(model_dir: Path, cases: list[dict]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HF455), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("hf455_contrastive.py"))],
                          input=json.dumps({"model_dir": str(model_dir), "cases": cases}), env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(not (HF455 / "transformers").is_dir(),
                    reason="transformers 4.55.4 is not in .hf455: `make test` installs it (make .hf455/.installed)")
def test_contrastive_search_with_processors_is_transformers_4_55_token_for_token(fp32_model, tiny_model_dir):
    _, model = fp32_model
    rng = random.Random(zlib.crc32(b"hf455 parity"))
    cases, requests = [], []
    for i, (alpha, k, rep, min_new, bias, prompt_len, new) in enumerate(CASES):
        prompt = [rng.randrange(1, model.vocab_size) for _ in range(prompt_len)]
        cases.append({"prompt": prompt, "max_new_tokens": new, "penalty_alpha": alpha, "top_k": k,
                      "repetition_penalty": rep, "min_new_tokens": min_new, "sequence_bias": [list(b) for b in bias],
                      "eos_token_id": EOS_ID})
        params = GenerationParams(max_new_tokens=new, penalty_alpha=alpha, top_k=k, repetition_penalty=rep,
                                  min_tokens=min_new, logit_bias=bias)
        requests.append(Request(str(i), prompt, params, (EOS_ID,)))
    theirs = run_hf455(tiny_model_dir, cases)
    assert theirs["transformers"] == "4.55.4"
    ours = [g.tokens for g in generate(model, requests, max_slots=4)]
    for case, mine, want in zip(CASES, ours, theirs["tokens"]):
        assert mine == want, case
    # the table is not vacuous: the processors change transformers' own choice on half the cases or more
    # (contrastive search's own degeneration penalty already avoids much of the repetition)
    plain = [{**c, "repetition_penalty": 1.0, "min_new_tokens": 0, "sequence_bias": []} for c in cases]
    unprocessed = run_hf455(tiny_model_dir, plain)["tokens"]
    assert sum(a != b for a, b in zip(unprocessed, theirs["tokens"])) >= len(CASES) // 2
