"""TorchServe 0.12.0's continuous-batching traps, on the real server (docs/engine.md, Traps).

A worker that dies between two iterations: 0.12.0's `WorkerThread` answers only the call in flight and
drops the other open jobs, whose clients (a 200 and half a stream) then wait for ever. With the frontend
as `scripts/serve.sh` starts it (gpt2ops/frontend_patch.py), the open jobs go back to the model's queue
and the restarted worker answers each with an error line that ends its body (handler.serving.orphans).
The fault `exit-after-answer` takes that path every time: the worker sends its answers and ends its
connection at once, so the frontend learns of the death with no call in flight. The fault `exit-soon`
kills the worker during an iteration, the other path: the frontend answers the call's jobs itself."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from gpt2ops.local_server import build_archive, model_config
from tests.e2e.conftest import MODEL

GAP_MODEL = "tiny-gap"
GAP_CONFIG = {"fault_injection": True, "maxBatchDelay": 500, "iteration_ms": 2}
ANSWERED_WITHIN_S = 75  # the worker's restart and load (39 s measured on a 2-core machine shared by 4 sessions)
CLIENT_TIMEOUT_S = 150  # a client left waiting shows as a timeout well past ANSWERED_WITHIN_S
OPENAI = f"{MODEL}/1.0/v1/completions"
MOST_NEW_TOKENS = 480  # the tiny model has 512 positions: the open requests must outlive the killer's 0.3 s


@pytest.fixture(scope="module")
def gap_model(server, model_store, tiny_model_dir):
    build_archive(tiny_model_dir, GAP_MODEL, model_store, model_config(**GAP_CONFIG))
    server.client.register(f"{GAP_MODEL}.mar", GAP_MODEL, workers=1)
    yield GAP_MODEL
    server.client.unregister(GAP_MODEL)


def _collect(client, path: str, body: dict, headers: dict | None = None,
             started: threading.Event | None = None) -> tuple[int | None, str, float]:
    """(status, whole body, seconds) of a streamed request read to its end; status None: the connection broke.
    `started` is set at the first chunk (or at the end)."""
    start = time.monotonic()
    chunks = []
    try:
        r = requests.post(f"{client.inference_url}/predictions/{path}", json=body, stream=True, timeout=CLIENT_TIMEOUT_S,
                          headers={"Authorization": f"Bearer {client.key('inference')}", **(headers or {})})
        for chunk in r.iter_content(chunk_size=None):
            chunks.append(chunk)
            if started is not None:
                started.set()
        return r.status_code, b"".join(chunks).decode("utf-8", "replace"), time.monotonic() - start
    except requests.RequestException as err:
        return None, repr(err), time.monotonic() - start
    finally:
        if started is not None:
            started.set()


BETWEEN_TRIES = 3  # the frontend may still win the race with the death notice (see the test)


def _kill_with_open_clients(server, gap_model: str, fault: str) -> list[tuple[str, int | None, str, float]]:
    """Three clients open (native streamed and not, OpenAI streamed), then a request with `fault` kills the
    worker; waits for its restart. Returns (path, status, body, seconds) per open client."""
    client = server.client
    [worker] = server.workers(gap_model)
    most = min(MOST_NEW_TOKENS, client.report(gap_model)["max_new_tokens_within_timeout"])
    long = {"max_new_tokens": most, "decoding": "greedy", "ignore_eos": True}
    requests_ = [
        (gap_model, {"prompt": "流一", "stream": True, **long}),
        (gap_model, {"prompt": "整一", **long}),
        (f"{gap_model}/1.0/v1/completions", {"prompt": "开放", "stream": True, "max_tokens": most, "ignore_eos": True}),
    ]
    first_chunks = [threading.Event() for _ in requests_]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(_collect, client, path, body, None, started)
                   for (path, body), started in zip(requests_, first_chunks)]
        for (path, body), started in zip(requests_, first_chunks):
            if body.get("stream"):  # the streams have begun, so all three are open (the unstreamed one went first)
                assert started.wait(60), f"{path}: no first chunk"
        killer = pool.submit(_collect, client, gap_model, {"prompt": "死", **long}, {"X-Fault-Injection": fault})
        results = [(path, *f.result()) for f, (path, _) in zip(futures, requests_)]
        killer.result()
    print(f"\nworker died ({fault}):", [(path, status, round(seconds, 2), text[-120:])
                                       for path, status, text, seconds in results])
    deadline = time.monotonic() + ANSWERED_WITHIN_S
    while server.workers(gap_model)[0]["pid"] == worker["pid"] and time.monotonic() < deadline:
        time.sleep(0.5)  # the frontend restarts the worker
    assert server.workers(gap_model)[0]["pid"] != worker["pid"]
    assert client.generate(gap_model, "after", max_new_tokens=4)["completion_tokens"] >= 1
    return results


def test_a_worker_dying_between_two_iterations_ends_every_open_clients_body_cleanly(server, gap_model):
    """`exit-after-answer`: the worker sends its answers, ends its connection and exits. The frontend takes the
    between-iterations path when the death notice (its I/O thread) reaches the worker thread before that thread
    has sent the next call; when the thread is faster it takes the during-iteration path instead (every client
    answered or cut, as in the next test). The race is 0.12.0's; the scenario is tried up to BETWEEN_TRIES times."""
    for _ in range(BETWEEN_TRIES):
        results = _kill_with_open_clients(server, gap_model, "exit-after-answer")
        for path, status, text, seconds in results:
            assert seconds < ANSWERED_WITHIN_S, (path, seconds, text[-300:])  # nobody waits until its own timeout
        if not any("the worker serving this request died" in text for _, _, text, _ in results):
            continue  # the during-iteration path: no restarted worker answered; the frontend's own error or a cut
        for path, status, text, _ in results:  # between two iterations: the restarted worker ends each body
            assert status == 200, (path, status, text[-300:])
            assert "the worker serving this request died" in text, (path, text[-300:])
            assert text.endswith("data: [DONE]\n\n" if "/v1/" in path else "retry it\"}\n"), (path, text[-300:])
        return
    pytest.skip(f"the frontend took the during-iteration path {BETWEEN_TRIES} times (every client was answered "
                "within the bound each time); the between-iterations path was not reached this run")


def test_a_worker_dying_during_an_iteration_answers_or_cuts_every_open_client(server, gap_model):
    for path, status, text, seconds in _kill_with_open_clients(server, gap_model, "exit-soon"):
        assert seconds < ANSWERED_WITHIN_S, (path, seconds, text[-300:])  # nobody waits until its own timeout
        assert status in (200, 500, 503, 507, None), (path, status, text[-300:])


# ---- a job whose first and only answer would carry `ts_stream_next: false` ----

ANSWERED_IN_ONE_CALL = [  # (what, path under /predictions/, body, status): each answered by the worker's first call
    ("native: a bad field", MODEL, {"prompt": "hi", "max_new_tokens": 0}, 400),
    ("native, streamed: a bad field", MODEL, {"prompt": "hi", "top_k": 999, "stream": True}, 400),
    ("native: one token", MODEL, {"prompt": "hi", "max_new_tokens": 1}, 200),
    ("native, streamed: one token", MODEL, {"prompt": "hi", "max_new_tokens": 1, "stream": True}, 200),
    ("OpenAI: a bad field", OPENAI, {"prompt": "hi", "max_tokens": -1}, 400),
    ("OpenAI, streamed: a bad field", OPENAI, {"prompt": "hi", "temperature": "hot", "stream": True}, 400),
    ("OpenAI: one token", OPENAI, {"prompt": "hi", "max_tokens": 1}, 200),
    ("OpenAI, streamed: one token", OPENAI, {"prompt": "hi", "max_tokens": 1, "stream": True}, 200),
]


def _whole_body(client, path: str, body: dict) -> tuple[int, str]:
    """(status, body) of a request read to its end; raises when the status line or a part of the body is missing
    (urllib3 checks Content-Length and the chunked body's last chunk)."""
    r = requests.post(f"{client.inference_url}/predictions/{path}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {client.key('inference')}"})
    return r.status_code, r.content.decode("utf-8")


def test_a_request_answered_in_its_first_call_gets_a_status_line_and_a_whole_body(client):
    with ThreadPoolExecutor(max_workers=len(ANSWERED_IN_ONE_CALL)) as pool:  # together: some share a call
        answers = list(pool.map(lambda case: _whole_body(client, case[1], case[2]), ANSWERED_IN_ONE_CALL))
    for (what, path, body, status), (got, text) in zip(ANSWERED_IN_ONE_CALL, answers):
        assert got == status, (what, got, text)
        if status != 200:
            assert json.loads(text).get("message") or json.loads(text)["error"]["message"], (what, text)
        elif path == OPENAI and body.get("stream"):
            assert text.endswith("data: [DONE]\n\n") and '"finish_reason": "length"' in text, (what, text)
        elif path == OPENAI:
            assert json.loads(text)["usage"]["completion_tokens"] == 1, (what, text)
        else:
            assert json.loads(text.splitlines()[-1])["completion_tokens"] == 1, (what, text)


# ---- an error after a stream's first chunk ----

def test_an_error_after_a_streams_first_chunk_ends_it_cleanly_and_spares_its_neighbour(server, gap_model):
    """The engine fails a request after its first chunk went out (fault `fail-after-first-chunk`): the native
    stream ends with its JSON error line, the OpenAI stream with an error event and `[DONE]`, each body ends
    (no reset: `_collect` reports a broken connection as status None), and the request beside them in the
    same call (maxBatchDelay 500 ms gathers the three) gets its whole answer."""
    fail = {"X-Fault-Injection": "fail-after-first-chunk"}
    long = {"ignore_eos": True, "decoding": "greedy"}
    cases = [
        (gap_model, {"prompt": "流一", "stream": True, "max_new_tokens": 64, **long}, fail),
        (f"{gap_model}/1.0/v1/completions", {"prompt": "开放", "stream": True, "max_tokens": 64, **long}, fail),
        (gap_model, {"prompt": "邻居", "stream": True, "max_new_tokens": 64, **long}, None),
    ]
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        (native, native_text, _), (openai, openai_text, _), (neighbour, neighbour_text, _) = pool.map(
            lambda case: _collect(server.client, *case), cases)
    assert native == 200, native_text  # the status line went out with the first chunk: the error came after it
    *chunks, last = [json.loads(line) for line in native_text.splitlines()]
    assert all(set(c) == {"text"} for c in chunks), native_text
    assert last["code"] == 500 and "internal error during generation (RuntimeError)" in last["message"], last
    assert openai == 200, openai_text
    events = openai_text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], openai_text[-300:]
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "RuntimeError" in error["message"], error
    assert all("choices" in json.loads(e.removeprefix("data: ")) for e in events[:-3]), openai_text[-300:]
    assert neighbour == 200 and json.loads(neighbour_text.splitlines()[-1])["completion_tokens"] == 64, neighbour_text
    print(f"\nerror after the first chunk: native {len(chunks)} text lines then the error line, OpenAI "
          f"{len(events) - 3} events then the error event and [DONE]; the neighbour got its 64 tokens")


# ---- a client that leaves a request that is not streamed ----

FREED_WITHIN_S = 1.0  # one iteration (25 ms) and the frontend's round trip, with room for a loaded 2-core machine
CANCELLED = re.compile(r"request (\S+): the client went away after (\d+) tokens; its slot is free")


def test_a_client_leaving_an_unstreamed_request_frees_its_slot_within_an_iteration(server, client):
    """The worker answers an unstreamed job with an empty chunk each call, so the frontend sees the closed
    connection at the next call and drops the job; the handler cancels it at the call after (its log line).
    A streamed neighbour keeps the worker called (with no open job left the frontend calls the worker only
    when a request comes: the slot is then freed before that request is admitted)."""
    slow = {"prompt": "走开", "max_new_tokens": 256, "top_k": 16, "ignore_eos": True}
    # the neighbour asks for as many tokens as the tiny model's positions allow, to outlive the cancellation
    # on a fast machine too
    neighbour_tokens = min(MOST_NEW_TOKENS, client.report(MODEL)["max_new_tokens_within_timeout"])
    log = server.run_dir / "logs" / "model_log.log"
    offset = log.stat().st_size
    began = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        neighbour = pool.submit(_collect, client, MODEL, {**slow, "prompt": "留下", "stream": True,
                                                          "max_new_tokens": neighbour_tokens}, None, began)
        assert began.wait(60), "the neighbour got no first chunk"
        host, port = urlsplit(client.inference_url).hostname, urlsplit(client.inference_url).port
        body = json.dumps(slow, ensure_ascii=False).encode()
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(f"POST /predictions/{MODEL} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                         f"Authorization: Bearer {client.key('inference')}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = b""
            while b"\r\n\r\n" not in head:  # the status line comes with the job's first (empty) chunk: it runs
                head += sock.recv(4096) or b"(closed)"
                assert not head.endswith(b"(closed)"), head
            assert head.startswith(b"HTTP/1.1 200"), head
            time.sleep(0.2)  # well into its generation
        left = time.monotonic()  # the socket is closed
        found = None
        while found is None and time.monotonic() - left < 30:
            with log.open("rb") as f:
                f.seek(offset)
                found = CANCELLED.search(f.read().decode("utf-8", "replace"))
            time.sleep(0.01)
        freed = time.monotonic() - left
        status, text, generation_s = neighbour.result()
    assert found is not None, "the handler never cancelled the job of the client that left"
    assert status == 200 and json.loads(text.splitlines()[-1])["completion_tokens"] == neighbour_tokens, text[-300:]
    tokens = int(found.group(2))
    print(f"\na client left its unstreamed request after {tokens} tokens: its slot was free {freed * 1000:.0f} ms "
          f"later (the log line); the same generation took {generation_s:.2f} s")
    assert tokens < slow["max_new_tokens"], found.group(0)  # cancelled, not run to its end
    assert freed < min(FREED_WITHIN_S, generation_s / 2), (freed, generation_s)
