"""The handler in-process through a TorchServe context object, on the tiny model (CPU, float32)."""

from __future__ import annotations

import json

import pytest
import torch

from handler.engine.decoding import RowRequest, generate
from handler.gpt2_handler import ContrastiveGPT2Handler
from handler.engine.params import GenerationParams
from gpt2ops.local_server import model_config
from tests.ts_context import make_context, start_batch, statuses

JSON = {"Content-Type": "application/json"}


def make_handler(model_dir, **overrides) -> ContrastiveGPT2Handler:
    """A handler initialised as the worker does it, keeping its context for the batches of a test."""
    context = make_context(model_dir, model_config(**overrides))
    h = ContrastiveGPT2Handler()
    h.initialize(context)
    h.test_context = context
    return h


@pytest.fixture(scope="module")
def handler(tiny_model_dir):
    return make_handler(tiny_model_dir, warmup=True, limits={"max_prompt_tokens": 64, "max_new_tokens": 96})


def run(handler, bodies, headers=None):
    """One batch through handler.handle; returns (statuses, decoded answers, streamed chunks)."""
    headers = headers or [JSON] * len(bodies)
    context = handler.test_context
    sock = start_batch(context, headers)
    data = [{"body": b} for b in bodies]
    out = handler.handle(data, context)
    answers = []
    for text in out:
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        answers.append(lines[-1] if lines else None)
    return statuses(context), answers, sock.chunks()


def local(handler, prompt, **fields):
    """What the engine gives for one prompt alone, outside the handler."""
    params = GenerationParams.from_request(fields, defaults=handler.settings.defaults, limits=handler.settings.limits,
                                           vocab_size=handler.model.vocab_size)
    ids = handler.tokenizer.encode(prompt)
    row = RowRequest(ids, params, handler.eos_ids, params.seed or 0)
    return generate(handler.model, [row])[0]


def test_initialize_cpu_float32_and_tokenizer_from_folder(handler):
    assert handler.device == torch.device("cpu")
    assert handler.model.dtype == torch.float32
    assert handler.eos_ids == (handler.tokenizer.eos_token_id,)
    assert handler.step_ms is not None and handler.step_ms > 0
    assert handler.memory_report["gpu"] is False


def test_default_request_is_contrastive_search(handler):
    codes, answers, _ = run(handler, [{"prompt": "你是谁?"}])
    assert codes == [200]
    answer = answers[0]
    expected = local(handler, "你是谁?")  # decoding=contrastive, alpha 0.6, k 4
    assert answer["completion_tokens"] == len(expected.tokens)
    assert answer["finish_reason"] == expected.finish_reason
    assert answer["generated_text"] == handler.tokenizer.decode(expected.tokens, skip_special_tokens=True,
                                                                clean_up_tokenization_spaces=False)
    assert answer["full_text"] == "你是谁?" + answer["generated_text"]
    assert answer["prompt_tokens"] == len(handler.tokenizer.encode("你是谁?"))
    assert "seed" not in answer  # nothing random


def test_batch_answers_in_order_and_independent_of_batch(handler):
    bodies = [
        {"prompt": "Hello, how are you today?", "max_new_tokens": 12, "return_token_ids": True},
        {"prompt": "你好", "max_new_tokens": 20, "decoding": "greedy", "return_token_ids": True},
        {"prompt": "A journey of a thousand miles", "top_k": 6, "penalty_alpha": 0.3, "max_new_tokens": 9,
         "return_token_ids": True},
        {"prompt": "春天来了", "decoding": "sample", "seed": 11, "temperature": 0.8, "max_new_tokens": 15,
         "return_token_ids": True},
    ]
    codes, answers, _ = run(handler, bodies)
    assert codes == [200] * 4
    for body, answer in zip(bodies, answers):
        alone_codes, alone, _ = run(handler, [body])
        assert alone_codes == [200]
        assert answer["token_ids"] == alone[0]["token_ids"]  # same tokens alone and inside the padded batch
        fields = {k: v for k, v in body.items() if k not in ("prompt", "return_token_ids")}
        assert answer["token_ids"] == local(handler, body["prompt"], **fields).tokens
    assert answers[3]["seed"] == 11


def test_bad_request_fails_alone_in_its_batch(handler):
    bodies = [{"prompt": "你好", "max_new_tokens": 5}, {"prompt": "hi", "top_k": 1}, {"prompt": "  "},
              {"prompt": "ok", "max_new_tokens": 5}]
    codes, answers, _ = run(handler, bodies)
    assert codes == [200, 400, 400, 200]
    assert answers[1] == {"code": 400, "type": "InvalidRequest", "field": "top_k",
                          "message": "top_k must be >= 2, got 1"}
    assert answers[2]["field"] == "prompt"
    assert answers[0]["completion_tokens"] == 5 and answers[3]["completion_tokens"] == 5


def test_plain_text_body_is_a_prompt_with_defaults(handler):
    codes, answers, _ = run(handler, ["Who are you?"], headers=[{"Content-Type": "text/plain"}])
    assert codes == [200]
    assert answers[0]["full_text"].startswith("Who are you?")
    assert answers[0]["completion_tokens"] == handler.settings.defaults.max_new_tokens or \
        answers[0]["finish_reason"] == "eos"


@pytest.fixture(scope="module")
def wide_handler(tiny_model_dir):
    """Limits wider than the model's 512 positions, so that the position check is what refuses."""
    return make_handler(tiny_model_dir, warmup=False, limits={"max_prompt_tokens": 500, "max_new_tokens": 400})


def test_length_beyond_positions_is_400_before_generation(wide_handler, monkeypatch):
    called = []
    monkeypatch.setattr("handler.gpt2_handler.generate", lambda *a, **k: called.append(1))
    prompt = "one two three " * 25
    n_prompt = len(wide_handler.tokenizer.encode(prompt))
    assert 112 < n_prompt <= 500
    codes, answers, _ = run(wide_handler, [{"prompt": prompt, "max_new_tokens": 400}])
    assert codes == [400] and answers[0]["field"] == "max_new_tokens"
    assert f"at most {512 - n_prompt} new tokens" in answers[0]["message"]
    assert called == []


def test_prompt_over_the_limit_is_400(handler):
    codes, answers, _ = run(handler, [{"prompt": "春天来了，花开了。" * 40}])
    assert codes == [400]
    assert answers[0]["field"] == "prompt" and "the limit is 64" in answers[0]["message"]


def test_stop_string_cuts_text_and_reports_stop(handler):
    base = local(handler, "你好", decoding="greedy", max_new_tokens=30)
    text = handler.tokenizer.decode(base.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    stop = next(text[i:i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    codes, answers, _ = run(handler, [{"prompt": "你好", "decoding": "greedy", "max_new_tokens": 30,
                                       "stop": [stop], "return_token_ids": True}])
    assert codes == [200]
    answer = answers[0]
    assert answer["finish_reason"] == "stop"
    assert answer["generated_text"] == text[: text.find(stop)]
    assert stop not in answer["generated_text"]
    assert answer["token_ids"] == base.tokens[: len(answer["token_ids"])]
    assert answer["completion_tokens"] == len(answer["token_ids"]) < len(base.tokens)


def test_streaming_chunks_join_to_the_final_text(handler):
    codes, answers, chunks = run(handler, [{"prompt": "你是谁?", "stream": True, "max_new_tokens": 30},
                                           {"prompt": "not streamed", "max_new_tokens": 30}])
    assert codes == [200, 200]
    final = answers[0]
    assert len(chunks) >= 2  # intermediate messages went out before the final answer
    assert "".join(c["text"] for c in chunks) + final["text"] == final["generated_text"]
    assert answers[1]["generated_text"] and "text" not in answers[1]


def test_out_of_memory_is_507_and_neighbours_survive(handler, monkeypatch):
    real = generate

    def oom_for_long_requests(model, rows, **kw):
        if any(r.params.max_new_tokens > 20 for r in rows):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, rows, **kw)

    monkeypatch.setattr("handler.gpt2_handler.generate", oom_for_long_requests)
    codes, answers, _ = run(handler, [{"prompt": "a", "max_new_tokens": 5}, {"prompt": "b", "max_new_tokens": 30},
                                      {"prompt": "c", "max_new_tokens": 6}])
    assert codes == [200, 507, 200]  # the batch is retried row by row: only the request that does not fit fails
    assert answers[1]["code"] == 507 and "out of memory" in answers[1]["message"]
    monkeypatch.setattr("handler.gpt2_handler.generate", real)
    codes, _, _ = run(handler, [{"prompt": "b", "max_new_tokens": 30}])
    assert codes == [200]


def test_describe_reports_no_gpu_on_cpu(handler):
    report = json.loads(handler.describe_handle())
    assert report["device"] == "cpu"
    assert report["memory"]["gpu"] is False and "no GPU" in report["memory"]["note"]
    assert report["limits"]["max_new_tokens"] == 96


def test_unexpected_failure_is_500_for_its_sub_batch_only(handler, monkeypatch):
    def broken(model, rows, **kw):
        raise ValueError("a bug")

    monkeypatch.setattr("handler.gpt2_handler.generate", broken)
    codes, answers, _ = run(handler, [{"prompt": "a", "max_new_tokens": 5}, {"prompt": "b", "top_k": 1}])
    assert codes == [500, 400]  # the bad request keeps its own 400
    assert answers[0]["code"] == 500 and "ValueError" in answers[0]["message"]
