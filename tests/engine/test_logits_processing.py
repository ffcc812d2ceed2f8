"""Penalties, logit_bias and min_tokens: their ranges, the vocabulary check, and the engine against the slow
reference (tests/reference.py: the definitions token by token) in every mode (tiny model, fp32, CPU)."""

from __future__ import annotations

import random
import zlib

import pytest

from handler.engine import Engine, GenerationParams, PoolShape, Request, generate
from handler.engine.params import InvalidParameter
from tests.engine.conftest import EOS, MODES, requests_for
from tests.reference import reference_generate


@pytest.mark.parametrize("fields,message", [
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0, got 0"),
    ({"repetition_penalty": 10.5}, "repetition_penalty must be <= 10, got 10.5"),
    ({"presence_penalty": 3}, "presence_penalty must be <= 2, got 3"),
    ({"presence_penalty": -2.5}, "presence_penalty must be >= -2, got -2.5"),
    ({"frequency_penalty": 2.01}, "frequency_penalty must be <= 2, got 2.01"),
    ({"frequency_penalty": "1"}, "frequency_penalty must be a number, got a string"),
    ({"min_tokens": -1}, "min_tokens must be >= 0, got -1"),
    ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens must be <= max_new_tokens (8), got 9"),
    ({"logprobs": 21}, "logprobs must be <= 20, got 21"),
    ({"logprobs": -1}, "logprobs must be >= 0, got -1"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs must be an integer, got a number"),
    ({"logprobs_source": "cooked"}, "logprobs_source must be one of 'raw', 'processed', got 'cooked'"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
    ({"logit_bias": ((1, 101.0),)}, "logit_bias biases must be in [-100, 100], got 101 for token id 1"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias token ids must be >= 0, got -1"),
    ({"logit_bias": ((4, 1.0), (4, 2.0))}, "logit_bias names token id 4 twice"),
    ({"logit_bias": tuple((i, 1.0) for i in range(301))}, "logit_bias must have at most 300 entries, got 301"),
    ({"logit_bias": {1: 2.0}}, "logit_bias must be a tuple of (token id, bias) pairs"),
])
def test_out_of_range_values_are_refused_naming_the_field(fields, message):
    with pytest.raises(InvalidParameter) as err:
        GenerationParams(**fields)
    assert err.value.field == next(iter(fields)) and message in str(err.value)


def test_defaults_ask_for_nothing_and_scoring_needs_prompt_logprobs():
    params = GenerationParams()
    assert not params.processes_logits and not params.extras
    assert GenerationParams(logprobs=0).extras and GenerationParams(min_tokens=1).processes_logits
    assert GenerationParams(max_new_tokens=0, prompt_logprobs=0).max_new_tokens == 0
    assert not GenerationParams(prompt_logprobs=3).extras  # computed at the prefill, not by the step


def test_a_logit_bias_id_outside_the_vocabulary_is_refused_at_submit(make_engine, fp32_model):
    engine = make_engine(1)
    vocab = fp32_model[1].vocab_size
    bad = Request("bad", [1, 2], GenerationParams(logit_bias=((3, 1.0), (vocab, 5.0))), EOS)
    with pytest.raises(InvalidParameter) as err:
        engine.submit(bad)
    assert err.value.field == "logit_bias" and f"token id {vocab} is outside the vocabulary" in str(err.value)
    assert f"size {vocab}" in str(err.value) and not engine.busy
    engine.submit(Request("ok", [1, 2], GenerationParams(max_new_tokens=2, logit_bias=((vocab - 1, 5.0),)), EOS))


PENALTIES = {
    "repetition": {"repetition_penalty": 1.8},
    "repetition-below-1": {"repetition_penalty": 0.7},
    "presence": {"presence_penalty": 1.5},
    "frequency": {"frequency_penalty": 0.9},
    "negative-frequency": {"frequency_penalty": -0.8, "presence_penalty": -0.4},
    "logit-bias": {"logit_bias": ((5, 8.0), (260, -100.0), (17, 2.5))},
    "min-tokens": {"min_tokens": 10, "logit_bias": ((0, 6.0),)},  # eos (0) made likely, kept out until 10
    "all": {"repetition_penalty": 1.3, "presence_penalty": 0.6, "frequency_penalty": 0.3,
            "logit_bias": ((5, 1.5),), "min_tokens": 3},
}


@pytest.mark.parametrize("penalty", list(PENALTIES))
@pytest.mark.parametrize("mode", list(MODES))
def test_engine_matches_reference_with_each_penalty(fp32_model, mode, penalty):
    hf, model = fp32_model
    rng = random.Random(zlib.crc32(repr((mode, penalty)).encode()))  # the same in every run
    params = GenerationParams(max_new_tokens=rng.randint(12, 18), **MODES[mode], **PENALTIES[penalty])
    prompts = [[rng.randrange(1, model.vocab_size) for _ in range(rng.randint(1, 10))] for _ in range(3)]
    requests = requests_for(prompts, params, [rng.randrange(2**32) for _ in prompts])
    results = generate(model, requests, sync_every=rng.choice([1, 3, 8]))
    for request, result in zip(requests, results):
        tokens, reason = reference_generate(hf, list(request.prompt_ids), params, EOS, seed=request.seed)
        assert (result.tokens, str(result.finish_reason)) == (tokens, reason)


@pytest.mark.parametrize("penalty", [p for p in PENALTIES if p != "min-tokens"])
def test_each_penalty_changes_what_greedy_and_contrastive_choose(fp32_model, penalty):
    """The table above is not vacuous: each processor changes some request's tokens."""
    _, model = fp32_model
    rng = random.Random(3)
    prompts = [[rng.randrange(1, model.vocab_size) for _ in range(6)] for _ in range(4)]
    for mode in ("greedy", "contrastive"):
        plain = GenerationParams(max_new_tokens=16, **MODES[mode])
        penalized = GenerationParams(max_new_tokens=16, **MODES[mode], **PENALTIES[penalty])
        before = [g.tokens for g in generate(model, requests_for(prompts, plain, eos=()))]
        after = [g.tokens for g in generate(model, requests_for(prompts, penalized, eos=()))]
        assert before != after, mode


def test_min_tokens_holds_end_of_text_back_until_then(fp32_model):
    _, model = fp32_model
    forced = {"logit_bias": ((0, 100.0),)}  # end-of-text (id 0 here) is every step's choice when allowed
    for mode in MODES:
        gens = generate(model, requests_for([[5, 6, 7], [8]], [
            GenerationParams(max_new_tokens=12, **MODES[mode], **forced),
            GenerationParams(max_new_tokens=12, min_tokens=7, **MODES[mode], **forced)]))
        assert 0 not in gens[1].tokens[:7] and len(gens[1].tokens) >= 8, mode
        if mode in ("greedy", "sample"):  # contrastive search may pass end-of-text over (its context penalty)
            assert [(len(g.tokens), str(g.finish_reason), g.tokens[-1]) for g in gens] == \
                [(1, "eos", 0), (8, "eos", 0)]


def test_a_plain_request_beside_penalized_ones_gets_its_tokens_alone(fp32_model):
    """The step with its extras on leaves a row that asks for nothing bit for bit as it was."""
    _, model = fp32_model
    rng = random.Random(11)
    target = Request("t", [rng.randrange(1, model.vocab_size) for _ in range(7)], GenerationParams(max_new_tokens=20),
                     EOS)
    others = [Request(f"o{i}", [rng.randrange(1, model.vocab_size) for _ in range(5)],
                      GenerationParams(max_new_tokens=20, **list(PENALTIES.values())[i]), EOS) for i in range(3)]
    alone = Engine(model, PoolShape(1, 40, 4)).run_to_completion([target])[0]
    engine = Engine(model, PoolShape(4, 40, 4))
    beside = engine.run_to_completion(others + [target])[-1]
    assert beside.tokens == alone.tokens and len(alone.tokens) > 0
