"""Logprobs as the APIs render them (handler.serving.logprobs): token strings, offsets, the OpenAI object, and
what a stream's chunks carry, from hand-made engine results (`TokenLogprob` lists) on the tiny model's tokenizer.
The answers through the engine itself are in tests/serving/test_scoring.py and tests/e2e/test_scoring.py."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
from transformers import AutoTokenizer

from handler.engine.logprobs import TokenLogprob
from handler.engine.params import GenerationParams
from handler.engine.scheduler import Request
from handler.engine.stopping import FinishReason
from handler.engine.text import IncrementalText, detokenizer
from handler.serving import responses
from handler.serving.logprobs import LOWEST, TokenStrings, openai_logprobs, trail_of
from handler.serving.openai.call import Choice, CompletionCall
from handler.serving.openai.protocol import CompletionRequest

TEXTS = ["你是谁? Hello world, 春天来了。", "显卡的内存很宝贵 🙂 ok", "a\n\nb  c"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def strings(tokenizer):
    return TokenStrings(tokenizer)


def scored(ids, first_none=False):
    """Hand-made engine results: token i has logprob -(i + 1) / 10 and two alternatives."""
    out = [TokenLogprob(t, -(i + 1) / 10, ((t + 1, -0.05), (t + 2, -0.5))) for i, t in enumerate(ids)]
    if first_none:
        out[0] = None
    return out


def unescape(token: str) -> bytes:
    assert token.startswith("bytes:")
    return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])


@pytest.mark.parametrize("text", TEXTS)
def test_token_strings_and_offsets_rebuild_the_text(tokenizer, strings, text):
    ids = tokenizer.encode(text)
    trail = trail_of(strings, scored(ids))
    assert trail.chars == len(text) == len(detokenizer(tokenizer)(ids))
    raw = b""
    for e in trail.entries:
        token = strings.string(e.token_id)
        if token.startswith("bytes:"):  # not whole UTF-8 characters: OpenAI's `bytes:\xNN` form
            piece = unescape(token)
            with pytest.raises(UnicodeDecodeError):
                piece.decode("utf-8")
        else:
            piece = token.encode("utf-8")
            assert text[e.offset:e.offset + len(token)] == token  # a whole token sits at its offset
        raw += piece
    assert raw.decode("utf-8") == text
    offsets = [e.offset for e in trail.entries]
    assert offsets == sorted(offsets) and offsets[0] == 0


def test_a_character_split_across_tokens_is_shown_as_bytes(tokenizer, strings):
    split = [t for t in range(len(tokenizer)) if strings.string(t).startswith("bytes:")]
    assert split, "the tiny tokenizer has tokens that are parts of characters"
    assert strings.string(tokenizer.eos_token_id) == tokenizer.eos_token  # a special token: its name
    assert strings.bytes_of(tokenizer.eos_token_id) == b""  # and nothing in the text


def test_the_openai_object_shows_the_chosen_token_among_its_alternatives(strings, tokenizer):
    ids = tokenizer.encode("Hello world")[:2]
    # contrastive search may choose a token outside the top n: it is still shown, with its own logprob
    entries = trail_of(strings, [TokenLogprob(ids[0], -3.25, ((5, -0.1),)),
                                 TokenLogprob(ids[1], -math.inf, ((ids[1], -math.inf),))]).entries
    got = openai_logprobs(strings, entries, base=7)
    assert got["tokens"] == [strings.string(t) for t in ids]
    assert got["token_logprobs"] == [-3.25, LOWEST]  # JSON has no -inf: vLLM's -9999.0
    assert got["top_logprobs"][0] == {strings.string(5): -0.1, strings.string(ids[0]): -3.25}
    assert list(got["top_logprobs"][0])[0] == strings.string(5)  # the most likely first
    assert got["top_logprobs"][1] == {strings.string(ids[1]): LOWEST}
    assert got["text_offset"] == [7, 7 + len("Hello")]
    json.dumps(got, allow_nan=False)


# ---- the OpenAI call and the native answer, on a generation that grows as the engine would grow it ----


@dataclass
class FakeGeneration:
    request: Request
    text: IncrementalText
    finish_reason: FinishReason | None = None
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)

    @property
    def tokens(self):
        return self.text.tokens

    @property
    def done(self):
        return self.finish_reason is not None

    @property
    def request_id(self):
        return self.request.request_id

    def grow(self, ids):
        """The engine's look: new tokens and their logprobs (after the prefill: the prompt's)."""
        if not self.prompt_logprobs and self.request.params.prompt_logprobs is not None:
            self.prompt_logprobs = scored(self.request.prompt_ids, first_none=True)
        self.text.add(ids)
        self.logprobs = scored(self.tokens)


def generation(tokenizer, prompt, params):
    return FakeGeneration(Request("r", tokenizer.encode(prompt), params), IncrementalText(detokenizer(tokenizer)))


def call_of(tokenizer, strings, prompt, gen, **request):
    req = CompletionRequest((prompt,), 1, {}, None, **request)
    return CompletionCall(None, "cmpl-x", "tiny-gpt2", req, [Choice(0, prompt, gen)], len(gen.request.prompt_ids),
                          strings)


@pytest.mark.parametrize("echo", [False, True])
def test_a_completion_with_logprobs_and_its_stream_agree(tokenizer, strings, echo):
    prompt, continuation = "你好", "！今天天气很好，我们一起去公园 Hello"
    ids = tokenizer.encode(continuation)
    params = GenerationParams(decoding="greedy", logprobs=2, prompt_logprobs=2 if echo else None)
    plain, streamed = generation(tokenizer, prompt, params), generation(tokenizer, prompt, params)
    events = []
    stream = call_of(tokenizer, strings, prompt, streamed, stream=True, echo=echo, logprobs=2)
    for i in range(0, len(ids), 2):  # two tokens per look: characters split across looks
        streamed.grow(ids[i:i + 2])
        events.append(stream.chunk())
    streamed.finish_reason = plain.finish_reason = FinishReason.LENGTH
    events.append(stream.final())
    plain.grow(ids)
    answer = call_of(tokenizer, strings, prompt, plain, echo=echo, logprobs=2).completion()
    [choice] = answer["choices"]
    text = choice["text"]
    assert text == (prompt if echo else "") + continuation
    lp = choice["logprobs"]
    n_prompt = len(plain.request.prompt_ids) if echo else 0
    assert len(lp["tokens"]) == n_prompt + len(ids)
    if echo:
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["text_offset"][n_prompt] == len(prompt)
    assert lp["token_logprobs"][n_prompt:] == [-(i + 1) / 10 for i in range(len(ids))]
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        if not token.startswith("bytes:"):
            assert text[offset:offset + len(token)] == token
    # the stream: its chunks' texts and logprobs join to the answer's, each chunk's tokens within its text
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    sent_text = ""
    for blob in events:
        for block in filter(None, blob.split("\n\n")):
            data = block[len("data: "):]
            if data == "[DONE]":
                continue
            [c] = json.loads(data)["choices"]
            sent_text += c["text"]
            for key in joined:
                joined[key] += c["logprobs"][key]
            assert all(o <= len(sent_text) for o in c["logprobs"]["text_offset"])
    assert sent_text == text
    assert joined == lp


def test_echo_with_max_tokens_0_is_the_prompt_scored(tokenizer, strings):
    prompt = "春天来了，花开了"
    gen = generation(tokenizer, prompt, GenerationParams(max_new_tokens=0, logprobs=1, prompt_logprobs=1))
    gen.grow([])
    gen.finish_reason = FinishReason.LENGTH
    [choice] = call_of(tokenizer, strings, prompt, gen, echo=True, logprobs=1).completion()["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(gen.request.prompt_ids) and lp["token_logprobs"][0] is None
    assert "".join(lp["tokens"]) == prompt or any(t.startswith("bytes:") for t in lp["tokens"])


def test_a_stop_string_keeps_the_token_that_completed_it(tokenizer, strings):
    prompt = "Hello"
    gen = FakeGeneration(Request("r", tokenizer.encode(prompt), GenerationParams(decoding="greedy", logprobs=0,
                                                                                 stop=("天气",))),
                         IncrementalText(detokenizer(tokenizer), ("天气",)))
    gen.grow(tokenizer.encode("今天天气很好"))
    gen.finish_reason = FinishReason.STOP
    [choice] = call_of(tokenizer, strings, prompt, gen, logprobs=0).completion()["choices"]
    assert choice["text"] == "今天"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(gen.tokens) and lp["text_offset"][-1] <= len("今天天气")
    assert all(token in top for token, top in zip(lp["tokens"], lp["top_logprobs"]))


def test_the_native_answer_carries_both_lists_and_its_stream_splits_them(tokenizer, strings):
    prompt, continuation = "你是谁?", "我是一个语言模型"
    ids = tokenizer.encode(continuation)
    params = GenerationParams(decoding="greedy", logprobs=1, prompt_logprobs=0, stream=True)
    gen = generation(tokenizer, prompt, params)
    from handler.serving.native import NativeCall

    call = NativeCall(prompt, gen, True, strings)
    lines = []
    for i in range(0, len(ids), 3):
        gen.grow(ids[i:i + 3])
        lines += [json.loads(x) for x in call.chunk().splitlines()]
    gen.finish_reason = FinishReason.LENGTH
    lines += [json.loads(x) for x in call.final().splitlines()]
    entries = [e for line in lines for e in line.get("logprobs", [])]
    assert [e["token_id"] for e in entries] == ids
    assert "".join(line["text"] for line in lines) == continuation
    last = lines[-1]
    assert [e["token_id"] for e in last["prompt_logprobs"]] == list(gen.request.prompt_ids)
    first, second = last["prompt_logprobs"][:2]
    assert first["logprob"] is None and first["top_logprobs"] is None and len(second["top_logprobs"]) == 2
    whole = json.loads(responses.final(prompt, gen, False, strings))
    assert whole["logprobs"] == entries and whole["prompt_logprobs"] == last["prompt_logprobs"]
    assert entries[0] == {"token": strings.string(ids[0]), "token_id": ids[0], "logprob": -0.1, "offset": 0,
                          "top_logprobs": [{"token": strings.string(ids[0] + 1), "token_id": ids[0] + 1,
                                            "logprob": -0.05},
                                           {"token": strings.string(ids[0] + 2), "token_id": ids[0] + 2,
                                            "logprob": -0.5}]}
