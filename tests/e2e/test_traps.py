"""TorchServe 0.12.0's continuous-batching traps, on the real server (docs/engine.md, Traps).

A worker that dies between two iterations: the frontend puts the jobs it had open back in the queue as
cached jobs (no body) and the restarted worker gets them (handler.serving.orphans). Each open client
must be answered within a bounded time: a last line with the error, ending its body cleanly.
Known gap: in its first run the death fell during an iteration (connections reset, also bounded), so
this test bounds the time but does not yet prove that the between-iterations path was taken.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gpt2ops.local_server import build_archive, model_config

GAP_MODEL = "tiny-gap"
# short iterations (more of the worker's time between two of them) and a long maxBatchDelay aim the worker's
# death (0.3 s after the faulty request's prefill) between two iterations
GAP_CONFIG = {"fault_injection": True, "maxBatchDelay": 500, "iteration_ms": 2}
ANSWERED_WITHIN_S = 45  # the worker's restart and load, with room for a loaded 2-core machine
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
        r = requests.post(f"{client.inference_url}/predictions/{path}", json=body, stream=True, timeout=90,
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


def test_a_worker_dying_between_two_iterations_answers_every_open_client(server, gap_model):
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
        killer = pool.submit(_collect, client, gap_model, {"prompt": "死", **long}, {"X-Fault-Injection": "exit-soon"})
        results = [f.result() for f in futures]
        killer.result()
    for (status, text, seconds), (path, _) in zip(results, requests_):
        assert seconds < ANSWERED_WITHIN_S, (path, seconds, text[-300:])
        assert status in (200, 500, 503, 507, None), (path, status, text[-300:])
        if status == 200:  # answered: its body ends with the error line (native) or the error event and [DONE]
            assert "worker serving this request died" in text or "died" in text, (path, text[-300:])
    print("\nworker died between two iterations:", [(path, status, round(seconds, 2), text[-120:])
                                                   for (status, text, seconds), (path, _) in zip(results, requests_)])
    deadline = time.monotonic() + ANSWERED_WITHIN_S
    while server.workers(gap_model)[0]["pid"] == worker["pid"] and time.monotonic() < deadline:
        time.sleep(0.5)  # the frontend restarts the worker
    assert server.workers(gap_model)[0]["pid"] != worker["pid"]
    assert client.generate(gap_model, "after", max_new_tokens=4)["completion_tokens"] >= 1
