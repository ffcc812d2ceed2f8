"""The batched, cached engine against the slow reference, token for token (tiny model, fp32, CPU)."""

from __future__ import annotations

import random

import pytest

from handler.engine.decoding import RowRequest, generate
from handler.engine.params import GenerationParams
from tests.reference import reference_generate

EOS = (0,)


def random_prompts(rng: random.Random, n: int, vocab: int) -> list[list[int]]:
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 12))] for _ in range(n)]


CASES = [
    # (decoding, alpha, k, do_sample, batch)
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


@pytest.mark.parametrize("decoding,alpha,k,do_sample,batch", CASES)
@pytest.mark.parametrize("trial", range(2))
def test_engine_matches_reference(fp32_model, decoding, alpha, k, do_sample, batch, trial):
    hf, model = fp32_model
    rng = random.Random(hash((decoding, alpha, k, do_sample, batch, trial)) & 0xFFFF)
    prompts = random_prompts(rng, batch, model.vocab_size)
    fields = {"decoding": decoding, "max_new_tokens": rng.randint(8, 24)}
    if decoding == "contrastive":
        fields.update(penalty_alpha=alpha, top_k=k, do_sample=do_sample)
    if decoding == "sample":
        fields.update(top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]), temperature=rng.choice([0.7, 1.3]))
    if do_sample:
        fields.update(temperature=rng.choice([0.05, 0.5, 1.0]))
    params = GenerationParams(**fields)
    rows = [RowRequest(p, params, EOS, seed=rng.randrange(2**32)) for p in prompts]
    results = generate(model, rows, sync_every=rng.choice([1, 3, 8]))
    for row, result in zip(rows, results):
        tokens, reason = reference_generate(hf, list(row.prompt_ids), params, EOS, seed=row.seed)
        assert result.tokens == tokens
        assert result.finish_reason == reason


def test_mixed_modes_in_one_batch_match_reference(fp32_model):
    """Rows of every mode and their own k, alpha, seed and length share one batch."""
    hf, model = fp32_model
    rng = random.Random(7)
    specs = [
        GenerationParams(decoding="contrastive", penalty_alpha=0.6, top_k=4, max_new_tokens=12),
        GenerationParams(decoding="contrastive", penalty_alpha=0.2, top_k=7, max_new_tokens=20),
        GenerationParams(decoding="contrastive", penalty_alpha=0.6, top_k=3, do_sample=True, temperature=0.3,
                         max_new_tokens=9),
        GenerationParams(decoding="greedy", max_new_tokens=16),
        GenerationParams(decoding="sample", top_k=30, top_p=0.95, temperature=0.9, max_new_tokens=14),
    ]
    prompts = random_prompts(rng, len(specs), model.vocab_size)
    rows = [RowRequest(p, s, EOS, seed=rng.randrange(2**32)) for p, s in zip(prompts, specs)]
    for row, result in zip(rows, generate(model, rows)):
        tokens, reason = reference_generate(hf, list(row.prompt_ids), row.params, EOS, seed=row.seed)
        assert (result.tokens, result.finish_reason) == (tokens, reason)
