"""Logprobs: the engine's against the slow reference (raw and processed, every mode), aligned with the tokens
(a stop string cuts both), prompt logprobs against transformers in process, scoring with max_new_tokens=0."""

from __future__ import annotations

import math
import random
import zlib

import pytest
import torch

from handler.engine import Engine, FinishReason, GenerationParams, PoolShape, Request, generate
from handler.engine.logprobs import TokenLogprob
from handler.engine.text import detokenizer
from tests.engine.conftest import EOS, MODES, requests_for
from tests.reference import reference_details, reference_prompt_logprobs

TOL = 1e-4  # the engine's compact forward against transformers' full one, float32



def assert_same_logprobs(got: list[TokenLogprob], want: list, n: int) -> None:
    assert len(got) == len(want)
    for g, (token, lp, top) in zip(got, want):
        assert g.token_id == token and abs(g.logprob - lp) <= TOL, (g, token, lp)
        assert len(g.top) == n
        for (gi, gv), (wi, wv) in zip(g.top, top):
            assert abs(gv - wv) <= TOL
        # ids must agree wherever the values are not a near tie
        values = [v for _, v in top]
        for i, ((gi, _), (wi, _)) in enumerate(zip(g.top, top)):
            apart = all(abs(values[i] - values[j]) > TOL for j in range(len(values)) if j != i)
            assert gi == wi or not apart


@pytest.mark.parametrize("source", ["raw", "processed"])
@pytest.mark.parametrize("mode", list(MODES))
def test_logprobs_match_the_reference(fp32_model, mode, source):
    hf, model = fp32_model
    rng = random.Random(zlib.crc32(repr((mode, source)).encode()))  # the same in every run
    n = rng.choice([0, 1, 5, 20])
    params = GenerationParams(max_new_tokens=rng.randint(8, 14), logprobs=n, logprobs_source=source,
                              repetition_penalty=1.4, frequency_penalty=0.3, logit_bias=((7, 2.0),), **MODES[mode])
    prompts = [[rng.randrange(1, model.vocab_size) for _ in range(rng.randint(1, 9))] for _ in range(3)]
    requests = requests_for(prompts, params, [rng.randrange(2**32) for _ in prompts])
    for request, result in zip(requests, generate(model, requests, sync_every=rng.choice([1, 3, 5]))):
        tokens, reason, logprobs = reference_details(hf, list(request.prompt_ids), params, EOS, seed=request.seed)
        assert (result.tokens, str(result.finish_reason)) == (tokens, reason)
        assert_same_logprobs(result.logprobs, logprobs, n)


def test_raw_greedy_logprobs_are_the_most_likely_and_processed_ones_differ(fp32_model):
    _, model = fp32_model
    prompt = [[3, 14, 15, 92]]
    raw = generate(model, requests_for(prompt, GenerationParams(decoding="greedy", max_new_tokens=10, logprobs=3)))[0]
    assert [lp.token_id for lp in raw.logprobs] == raw.tokens
    assert all(lp.top[0] == (lp.token_id, lp.logprob) and lp.logprob <= 0 for lp in raw.logprobs)
    assert all(lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] for lp in raw.logprobs)
    biased = GenerationParams(decoding="greedy", max_new_tokens=10, logprobs=3, logit_bias=((9, 3.0),))
    both = generate(model, requests_for(prompt * 2, [biased, GenerationParams(
        **{**biased.__dict__, "logprobs_source": "processed"})]))
    assert both[0].tokens == both[1].tokens
    assert [lp.logprob for lp in both[0].logprobs] != [lp.logprob for lp in both[1].logprobs]
    assert all(math.exp(lp.logprob) <= 1 for lp in both[1].logprobs)


def test_logprobs_stay_aligned_with_the_tokens_when_a_stop_string_cuts_them(fp32_model, tokenizer):
    _, model = fp32_model
    detok = detokenizer(tokenizer)
    params = GenerationParams(decoding="greedy", max_new_tokens=24, logprobs=2)
    free = generate(model, requests_for([[5, 6, 7]], params, eos=()), detokenize=detok)[0]
    text = detok(free.tokens)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    cut = generate(model, requests_for([[5, 6, 7]], GenerationParams(**{**params.__dict__, "stop": (stop,)}),
                                       eos=()), detokenize=detok, sync_every=8)[0]
    assert cut.finish_reason is FinishReason.STOP and 0 < len(cut.tokens) < len(free.tokens)
    assert len(cut.logprobs) == len(cut.tokens)
    assert cut.logprobs == free.logprobs[: len(cut.tokens)]


def test_logprobs_are_there_at_every_look_one_per_token(fp32_model, make_engine):
    engine = make_engine(2, sync_every=3)
    gen = engine.submit(Request("a", [4, 5], GenerationParams(max_new_tokens=14, logprobs=1), EOS))
    other = engine.submit(Request("b", [6], GenerationParams(max_new_tokens=9), EOS))
    while engine.busy:
        engine.iterate()
        assert len(gen.logprobs) == len(gen.tokens)
        assert other.logprobs == []
    assert len(gen.tokens) > 0


@pytest.mark.parametrize("n", [0, 4])
def test_prompt_logprobs_are_transformers_in_process(fp32_model, n):
    hf, model = fp32_model
    prompt = [11, 3, 500, 7, 7, 42, 9, 100, 250]
    gens = generate(model, [Request("p", prompt, GenerationParams(max_new_tokens=3, prompt_logprobs=n), EOS)])
    got = gens[0].prompt_logprobs
    want = reference_prompt_logprobs(hf, prompt, n)
    assert got[0] is None and len(got) == len(prompt)
    assert_same_logprobs(got[1:], want[1:], n)
    with torch.no_grad():  # transformers' own loss: the mean negative log-likelihood of the prompt
        loss = hf(torch.tensor([prompt]), labels=torch.tensor([prompt])).loss.item()
    assert abs(-sum(lp.logprob for lp in got[1:]) / (len(prompt) - 1) - loss) <= TOL


def test_max_new_tokens_0_scores_the_prompt_and_generates_nothing(fp32_model, make_engine):
    hf, _ = fp32_model
    engine = make_engine(1, sync_every=2)
    score = Request("score", [5, 6, 7, 8], GenerationParams(max_new_tokens=0, prompt_logprobs=1), EOS)
    after = Request("after", [9, 10], GenerationParams(max_new_tokens=5, logprobs=0), EOS)
    gens = [engine.submit(score), engine.submit(after)]
    changed = engine.iterate()
    assert gens[0] in changed and gens[0].finish_reason is FinishReason.LENGTH and gens[0].tokens == []
    assert gens[0].logprobs == [] and len(gens[0].prompt_logprobs) == 4
    assert [lp.token_id for lp in gens[0].prompt_logprobs[1:]] == [6, 7, 8]
    while engine.busy:
        engine.iterate()
    assert len(gens[1].tokens) == len(gens[1].logprobs) > 0 and all(lp.top == () for lp in gens[1].logprobs)
    assert gens[1].prompt_logprobs == []
    want = reference_prompt_logprobs(hf, [5, 6, 7, 8], 1)
    assert_same_logprobs(gens[0].prompt_logprobs[1:], want[1:], 1)
