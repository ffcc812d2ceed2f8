"""The handler in-process through a TorchServe context and a frontend that behaves as TorchServe's does.

The tiny model on the CPU in float32. `tests.ts_context.Frontend` plays
TorchServe's part: with continuous batching (the shipped model-config.yaml) it
calls the handler again and again with the open jobs until every request got
its final answer; run to completion, one call per batch.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.serving.handlers import local, make_handler, run


def test_initialize_cpu_float32_pool_and_tokenizer_from_folder(handler):
    assert handler.device == torch.device("cpu")
    assert handler.loaded.model.dtype == torch.float32
    assert handler.loaded.eos_ids == (handler.loaded.tokenizer.eos_token_id,)
    assert handler.admission.step_ms is not None and handler.admission.step_ms > 0
    assert handler.memory_report["gpu"] is False
    pool = handler.engine.shape
    assert (pool.max_slots, pool.max_len, pool.max_top_k) == (8, 64 + 96, 16)  # batchSize; prompt + new tokens
    assert handler.memory_report["slot_pool_mib"] == round(handler.engine.pool.nbytes() / 2**20, 1)
    assert handler.settings.continuous_batching


def test_default_request_is_contrastive_search(handler):
    codes, answers, _ = run(handler, [{"prompt": "你是谁?"}])
    assert codes == [200]
    answer = answers[0]
    expected = local(handler, "你是谁?")  # decoding=contrastive, alpha 0.6, k 4
    assert answer["completion_tokens"] == len(expected.tokens)
    assert answer["finish_reason"] == str(expected.finish_reason)
    assert answer["generated_text"] == expected.text.text()
    assert answer["full_text"] == "你是谁?" + answer["generated_text"]
    assert answer["prompt_tokens"] == len(handler.loaded.tokenizer.encode("你是谁?"))
    assert "seed" not in answer  # nothing random


BODIES = [
    {"prompt": "Hello, how are you today?", "max_new_tokens": 12, "return_token_ids": True},
    {"prompt": "你好", "max_new_tokens": 20, "decoding": "greedy", "return_token_ids": True},
    {"prompt": "A journey of a thousand miles", "top_k": 6, "penalty_alpha": 0.3, "max_new_tokens": 9,
     "return_token_ids": True},
    {"prompt": "春天来了", "decoding": "sample", "seed": 11, "temperature": 0.8, "max_new_tokens": 15,
     "return_token_ids": True},
]


@pytest.mark.parametrize("which", ["handler", "static_handler"])
def test_batch_answers_in_order_and_independent_of_the_batch(request, which):
    h = request.getfixturevalue(which)
    codes, answers, _ = run(h, BODIES)
    assert codes == [200] * 4
    for body, answer in zip(BODIES, answers):
        fields = {k: v for k, v in body.items() if k not in ("prompt", "return_token_ids")}
        assert answer["token_ids"] == local(h, body["prompt"], **fields).tokens  # same tokens alone
    assert answers[3]["seed"] == 11


def test_a_short_request_finishes_while_a_long_one_goes_on(handler):
    """Continuous batching: the short request's answer comes calls before the long one's."""
    bodies = [{"prompt": "long", "decoding": "greedy", "max_new_tokens": 90, "ignore_eos": True},
              {"prompt": "short", "decoding": "greedy", "max_new_tokens": 3, "ignore_eos": True}]
    codes, _, chunks = run(handler, bodies)
    assert codes == [200, 200]
    # calls until each got its final answer: the short one's in the first call (its 3 tokens come with the first
    # look), the long one's later (a call ends at the first tokens); how much later depends on the machine's speed
    assert len(chunks[1]) == 1 < len(chunks[0])
    assert json.loads(chunks[1][-1])["completion_tokens"] == 3


def test_a_client_that_goes_away_frees_its_slot(handler):
    """The handler learns that a client went away from the next call, which no longer carries its job:
    the job is cancelled there, before anything new is admitted (TorchServe calls the worker again only
    while jobs are open or new ones arrive)."""
    before = handler.engine.stats()
    hung_up = f"request-{handler.frontend.served}"
    bodies = [{"prompt": "I will hang up", "decoding": "greedy", "max_new_tokens": 90, "stream": True,
               "ignore_eos": True},
              {"prompt": "I stay", "decoding": "greedy", "max_new_tokens": 30, "ignore_eos": True}]
    # the client goes away after its first chunk, which comes with the first call (it ends at the first tokens):
    # "I stay" is still running then, so the frontend calls again and the handler sees the job gone
    codes, answers, chunks = run(handler, bodies, drop={0: 1})
    assert codes == [200, 200] and len(chunks[0]) == 1
    assert answers[1]["completion_tokens"] == 30
    generated = handler.engine.stats().generated_tokens - before.generated_tokens
    codes, _, _ = run(handler, [{"prompt": "next", "decoding": "greedy", "max_new_tokens": 1}])  # the next call
    after = handler.engine.stats()
    assert codes == [200] and after.slots_in_use == 0 and after.waiting == 0  # its slot is free again
    assert generated < 90 + 30  # it stopped generating
    assert handler.engine.get(hung_up) is None and not handler.loop.jobs  # forgotten


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


def test_length_beyond_positions_is_400_before_generation(wide_handler):
    prompt = "one two three " * 25
    n_prompt = len(wide_handler.loaded.tokenizer.encode(prompt))
    assert 112 < n_prompt <= 500
    steps = wide_handler.engine.stats().steps
    codes, answers, _ = run(wide_handler, [{"prompt": prompt, "max_new_tokens": 400}])
    assert codes == [400] and answers[0]["field"] == "max_new_tokens"
    assert f"at most {512 - n_prompt} new tokens" in answers[0]["message"]
    assert wide_handler.engine.stats().steps == steps and not wide_handler.engine.busy  # never reached the engine


def test_prompt_over_the_limit_is_400(handler):
    codes, answers, _ = run(handler, [{"prompt": "春天来了，花开了。" * 40}])
    assert codes == [400]
    assert answers[0]["field"] == "prompt" and "the limit is 64" in answers[0]["message"]


def test_stop_string_cuts_text_and_reports_stop(handler):
    base = local(handler, "你好", decoding="greedy", max_new_tokens=30)
    text = base.text.text()
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


def test_ignore_eos_generates_past_the_end_of_text(handler):
    """The trained tiny model ends its answer to "你是谁?" well before 90 tokens; ignore_eos goes on."""
    body = {"prompt": "你是谁?", "decoding": "greedy", "max_new_tokens": 90, "return_token_ids": True}
    codes, answers, _ = run(handler, [body, {**body, "ignore_eos": True}])
    assert codes == [200, 200], answers
    ended, forced = answers
    assert ended["finish_reason"] == "eos" and ended["completion_tokens"] < 90
    assert forced["finish_reason"] == "length" and forced["completion_tokens"] == 90
    assert forced["token_ids"][:len(ended["token_ids"])] == ended["token_ids"]  # the same text up to the eos


def test_streaming_chunks_join_to_the_final_text(handler):
    codes, answers, chunks = run(handler, [{"prompt": "你是谁?", "stream": True, "max_new_tokens": 60},
                                           {"prompt": "not streamed", "max_new_tokens": 60}])
    assert codes == [200, 200]
    final = answers[0]
    lines = [json.loads(line) for c in chunks[0] for line in c.splitlines() if line.strip()]
    assert len(lines) >= 2  # chunks went out before the final answer
    assert "".join(line["text"] for line in lines) == final["generated_text"]
    assert answers[1]["generated_text"] and "text" not in answers[1]
    assert all(c == "" for c in chunks[1][:-1])  # a request not streamed gets its answer at the end only


def test_streaming_run_to_completion_sends_intermediate_responses(static_handler):
    codes, answers, _ = run(static_handler, [{"prompt": "你是谁?", "stream": True, "max_new_tokens": 60}])
    assert codes == [200]
    streamed = static_handler.frontend.context.cl_socket.chunks()
    assert len(streamed) >= 1
    assert "".join(c["text"] for c in streamed) + answers[0]["text"] == answers[0]["generated_text"]


def test_out_of_memory_in_a_prefill_is_507_and_neighbours_survive(handler, monkeypatch):
    import handler.engine.runner as runner

    real = runner.prefill_slot

    def oom_for_b(model, pool, slot, prompt_ids, *args):
        if prompt_ids == handler.loaded.tokenizer.encode("b"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, pool, slot, prompt_ids, *args)

    monkeypatch.setattr(runner, "prefill_slot", oom_for_b)
    codes, answers, _ = run(handler, [{"prompt": "a", "max_new_tokens": 5}, {"prompt": "b", "max_new_tokens": 30},
                                      {"prompt": "c", "max_new_tokens": 6}])
    assert codes == [200, 507, 200]
    assert answers[1]["code"] == 507 and "out of memory" in answers[1]["message"]
    monkeypatch.setattr(runner, "prefill_slot", real)
    codes, _, _ = run(handler, [{"prompt": "b", "max_new_tokens": 30}])
    assert codes == [200]


def test_describe_reports_no_gpu_the_pool_and_the_load(handler):
    report = json.loads(handler.describe_handle())
    assert report["device"] == "cpu"
    assert report["memory"]["gpu"] is False and "no GPU" in report["memory"]["note"]
    assert report["limits"]["max_new_tokens"] == 96
    assert report["scheduling"] == "continuous"
    assert report["pool"]["max_slots"] == 8 and report["load"]["slots_in_use"] == 0
    assert report["load"]["generated_tokens"] > 0


def test_unexpected_failure_in_a_step_is_500_for_the_live_requests_only(static_handler, monkeypatch):
    import handler.engine.runner as runner

    def broken(*args, **kw):
        raise ValueError("a bug")

    monkeypatch.setattr(runner, "decode_one_token", broken)
    codes, answers, _ = run(static_handler, [{"prompt": "a", "max_new_tokens": 5}, {"prompt": "b", "top_k": 1}])
    assert codes == [500, 400]  # the bad request keeps its own 400
    assert answers[0]["code"] == 500 and "ValueError" in answers[0]["message"]
    monkeypatch.undo()
    codes, _, _ = run(static_handler, [{"prompt": "a", "max_new_tokens": 5}])
    assert codes == [200]  # the engine serves again
