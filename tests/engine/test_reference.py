"""The engine against the slow reference, token for token (tiny model, fp32, CPU).

`tests/reference.py` recomputes the whole forward for every step and candidate
with transformers' own model and follows the paper's definitions literally.
"""

from __future__ import annotations

import random
import zlib

import pytest

from handler.engine import GenerationParams, generate
from tests.engine.conftest import EOS, requests_for
from tests.reference import reference_generate


def random_prompts(rng: random.Random, n: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]


CASES = [
    # (decoding, alpha, k, do_sample, requests)
    ("contrastive", 0.6, 4, False, 1),
    ("contrastive", 0.6, 4, False, 3),
    ("contrastive", 0.3, 2, False, 4),
    ("contrastive", 0.9, 6, False, 2),
    ("contrastive", 1.0, 3, False, 2),
    ("contrastive", 0.0, 5, False, 2),
    ("contrastive", 0.6, 4, True, 3),
    ("contrastive", 0.5, 8, True, 2),
    ("greedy", None, None, False, 3),
    ("sample", None, None, True, 3),
]


@pytest.mark.parametrize("decoding,alpha,k,do_sample,n", CASES)
@pytest.mark.parametrize("trial", range(2))
def test_engine_matches_reference(fp32_model, decoding, alpha, k, do_sample, n, trial):
    hf, model = fp32_model
    rng = random.Random(zlib.crc32(repr((decoding, alpha, k, do_sample, n, trial)).encode()))  # the same in every run
    prompts = random_prompts(rng, n, model.vocab_size)
    fields = {"decoding": decoding, "max_new_tokens": rng.randint(8, 24)}
    if decoding == "contrastive":
        fields.update(penalty_alpha=alpha, top_k=k, do_sample=do_sample)
    if decoding == "sample":
        fields.update(top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]), temperature=rng.choice([0.7, 1.3]),
                      do_sample=True)
    if do_sample:
        fields.update(temperature=rng.choice([0.05, 0.5, 1.0]))
    params = GenerationParams(**fields)
    requests = requests_for(prompts, params, [rng.randrange(2**32) for _ in prompts])
    results = generate(model, requests, sync_every=rng.choice([1, 3, 8]))
    for request, result in zip(requests, results):
        tokens, reason = reference_generate(hf, list(request.prompt_ids), params, EOS, seed=request.seed)
        assert result.tokens == tokens
        assert str(result.finish_reason) == reason


def test_mixed_modes_in_one_pool_match_reference(fp32_model):
    """Requests of every mode and their own k, alpha, seed and length share one pool."""
    hf, model = fp32_model
    rng = random.Random(7)
    specs = [
        GenerationParams(decoding="contrastive", penalty_alpha=0.6, top_k=4, max_new_tokens=12),
        GenerationParams(decoding="contrastive", penalty_alpha=0.2, top_k=7, max_new_tokens=20),
        GenerationParams(decoding="contrastive", penalty_alpha=0.6, top_k=3, do_sample=True, temperature=0.3,
                         max_new_tokens=9),
        GenerationParams(decoding="greedy", max_new_tokens=16),
        GenerationParams(decoding="sample", top_k=30, top_p=0.95, temperature=0.9, do_sample=True, max_new_tokens=14),
    ]
    prompts = random_prompts(rng, len(specs), model.vocab_size)
    requests = requests_for(prompts, specs, [rng.randrange(2**32) for _ in specs])
    for request, result in zip(requests, generate(model, requests)):
        tokens, reason = reference_generate(hf, list(request.prompt_ids), request.params, EOS, seed=request.seed)
        assert (result.tokens, str(result.finish_reason)) == (tokens, reason)
