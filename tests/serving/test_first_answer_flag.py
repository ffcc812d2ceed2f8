"""TorchServe 0.12.0's trap of a first and only answer with `ts_stream_next: false` (docs/engine.md, Traps).

The frontend sends a job's status line with its first answer; an answer flagged "false" ends a chunked body
that was never opened (Netty's `EncoderException`: the client gets nothing). The handler's answer path
(`ServingLoop._answer`, `_fail`) gives a job that is answered at once (an error, a route, a request done in its
first iteration) a plain answer with no flag, and "false" only to a job that got a chunk. Here each job's first
answer, through TorchServe's own `create_predict_response` (tests.ts_context.Frontend), is checked for the flag:
these tests fail if that code flags a first answer. The same shapes on the real server: tests/e2e/test_traps.py.
"""

from __future__ import annotations

import pytest
import torch

import handler.engine.runner as runner
from handler.serving import responses

NATIVE, OPENAI = "", "v1/completions"

ANSWERED_AT_ONCE = [  # (what, url_path, body, status)
    ("native: a bad field", NATIVE, {"prompt": "hi", "max_new_tokens": 0}, 400),
    ("native, streamed: a bad field", NATIVE, {"prompt": "hi", "top_k": 999, "stream": True}, 400),
    ("native: done in its first iteration", NATIVE, {"prompt": "hi", "max_new_tokens": 1}, 200),
    ("native, streamed: done in its first iteration", NATIVE, {"prompt": "hi", "max_new_tokens": 1, "stream": True},
     200),
    ("OpenAI: a bad field", OPENAI, {"prompt": "hi", "max_tokens": -1}, 400),
    ("OpenAI, streamed: a bad field", OPENAI, {"prompt": "hi", "temperature": "hot", "stream": True}, 400),
    ("OpenAI: done in its first iteration", OPENAI, {"prompt": "hi", "max_tokens": 1}, 200),
    ("OpenAI, streamed: done in its first iteration", OPENAI, {"prompt": "hi", "max_tokens": 1, "stream": True},
     200),
    ("an unknown route", "nope", {"prompt": "hi"}, 404),
    ("the describe route", "describe", {}, 200),
]


def serve(h, cases):
    """(first answers as (status, ts_stream_next), answers per request) of `cases` sent in one burst."""
    first = h.frontend.served
    headers = [{"Content-Type": "application/json", "url_path": path} for _, path, _, _ in cases]
    _, _, chunks = h.frontend.serve([body for _, _, body, _ in cases], headers)
    ids = [f"request-{first + i}" for i in range(len(cases))]
    return [h.frontend.first_answers[i] for i in ids], chunks


def test_a_job_answered_in_its_first_call_gets_a_plain_answer_never_the_closing_flag(handler):
    long = ("a stream that goes on (the flags are seen)", NATIVE, {"prompt": "hi", "max_new_tokens": 40,
                                                                  "ignore_eos": True, "stream": True}, 200)
    first, chunks = serve(handler, [long, *ANSWERED_AT_ONCE])
    assert first[0] == (200, "true") and len(chunks[0]) > 1  # a job that stays open: its first answer is a chunk
    for (what, *_, status), answer, got in zip(ANSWERED_AT_ONCE, first[1:], chunks[1:]):
        assert answer == (status, None), what  # its status, and no flag: a whole response
        assert len(got) == 1 and got[0], what  # one answer, with a body


@pytest.mark.parametrize("path", [NATIVE, OPENAI])
@pytest.mark.parametrize("stream", [False, True])
def test_a_job_that_fails_in_its_first_call_gets_a_plain_error_never_the_closing_flag(handler, monkeypatch,
                                                                                      path, stream):
    """`_fail`: the prefill out of memory (507), the answer failing to be made (500), the whole call failing (500)."""
    body = {"prompt": "hi", "stream": stream, **({"max_tokens": 1} if path else {"max_new_tokens": 1})}
    case = [("", path, body, 0)]
    real_prefill = runner.prefill_slot

    def oom(*args, **kw):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(runner, "prefill_slot", oom)
    assert serve(handler, case)[0] == [(507, None)]
    monkeypatch.setattr(runner, "prefill_slot", real_prefill)

    def broken(*args, **kw):
        raise RuntimeError("a bug")

    if not path:  # the native answer is made by handler.serving.responses
        monkeypatch.setattr(responses, "final", broken)
        assert serve(handler, case)[0] == [(500, None)]
        monkeypatch.undo()
    monkeypatch.setattr(handler.loop, "run", broken)  # the call fails as a whole: ServingLoop.fail_all
    assert serve(handler, case)[0] == [(500, None)]
    monkeypatch.undo()
    assert not handler.loop.jobs and not handler.engine.busy
