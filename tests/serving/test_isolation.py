"""Isolation by construction: a fault anywhere on one request's way costs that request alone.

Faults are injected at each place a request passes (its reading, its route, the engine taking it, its
answer, the cancellation when its client went away, the metrics) and at the call as a whole; each time
the handler must return one answer per request (what TorchServe needs to answer each on its own), the
faulty request gets a 500 or 507 naming the worker log, its neighbours their right answers token for
token, and the engine ends idle. Under continuous batching a failed call must never reach TorchServe
as an exception: it would answer every job it has open with that error.
"""

from __future__ import annotations

import json

import pytest

from gpt2ops.expected import ExpectedAnswers
from handler.serving import responses
from tests.serving.test_fuzz import GOOD, LIMITS, lines
from tests.serving.handlers import make_handler, one_torch_thread


@pytest.fixture(scope="module")
def handler(tiny_model_dir):
    with one_torch_thread():
        yield make_handler(tiny_model_dir, warmup=False, limits=LIMITS, defaults={"max_new_tokens": 4})


@pytest.fixture(scope="module")
def static_handler(tiny_model_dir):
    return make_handler(tiny_model_dir, continuousBatching=False, warmup=False, limits=LIMITS,
                        defaults={"max_new_tokens": 4})


@pytest.fixture(scope="module")
def expected(handler, tiny_model_dir):
    answers = ExpectedAnswers(tiny_model_dir, defaults=handler.settings.defaults, limits=handler.settings.limits)
    return [answers(body).tokens for body in GOOD]


VICTIM = {"prompt": "the victim", "max_new_tokens": 6, "stream": True}


def serve(handler, bodies, **kw):
    statuses, texts, chunks = handler.frontend.serve(bodies, **kw)
    return statuses, [lines(t) for t in texts], chunks


def assert_good(statuses, answers, expected, indexes):
    for i, g in indexes.items():
        assert statuses[i] == 200, answers[i]
        assert answers[i][-1]["token_ids"] == expected[g]


def assert_idle(handler):
    stats = handler.engine.stats()
    assert (stats.slots_in_use, stats.waiting, handler.engine.tracked, handler.loop.jobs) == (0, 0, 0, {})


def is_victim(request) -> bool:
    return request.prompt_ids == VICTIM_IDS


VICTIM_IDS: list[int] = []


@pytest.fixture(autouse=True)
def victim_ids(handler):
    VICTIM_IDS[:] = handler.loaded.tokenizer.encode(VICTIM["prompt"])


def test_a_fault_while_the_engine_takes_one_request_fails_it_alone(handler, expected, monkeypatch):
    real = handler.engine.submit

    def submit(request):
        if is_victim(request):
            raise RuntimeError("a bug in submit")
        return real(request)

    monkeypatch.setattr(handler.engine, "submit", submit)
    statuses, answers, _ = serve(handler, [GOOD[0], VICTIM, GOOD[3]])
    assert statuses[1] == 500 and answers[1][-1]["field"] == "body"
    assert "RuntimeError" in answers[1][-1]["message"] and "worker log" in answers[1][-1]["message"]
    assert_good(statuses, answers, expected, {0: 0, 2: 3})
    assert_idle(handler)


def test_a_fault_in_reading_one_request_fails_it_alone(handler, expected, monkeypatch):
    tokenizer = handler.native.engine_requests.tokenizer
    real = tokenizer.encode

    def encode(text, *args, **kw):
        if text == VICTIM["prompt"]:
            raise MemoryError("the tokenizer ran out of memory")
        return real(text, *args, **kw)

    monkeypatch.setattr(tokenizer, "encode", encode)
    statuses, answers, _ = serve(handler, [VICTIM, GOOD[1]])
    assert statuses[0] == 500 and "MemoryError" in answers[0][-1]["message"]
    assert_good(statuses, answers, expected, {1: 1})
    assert_idle(handler)


def test_a_fault_in_a_route_fails_that_request_alone(handler, expected, monkeypatch):
    def broken():
        raise KeyError("report")

    monkeypatch.setitem(handler.loop.routes._routes, "describe", broken)
    headers = [{"Content-Type": "application/json", "url_path": "describe"}, {"Content-Type": "application/json"}]
    statuses, answers, _ = serve(handler, [{}, GOOD[0]], headers=headers)
    assert statuses[0] == 500 and "KeyError" in answers[0][-1]["message"]
    assert_good(statuses, answers, expected, {1: 0})


@pytest.mark.parametrize("when", ["chunk", "final"])
def test_a_fault_while_answering_one_request_fails_it_alone_and_frees_its_slot(handler, expected, monkeypatch, when):
    real = getattr(responses, when)

    def broken(*args):
        gen = args[0] if when == "chunk" else args[1]
        if is_victim(gen.request):
            raise ValueError(f"a bug in responses.{when}")
        return real(*args)

    monkeypatch.setattr(responses, when, broken)
    victim = {**VICTIM, "max_new_tokens": 8}
    statuses, answers, chunks = serve(handler, [GOOD[2], victim, GOOD[3]])
    assert_good(statuses, answers, expected, {0: 2, 2: 3})
    error = answers[1][-1]
    assert error["code"] == 500 and "ValueError" in error["message"] and "while answering" in error["message"]
    assert statuses[1] == (500 if len(chunks[1]) == 1 else 200)  # a stream already under way ends with the error
    assert_idle(handler)  # the victim's generation ended with its answer


def test_a_unencodable_answer_fails_that_request_alone(handler, expected, monkeypatch):
    real = responses.final

    def unencodable(prompt, gen, stream, *rest):
        return real(prompt, gen, stream, *rest) + ("\udc80" if is_victim(gen.request) else "")

    monkeypatch.setattr(responses, "final", unencodable)
    statuses, answers, _ = serve(handler, [{**VICTIM, "stream": False, "max_new_tokens": 3}, GOOD[0]])  # one call
    assert statuses[0] == 500 and "UnicodeEncodeError" in answers[0][-1]["message"]
    assert_good(statuses, answers, expected, {1: 0})


def test_a_fault_when_a_client_went_away_costs_the_others_nothing(handler, expected, monkeypatch):
    real = handler.engine.cancel

    def cancel(request_id, *args):
        real(request_id, *args)
        raise RuntimeError("a bug in cancel")

    monkeypatch.setattr(handler.engine, "cancel", cancel)
    long = {"prompt": "hang up", "max_new_tokens": 8, "stream": True, "decoding": "greedy"}
    statuses, answers, chunks = serve(handler, [long, {**GOOD[0], "max_new_tokens": 8}, GOOD[1]], drop={0: 1})
    assert statuses == [200, 200, 200] and len(chunks[0]) == 1
    assert answers[2][-1]["token_ids"] == expected[1]
    monkeypatch.undo()
    statuses, answers, _ = serve(handler, [GOOD[0]])
    assert_good(statuses, answers, expected, {0: 0})
    assert_idle(handler)


def test_metrics_that_fail_cost_no_answer(handler, expected, monkeypatch):
    def broken(*args, **kw):
        raise RuntimeError("metrics backend")

    monkeypatch.setattr(handler.metrics, "finished", broken)
    monkeypatch.setattr(handler.metrics, "rejected", broken)
    monkeypatch.setattr(handler.metrics, "flush", broken)
    statuses, answers, _ = serve(handler, [GOOD[0], GOOD[1], {"prompt": "x", "top_k": 0}])
    assert statuses[2] == 400
    assert_good(statuses[:2], answers[:2], expected, {0: 0, 1: 1})


@pytest.mark.parametrize("which", ["handler", "static_handler"])
def test_a_call_that_fails_as_a_whole_answers_each_request_with_its_own_error(request, expected, monkeypatch, which):
    """The engine's loop itself raises: not an exception for TorchServe (a message-level 503 that fails every
    open job), but one 500 per request of the call, each closed, and the next call is served."""
    h = request.getfixturevalue(which)
    monkeypatch.setattr(h.engine, "iterate", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("engine bug")))
    statuses, answers, _ = serve(h, [GOOD[0], {"prompt": "x", "top_k": 1}, GOOD[3]])
    assert statuses == [500, 500, 500]
    assert all(a[-1]["code"] == 500 and "RuntimeError" in a[-1]["message"] for a in answers)
    monkeypatch.undo()
    assert_idle(h)
    statuses, answers, _ = serve(h, [GOOD[0]])
    assert statuses == [200] and answers[0][-1]["token_ids"] == expected[0]


def test_a_call_that_fails_after_streams_opened_ends_each_stream_with_its_error(handler, monkeypatch):
    """Jobs already streaming have their status line out: the error is the last line of their body."""
    bodies = [{"prompt": "streams", "stream": True, "max_new_tokens": 8, "decoding": "greedy"},
              {"prompt": "plain", "max_new_tokens": 8, "decoding": "greedy"}]
    real, calls = handler.engine.iterate, []

    def iterate(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("engine bug on the second call")
        return real(*args, **kw)

    monkeypatch.setattr(handler.engine, "iterate", iterate)
    monkeypatch.setattr(handler.engine, "sync_every", 1)  # one token per look: both are still running after call 1
    statuses, answers, chunks = serve(handler, bodies)
    assert len(chunks[0]) == 2 and len(chunks[1]) == 2  # opened on the first call, closed on the second
    assert statuses == [200, 200]  # their status lines went out with the first call
    assert answers[0][-1]["code"] == 500 and "engine bug" not in answers[0][-1]["message"]  # the log has it
    assert json.loads(chunks[1][-1])["code"] == 500
    monkeypatch.undo()
    assert_idle(handler)
