"""An OpenAI stream's last event carries the text held back while the generation ran.

A stream sends only text that can no longer change (handler.engine.text.IncrementalText): a trailing cut
multi-byte character (U+FFFD until its next token) and a tail that could still grow into a stop string are
held back. When the generation ends there, its last event must send them: the events join up to exactly
the non-streamed text. (test_openai_api.py's stream test ends its choices elsewhere.)
"""

from __future__ import annotations

import json

import pytest

from handler.engine.text import REPLACEMENT, detokenizer
from tests.serving.handlers import LIMITS, local, make_handler

PROMPTS = ["你是谁?", "春天来了", "你好", "中国的首都是", "Hello"]


@pytest.fixture(scope="module")
def handler(tiny_model_dir):
    return make_handler(tiny_model_dir, warmup=False, limits=LIMITS)


def complete(h, body: dict) -> str:
    headers = {"Content-Type": "application/json", "url_path": "v1/completions"}
    codes, bodies, _ = h.frontend.serve([body], [headers])
    assert codes == [200], bodies
    return bodies[0]


def streamed_text(text: str) -> tuple[str, str]:
    """(the events' texts joined, the finish reason) of an SSE body."""
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    joined, reason = "", None
    for block in text.split("\n\n")[:-2]:
        [choice] = json.loads(block[len("data: "):])["choices"]
        joined += choice["text"]
        reason = choice["finish_reason"] or reason
    return joined, reason


def plain_and_streamed(h, body: dict) -> tuple[dict, tuple[str, str]]:
    plain = json.loads(complete(h, body))["choices"][0]
    return plain, streamed_text(complete(h, {**body, "stream": True}))


def cut_character_case(h) -> tuple[str, int]:
    """A prompt and a max_tokens whose greedy text ends in a cut multi-byte character (found, not assumed)."""
    detokenize = detokenizer(h.loaded.tokenizer)
    for prompt in PROMPTS:
        tokens = local(h, prompt, decoding="greedy", max_new_tokens=40, ignore_eos=True).tokens
        for n in range(1, len(tokens) + 1):
            if detokenize(tokens[:n]).endswith(REPLACEMENT):
                return prompt, n
    pytest.fail(f"no greedy text of {PROMPTS} ends in a cut character: the test lost its premise")


def test_a_stream_ending_in_a_cut_character_joins_to_the_plain_text(handler):
    prompt, n = cut_character_case(handler)
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    plain, (joined, reason) = plain_and_streamed(handler, body)
    assert plain["text"].endswith(REPLACEMENT) and plain["finish_reason"] == "length"
    assert (joined, reason) == (plain["text"], "length")


def test_a_stream_ending_in_part_of_a_stop_string_joins_to_the_plain_text(handler):
    body = {"prompt": "Hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    text = json.loads(complete(handler, body))["choices"][0]["text"]
    tail = text.rstrip(REPLACEMENT)[-3:]
    assert tail.strip(), text  # the premise: a tail a stop string can begin with
    stop = tail + "\x07never"  # the text ends in the stop string's first characters; it never completes
    plain, (joined, reason) = plain_and_streamed(handler, {**body, "stop": stop})
    assert plain == {**plain, "text": text, "finish_reason": "length"}
    assert (joined, reason) == (text, "length")
