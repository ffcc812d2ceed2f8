"""GenerationParams: every field's range and the rules between fields, as tables."""

from __future__ import annotations

import pytest

from handler.serving.errors import RequestError
from handler.engine.params import GenerationParams
from handler.serving.fields import defaults_from_config, params_from_request
from handler.serving.limits import RequestLimits

LIMITS = RequestLimits()
VOCAB = 1000


def parse(**fields) -> GenerationParams:
    return params_from_request(fields, defaults=GenerationParams(), limits=LIMITS, vocab_size=VOCAB)


VALID = [
    ({}, dict(decoding="contrastive", penalty_alpha=0.6, top_k=4, do_sample=False, max_new_tokens=64)),
    ({"do_sample": True}, dict(decoding="contrastive", do_sample=True, temperature=1.0)),
    ({"do_sample": True, "temperature": 0.3, "seed": 9}, dict(temperature=0.3, seed=9)),
    ({"decoding": "greedy"}, dict(decoding="greedy", do_sample=False)),
    ({"decoding": "sample"}, dict(decoding="sample", do_sample=True, top_k=0, top_p=1.0)),
    ({"decoding": "sample", "top_k": 40, "top_p": 0.9, "temperature": 0.7},
     dict(top_k=40, top_p=0.9, temperature=0.7)),
    ({"penalty_alpha": 0, "top_k": 2}, dict(penalty_alpha=0.0, top_k=2)),
    ({"penalty_alpha": 1, "top_k": 16}, dict(penalty_alpha=1.0, top_k=16)),
    ({"max_new_tokens": 1}, dict(max_new_tokens=1)),
    ({"max_new_tokens": 256}, dict(max_new_tokens=256)),
    ({"stop": "###"}, dict(stop=("###",))),
    ({"stop": ["a", "bc"]}, dict(stop=("a", "bc"))),
    ({"eos_token_id": 7}, dict(eos_token_id=(7,))),
    ({"eos_token_id": [7, 9]}, dict(eos_token_id=(7, 9))),
    ({"stream": True, "return_token_ids": True}, dict(stream=True, return_token_ids=True)),
    ({"decoding": "sample", "seed": 0}, dict(seed=0)),
    ({"decoding": "sample", "seed": 2**32 - 1}, dict(seed=2**32 - 1)),
]


@pytest.mark.parametrize("fields,expect", VALID)
def test_valid_requests(fields, expect):
    params = parse(**fields)
    for name, value in expect.items():
        assert getattr(params, name) == value


INVALID = [
    ({"top_k": 1}, "top_k", "top_k must be >= 2, got 1"),
    ({"top_k": 17}, "top_k", "top_k must be <= 16, got 17"),
    ({"top_k": 4.0}, "top_k", "top_k must be an integer, got a number (4.0)"),
    ({"decoding": "sample", "top_k": -1}, "top_k", "top_k must be >= 0, got -1"),
    ({"decoding": "sample", "top_k": 1001}, "top_k", "top_k must be <= 1000, got 1001"),
    ({"penalty_alpha": 1.01}, "penalty_alpha", "penalty_alpha must be <= 1, got 1.01"),
    ({"penalty_alpha": -1}, "penalty_alpha", "penalty_alpha must be >= 0, got -1"),
    ({"penalty_alpha": True}, "penalty_alpha", "penalty_alpha must be a number, got a boolean (True)"),
    ({"penalty_alpha": float("inf")}, "penalty_alpha", "penalty_alpha must be a finite number, got inf"),
    ({"max_new_tokens": 0}, "max_new_tokens", "max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": 257}, "max_new_tokens", "max_new_tokens must be <= 256, got 257"),
    ({"max_new_tokens": None}, "max_new_tokens", "max_new_tokens must be an integer, got null (None)"),
    ({"decoding": "beam"}, "decoding", "decoding must be one of 'contrastive', 'greedy', 'sample', got 'beam'"),
    ({"decoding": ["greedy"]}, "decoding", "decoding must be one of"),
    ({"do_sample": 1}, "do_sample", "do_sample must be true or false, got an integer (1)"),
    ({"decoding": "greedy", "do_sample": True}, "do_sample", "do_sample must be false with decoding='greedy'"),
    ({"decoding": "sample", "do_sample": False}, "do_sample", "do_sample must be true with decoding='sample'"),
    ({"temperature": 0.5}, "temperature", "temperature applies only when sampling"),
    ({"decoding": "greedy", "seed": 1}, "seed", "seed applies only when sampling"),
    ({"decoding": "sample", "temperature": 0}, "temperature", "temperature must be > 0, got 0"),
    ({"decoding": "sample", "temperature": 101}, "temperature", "temperature must be <= 100, got 101"),
    ({"decoding": "sample", "top_p": 0}, "top_p", "top_p must be > 0, got 0"),
    ({"decoding": "sample", "top_p": 1.5}, "top_p", "top_p must be <= 1, got 1.5"),
    ({"top_p": 0.9}, "top_p", "top_p applies only to decoding='sample', not 'contrastive'"),
    ({"decoding": "greedy", "penalty_alpha": 0.2}, "penalty_alpha", "applies only to decoding='contrastive'"),
    ({"decoding": "greedy", "top_k": 3}, "top_k", "top_k applies only to decoding='contrastive' or 'sample'"),
    ({"decoding": "sample", "seed": 2**32}, "seed", "seed must be <= 4294967295"),
    ({"decoding": "sample", "seed": "7"}, "seed", "seed must be an integer, got a string ('7')"),
    ({"stop": 3}, "stop", "stop must be a string or a list of strings, got an integer"),
    ({"stop": ["a", 2]}, "stop", "stop must contain only strings, got an integer (2)"),
    ({"stop": ["a"] * 5}, "stop", "stop must have at most 4 strings, got 5"),
    ({"stop": [""]}, "stop", "stop strings must not be empty"),
    ({"stop": ["x" * 65]}, "stop", "stop strings must be at most 64 characters, got 65"),
    ({"eos_token_id": 1000}, "eos_token_id", "eos_token_id must be in [0, 1000), got 1000"),
    ({"eos_token_id": []}, "eos_token_id", "eos_token_id must be an integer or a list of 1 to 8 integers"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id", "eos_token_id must be an integer or a list of integers"),
    ({"stream": "yes"}, "stream", "stream must be true or false"),
    ({"return_token_ids": 0}, "return_token_ids", "return_token_ids must be true or false"),
    ({"topk": 3}, "topk", "unknown field 'topk'; did you mean 'top_k'?"),
    ({"model": "gpt2"}, "model", "unknown field 'model'"),
]


@pytest.mark.parametrize("fields,field,message", INVALID)
def test_invalid_requests_name_the_field(fields, field, message):
    with pytest.raises(RequestError) as err:
        parse(**fields)
    assert err.value.field == field
    assert err.value.status == 400
    assert message in err.value.message


def test_operator_defaults_apply_and_are_checked():
    limits = RequestLimits(max_new_tokens=100)
    defaults = defaults_from_config({"max_new_tokens": 32, "top_k": 6, "temperature": 0.5},
                                                    limits)
    assert (defaults.max_new_tokens, defaults.top_k, defaults.temperature) == (32, 6, 0.5)
    params = params_from_request({"do_sample": True}, defaults=defaults, limits=limits, vocab_size=VOCAB)
    assert params.temperature == 0.5 and params.top_k == 6 and params.max_new_tokens == 32
    for bad, words in [({"top_k": 1}, "top_k must be >= 2"), ({"max_new_tokens": 101}, "<= 100"),
                       ({"seed": 1}, "unknown handler.defaults keys"),
                       ({"decoding": "greedy", "do_sample": True}, "do_sample must be false")]:
        with pytest.raises(ValueError, match=words):
            defaults_from_config(bad, limits)


@pytest.mark.parametrize("raw,words", [
    ({"max_new_tokens": 0}, "positive integer"),
    ({"max_top_k": "8"}, "positive integer"),
    ({"max_batch": 8}, "unknown handler.limits keys"),
])
def test_limits_are_checked(raw, words):
    with pytest.raises(ValueError, match=words):
        RequestLimits.from_config(raw)


@pytest.mark.parametrize("params,want", [
    (GenerationParams(), (0,)),
    (GenerationParams(eos_token_id=(5, 6)), (5, 6)),
    (GenerationParams(ignore_eos=True), ()),
    (GenerationParams(eos_token_id=(5,), ignore_eos=True), ()),
])
def test_the_ids_that_end_a_request(params, want):
    assert params.end_ids((0,)) == want
