"""Batch invariance by construction: a request's bits do not depend on who shares the pool, or when it joined.

Two layers. First the property of this machine the design rests on: a row of a
matmul (and of attention) gets the same bits whatever else is in it and
wherever it sits, when the row count is a multiple of 4
(`handler.engine.model.MATMUL_ROW_MULTIPLE`). Then
the engine's promise on top of it: for every mode, a request alone, in a full
pool, or joining while others are mid-generation gets bitwise the same context
states and the same tokens.
"""

from __future__ import annotations

import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.engine.model import MATMUL_ROW_MULTIPLE
from tests.engine.conftest import EOS


@pytest.mark.parametrize("d,n", [(128, 384), (128, 2048), (768, 2304)])
def test_matmul_rows_get_the_same_bits_with_a_multiple_of_4_rows(d, n):
    g = torch.Generator().manual_seed(d + n)
    w, b, x = torch.randn(d, n, generator=g), torch.randn(n, generator=g), torch.randn(64, d, generator=g)
    reference = torch.addmm(b, x[:MATMUL_ROW_MULTIPLE], w)
    for rows in (4, 8, 12, 16, 20, 32, 64):
        out = torch.addmm(b, x[:rows], w)
        assert torch.equal(out[:MATMUL_ROW_MULTIPLE], reference), rows
        for r in range(rows):  # wherever the row sits
            moved = torch.roll(x[:rows], shifts=-r, dims=0)
            assert torch.equal(torch.addmm(b, moved, w)[0], out[r])


def test_attention_rows_get_the_same_bits_whatever_the_batch_and_query_count():
    g = torch.Generator().manual_seed(0)
    R, H, P, Dh = 8, 4, 200, 32
    q, k, v = (torch.randn(R, H, n, Dh, generator=g) for n in (16, P, P))
    mask = torch.rand(R, 1, 16, P, generator=g) > 0.5
    full = F.scaled_dot_product_attention(q[:, :, :4], k, v, attn_mask=mask[:, :, :4])
    for rows in (1, 2, 8):
        for queries in (4, 8, 16):
            out = F.scaled_dot_product_attention(q[:rows, :, :queries], k[:rows], v[:rows],
                                                 attn_mask=mask[:rows, :, :queries])
            assert torch.equal(out[:, :, :4], full[:rows])


MODES = {
    "contrastive": GenerationParams(max_new_tokens=24),
    "contrastive-k7": GenerationParams(max_new_tokens=24, top_k=7, penalty_alpha=0.3),
    "contrastive-sampling": GenerationParams(max_new_tokens=24, do_sample=True, temperature=0.7),
    "greedy": GenerationParams(decoding="greedy", max_new_tokens=24),
    "sample": GenerationParams(decoding="sample", do_sample=True, max_new_tokens=24, top_k=50, top_p=0.9),
    # logits processing and logprobs (issue 22): per row, so neighbours change none of it either
    "contrastive-penalties-logprobs": GenerationParams(max_new_tokens=24, repetition_penalty=1.3, presence_penalty=0.5,
                                                       frequency_penalty=0.4, logit_bias=((3, 2.0), (260, -5.0)),
                                                       min_tokens=4, logprobs=5, prompt_logprobs=2),
    "greedy-logprobs": GenerationParams(decoding="greedy", max_new_tokens=24, logprobs=20, repetition_penalty=1.5),
    "sample-processed-logprobs": GenerationParams(decoding="sample", do_sample=True, max_new_tokens=24, top_k=50,
                                                  frequency_penalty=0.8, logprobs=3, logprobs_source="processed"),
}
NEIGHBOURS = list(MODES.values())


def run_and_capture(engine: Engine, target: Request, others: list[Request], join_after: int) -> tuple:
    """Run `others`, submit `target` after `join_after` iterations, finish all; the target's tokens, context,
    logprobs and prompt logprobs."""
    for r in others:
        engine.submit(r)
    for _ in range(join_after):
        engine.iterate()
    gen = engine.submit(target)
    while engine.busy:
        engine.iterate()
    n = len(target.prompt_ids) + len(gen.tokens) - 1  # positions whose context state exists
    return gen.tokens, engine.pool.hidden[gen.slot, :n].clone(), gen.logprobs, gen.prompt_logprobs


@pytest.mark.parametrize("mode", list(MODES))
def test_alone_full_pool_and_mid_flight_give_the_same_bits(fp32_model, mode):
    _, model = fp32_model
    rng = random.Random(zlib.crc32(mode.encode()))  # the same in every run (hash() of a str is salted per process)
    prompt = [rng.randrange(1, model.vocab_size) for _ in range(rng.randint(3, 15))]
    target = Request("target", prompt, MODES[mode], EOS, seed=rng.randrange(2**32))
    shape = PoolShape(max_slots=8, max_len=64, max_top_k=16)

    def others(n):
        return [Request(f"o{i}", [rng.randrange(1, model.vocab_size) for _ in range(rng.randint(1, 30))],
                        NEIGHBOURS[i % len(NEIGHBOURS)], EOS, seed=rng.randrange(2**32)) for i in range(n)]

    alone = run_and_capture(Engine(model, PoolShape(1, 64, 16)), target, [], 0)
    full = run_and_capture(Engine(model, shape, sync_every=3), target, others(7), 0)
    mid_flight = run_and_capture(Engine(model, shape, sync_every=2), target, others(7), 2)
    fixed = run_and_capture(Engine(model, shape, fixed_shapes=True), target, others(3), 1)
    assert len(alone[0]) > 0
    for tokens, context, logprobs, prompt_logprobs in (full, mid_flight, fixed):
        assert tokens == alone[0]
        assert torch.equal(context, alone[1])  # bitwise, every context position
        assert (logprobs, prompt_logprobs) == (alone[2], alone[3])  # the same floats, not close ones
    assert len(alone[2]) == (len(alone[0]) if MODES[mode].logprobs is not None else 0)
