"""The decoding engine's promises, on the tiny model in float32 on the CPU."""

from __future__ import annotations

import math
import random

import pytest
import torch

from handler.engine.ranking import contrastive_scores, degeneration_penalty, select_candidates, unit
from handler.engine.decoding import RowRequest, generate
from handler.engine.kv_cache import DecodeBuffers, buffer_bytes, slots_needed
from handler.engine.params import GenerationParams

EOS = (0,)


def rows_for(prompts, params, seeds=None):
    seeds = seeds or [0] * len(prompts)
    return [RowRequest(p, params, EOS, s) for p, s in zip(prompts, seeds)]


# ---- the ranking, on tensors small enough to work out by hand ----

def test_degeneration_penalty_is_the_max_cosine_over_valid_context():
    ctx = unit(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]))  # [B=1, S=3, d=2]
    cand = unit(torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))  # [1, K=2, 2]
    valid = torch.tensor([[True, True, False]])  # the third slot (cos 0.707 with cand 0) is padding
    penalty = degeneration_penalty(cand, ctx, valid)
    assert torch.allclose(penalty, torch.tensor([[1.0, 0.0]]))  # cand 0 = ctx 0; cand 1: max(0, -1) = 0
    valid_all = torch.tensor([[True, True, True]])
    assert torch.allclose(degeneration_penalty(cand, ctx, valid_all), torch.tensor([[1.0, 0.0]]))
    valid_last = torch.tensor([[False, False, True]])
    assert torch.allclose(degeneration_penalty(cand, ctx, valid_last), torch.tensor([[math.sqrt(0.5), -math.sqrt(0.5)]]))


def test_contrastive_score_and_selection_worked_by_hand():
    prob = torch.tensor([[0.5, 0.3, 0.2]])
    penalty = torch.tensor([[0.9, 0.1, 0.0]])
    # alpha 0.6: 0.4*0.5-0.6*0.9 = -0.34; 0.4*0.3-0.6*0.1 = 0.06; 0.4*0.2-0 = 0.08 -> candidate 2
    scores = contrastive_scores(prob, penalty, torch.tensor([0.6]))
    assert torch.allclose(scores, torch.tensor([[-0.34, 0.06, 0.08]]))
    no_sample = torch.tensor([False])
    every = torch.tensor([[True, True, True]])
    assert select_candidates(scores, every, no_sample, torch.tensor([1.0]), None).tolist() == [2]
    # only two candidates for this row (k=2): candidate 1
    assert select_candidates(scores, torch.tensor([[True, True, False]]), no_sample, torch.tensor([1.0]),
                             None).tolist() == [1]
    # alpha 0 is greedy: the most probable candidate
    assert select_candidates(contrastive_scores(prob, penalty, torch.tensor([0.0])), every, no_sample,
                             torch.tensor([1.0]), None).tolist() == [0]


def test_contrastive_sampling_follows_softmax_of_score_over_temperature():
    scores = torch.tensor([[0.0, math.log(3.0)]])  # softmax at T=1: [0.25, 0.75]
    valid, sample = torch.tensor([[True, True]]), torch.tensor([True])
    picks = []
    for seed in range(4000):
        g = -torch.log(-torch.log(torch.rand(1, 2, generator=torch.Generator().manual_seed(seed))))
        picks.append(int(select_candidates(scores, valid, sample, torch.tensor([1.0]), g)))
    assert abs(sum(picks) / len(picks) - 0.75) < 0.03
    # temperature -> 0 becomes the argmax whatever the noise
    g = torch.tensor([[5.0, -5.0]])
    assert select_candidates(scores, valid, sample, torch.tensor([1e-4]), g).tolist() == [1]


# ---- against transformers ----

def test_alpha_zero_is_transformers_greedy_generate(fp32_model):
    hf, model = fp32_model
    rng = random.Random(3)
    for _ in range(4):
        prompt = [rng.randrange(1, model.vocab_size) for _ in range(rng.randint(2, 10))]
        params = GenerationParams(penalty_alpha=0.0, top_k=4, max_new_tokens=24)
        ours = generate(model, rows_for([prompt], params))[0].tokens
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
        if 0 in theirs:  # transformers stops at the config's eos; ours stops at EOS too
            theirs = theirs[: theirs.index(0) + 1]
        assert ours == theirs


def test_greedy_mode_is_transformers_greedy_generate(fp32_model):
    hf, model = fp32_model
    prompt = [5, 77, 300, 12]
    ours = generate(model, rows_for([prompt], GenerationParams(decoding="greedy", max_new_tokens=30)))[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=0)
    theirs = theirs[0, len(prompt):].tolist()
    assert ours.tokens == theirs[: len(ours.tokens)]
    assert len(ours.tokens) == 30 or ours.finish_reason == "eos"


# ---- batching ----

@pytest.mark.parametrize("params", [
    GenerationParams(max_new_tokens=16),
    GenerationParams(max_new_tokens=16, top_k=7, penalty_alpha=0.3),
    GenerationParams(max_new_tokens=16, do_sample=True, temperature=0.7),
    GenerationParams(decoding="greedy", max_new_tokens=16),
    GenerationParams(decoding="sample", max_new_tokens=16, top_k=50, top_p=0.9),
], ids=["contrastive", "contrastive-k7", "contrastive-sampling", "greedy", "sample"])
def test_a_prompt_alone_and_in_a_padded_batch_gives_the_same_tokens(fp32_model, params):
    _, model = fp32_model
    rng = random.Random(11)
    prompts = [[rng.randrange(1, model.vocab_size) for _ in range(n)] for n in (3, 17, 1, 9, 30, 5)]
    seeds = [rng.randrange(2**32) for _ in prompts]
    batched = generate(model, rows_for(prompts, params, seeds))
    for prompt, seed, result in zip(prompts, seeds, batched):
        alone = generate(model, rows_for([prompt], params, [seed]))[0]
        assert result.tokens == alone.tokens
        assert result.finish_reason == alone.finish_reason


def test_same_seed_same_text_whatever_shares_the_batch(fp32_model):
    _, model = fp32_model
    params = GenerationParams(decoding="sample", temperature=1.2, max_new_tokens=20)
    prompt = [10, 20, 30]
    alone = generate(model, rows_for([prompt], params, [42]))[0].tokens
    others = [[7] * 12, [99, 98], [5, 6, 7, 8, 9, 10, 11, 12]]
    mixed = generate(model, rows_for(others + [prompt], params, [1, 2, 3, 42]))[3].tokens
    assert mixed == alone
    different_seed = generate(model, rows_for([prompt], params, [43]))[0].tokens
    assert different_seed != alone  # the seed matters (20 draws from ~1000 tokens)


def test_per_row_max_new_tokens_and_eos(fp32_model):
    _, model = fp32_model
    prompt = [11, 22, 33]
    free = generate(model, rows_for([prompt], GenerationParams(decoding="greedy", max_new_tokens=20)))[0].tokens
    eos_token = free[6]
    rows = [
        RowRequest(prompt, GenerationParams(decoding="greedy", max_new_tokens=5), EOS),
        RowRequest(prompt, GenerationParams(decoding="greedy", max_new_tokens=20), (eos_token,)),
        RowRequest(prompt, GenerationParams(decoding="greedy", max_new_tokens=20), EOS),
    ]
    short, stopped, full = generate(model, rows, sync_every=3)
    assert (short.tokens, short.finish_reason) == (free[:5], "length")
    assert stopped.tokens == free[: free.index(eos_token) + 1] and stopped.finish_reason == "eos"
    assert full.tokens == free


def test_stop_callback_finishes_a_row_and_the_others_carry_on(fp32_model):
    _, model = fp32_model
    params = GenerationParams(decoding="greedy", max_new_tokens=24)
    prompts = [[1, 2, 3], [4, 5, 6]]
    free = [r.tokens for r in generate(model, rows_for(prompts, params))]
    seen = [[], []]

    def on_sync(new_tokens):
        for row, toks in enumerate(new_tokens):
            seen[row].extend(toks)
        return {0: 7} if len(seen[0]) >= 7 else {}

    stopped, other = generate(model, rows_for(prompts, params), on_sync=on_sync, sync_every=4)
    assert stopped.tokens == free[0][:7] and stopped.finish_reason == "stop"
    assert other.tokens == free[1] and other.finish_reason == "length"
    assert seen[1] == free[1]  # the callback saw every token of the row, once, in order
    assert seen[0][:7] == free[0][:7] and len(seen[0]) == 8  # stopped at the first look after token 7


def test_streaming_callback_sees_each_token_once(fp32_model):
    _, model = fp32_model
    params = GenerationParams(max_new_tokens=13)
    seen = []
    result = generate(model, rows_for([[3, 4, 5]], params),
                      on_sync=lambda new: seen.extend(new[0]) or {}, sync_every=5)[0]
    assert seen == result.tokens


def test_deadline_ends_unfinished_rows_as_timeout(fp32_model):
    _, model = fp32_model
    result = generate(model, rows_for([[1, 2]], GenerationParams(max_new_tokens=50)), sync_every=2,
                      deadline=0.0)[0]
    assert result.finish_reason == "timeout" and len(result.tokens) == 2


def test_finished_rows_stop_changing(fp32_model):
    _, model = fp32_model
    params = [GenerationParams(decoding="greedy", max_new_tokens=3), GenerationParams(max_new_tokens=15)]
    rows = [RowRequest([8, 9], p, EOS) for p in params]
    results = generate(model, rows, sync_every=1)
    assert len(results[0].tokens) == 3 and len(results[1].tokens) == 15


# ---- the static cache ----

def test_buffer_sizes_are_a_function_of_the_config(fp32_model):
    _, model = fp32_model
    B, T, N, K = 3, 10, 20, 4
    S = slots_needed(T, N, K)
    expected = buffer_bytes(n_layer=model.n_layer, n_embd=model.d_model, batch=B, slots=S, dtype_bytes=4)
    buffers = DecodeBuffers.allocate(model, B, S, contrastive=True)
    assert buffers.nbytes() == sum(expected.values())
    assert expected["kv_cache"] == 2 * model.n_layer * B * S * model.d_model * 4
    assert buffers.kv.shape == (2, model.n_layer, B, model.n_head, S, model.head_dim)
