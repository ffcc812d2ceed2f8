"""End to end: scoring through a real TorchServe. The official `openai` client reads logprobs and echo answers,
their numbers equal transformers' on the same weights (float32, as the server computes on a CPU), bad values are
400s naming the field, the native API carries the same data, and the perplexity recipe of docs/api.md agrees
with the in-process value."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from gpt2ops.client import read_keys
from gpt2ops.local_server import script_env
from tests.e2e.conftest import MODEL
from tests.readme import REPO

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def oa(server):
    key = read_keys(server.run_dir / "key_file.json")["inference"]
    return openai.OpenAI(base_url=f"{server.client.inference_url}/predictions/{MODEL}/1.0/v1", api_key=key,
                         max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """log_softmax of transformers' GPT-2 over a token sequence, float32: row i is the distribution of token i+1."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


def test_echo_with_max_tokens_0_scores_the_prompt_as_transformers_does(oa, tokenizer, reference):
    prompt = "春天来了，花开了，鸟儿在树上唱歌。 The quick brown fox"
    c = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    [choice] = c.choices
    ids = tokenizer.encode(prompt)
    lp = choice.logprobs
    assert choice.text == prompt and choice.finish_reason == "length" and c.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) == c.usage.prompt_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    want = reference(ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - want[i - 1, ids[i]].item()) <= TOLERANCE, i
        top = torch.topk(want[i - 1], 3)
        assert len(lp.top_logprobs[i]) in (3, 4)  # the 3 most likely, and the token itself when it is not one
        for value, token in zip(lp.top_logprobs[i].values(), top.values.tolist()):
            assert abs(value - token) <= TOLERANCE
    for token, offset in zip(lp.tokens, lp.text_offset):
        if not token.startswith("bytes:"):
            assert prompt[offset:offset + len(token)] == token


def test_greedy_logprobs_are_the_most_likely_tokens_and_a_stream_carries_the_same(oa, client, tokenizer, reference):
    prompt = "Who are you? I am"
    kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    [choice] = oa.completions.create(**kw).choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    ids = tokenizer.encode(prompt)
    gen = client.generate(MODEL, prompt, decoding="greedy", max_new_tokens=12, ignore_eos=True,
                          return_token_ids=True)["token_ids"]
    want = reference(ids + gen)
    for i, (logprob, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        assert logprob == max(top.values())  # greedy: the chosen token is the most likely
        assert abs(logprob - want[len(ids) - 1 + i].max().item()) <= TOLERANCE
    assert "".join(lp.tokens) == choice.text or any(t.startswith("bytes:") for t in lp.tokens)
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for chunk in oa.completions.create(**kw, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                for key in joined:
                    joined[key] += getattr(c.logprobs, key)
    assert text == choice.text
    assert joined == {key: getattr(lp, key) for key in joined}


def test_contrastive_search_shows_the_chosen_token_with_its_alternatives(oa):
    """Contrastive search may choose a token that is not the most likely: it is shown with its own logprob."""
    [choice] = oa.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=24, logprobs=4,
                                     extra_body={"ignore_eos": True, "penalty_alpha": 0.6, "top_k": 4}).choices
    lp = choice.logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and logprob <= max(top.values())
        assert list(top.values())[:4] == sorted(list(top.values())[:4], reverse=True)  # most likely first


def test_logit_bias_and_penalties_reach_the_engine(oa, tokenizer):
    prompt = "Who are you? I am"
    plain = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
    first = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(plain.choices[0].text)[0])
    banned = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                                   logit_bias={str(first): -100})
    assert banned.choices[0].logprobs.tokens[0] != plain.choices[0].logprobs.tokens[0]
    penalised = oa.completions.create(model=MODEL, prompt="a a a a a a a a", max_tokens=8, temperature=0,
                                      frequency_penalty=2.0, presence_penalty=2.0, extra_body={"ignore_eos": True})
    assert penalised.usage.completion_tokens == 8


@pytest.mark.parametrize("kw,param,words", [
    (dict(logprobs=6), "logprobs", "logprobs must be <= 5, got 6"),
    (dict(logprobs=6, echo=True, max_tokens=0), "logprobs", "<= 5"),
    (dict(logit_bias={"50256": -100}), "logit_bias", "outside the vocabulary"),
    (dict(logit_bias={"7": 101}), "logit_bias", "[-100, 100]"),
    (dict(presence_penalty=2.5), "presence_penalty", "<= 2"),
    (dict(frequency_penalty=-3), "frequency_penalty", ">= -2"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty", "> 0"),
    (dict(max_tokens=4, extra_body={"min_tokens": 5}), "min_tokens", "4"),
    (dict(max_tokens=0), "max_tokens", "only allowed with echo"),
], ids=["logprobs-over", "logprobs-over-echo", "bias-vocabulary", "bias-range", "presence", "frequency", "repetition",
        "min-tokens", "max-tokens-0-no-echo"])
def test_bad_scoring_values_are_400_naming_the_field(oa, kw, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=MODEL, prompt="hi", **kw)
    error = err.value.body
    assert err.value.status_code == 400 and error["param"] == param and words in error["message"], error


def test_the_native_api_carries_the_same_numbers(client, oa, tokenizer):
    prompt = "你是谁?"
    native = client.generate(MODEL, prompt, decoding="greedy", max_new_tokens=6, logprobs=2, prompt_logprobs=1,
                             ignore_eos=True)
    c = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=2, echo=True,
                              extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    n = len(tokenizer.encode(prompt))
    assert [e["token_id"] for e in native["prompt_logprobs"]] == tokenizer.encode(prompt)
    assert [e["logprob"] for e in native["prompt_logprobs"]] == lp.token_logprobs[:n]
    assert [e["logprob"] for e in native["logprobs"]] == lp.token_logprobs[n:]
    assert [e["token"] for e in native["logprobs"]] == lp.tokens[n:]
    assert [len(e["top_logprobs"]) for e in native["logprobs"]] == [2] * 6
    streamed = list(client.stream(MODEL, prompt, decoding="greedy", max_new_tokens=6, logprobs=2, ignore_eos=True))
    assert [e for line in streamed for e in line["logprobs"]] == native["logprobs"]  # the last line: the rest


def test_the_perplexity_recipe_agrees_with_transformers(server, tmp_path, tokenizer, reference):
    text = (REPO / "eval" / "data" / "sample.txt").read_text(encoding="utf-8")
    env = {**script_env(), "RUN_DIR": str(server.run_dir), "TS_CONFIG": str(server.config)}
    proc = subprocess.run([sys.executable, "-m", "gpt2ops.perplexity", "eval/data/sample.txt", "--json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ids = tokenizer.encode(text)
    want = reference(ids)
    mean = sum(want[i - 1, ids[i]].item() for i in range(1, len(ids))) / (len(ids) - 1)
    assert got["tokens"] == len(ids)
    assert abs(got["perplexity"] - math.exp(-mean)) <= TOLERANCE * math.exp(-mean)
