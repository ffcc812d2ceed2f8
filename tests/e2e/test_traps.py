"""TorchServe 0.12.0's continuous-batching traps, on the real server (docs/engine.md, Traps).

A worker that dies between two iterations: the frontend puts the jobs it had open back in the queue as
cached jobs (no body) and the restarted worker gets them (handler.serving.orphans). Each open client
must be answered within a bounded time: a last line with the error, ending its body cleanly.
Known gap: in its first run the death fell during an iteration (connections reset, also bounded), so
this test bounds the time but does not yet prove that the between-iterations path was taken.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gpt2ops.local_server import build_archive, model_config

GAP_MODEL = "tiny-gap"
# the frontend waits maxBatchDelay between two iterations when nothing new comes: a long wait makes the
# worker's death (0.3 s after the faulty request's prefill) fall between two iterations
GAP_CONFIG = {"fault_injection": True, "maxBatchDelay": 500}
ANSWERED_WITHIN_S = 45  # the worker's restart and load, with room for a loaded 2-core machine
LONG = {"max_new_tokens": 250, "decoding": "greedy", "ignore_eos": True}


@pytest.fixture(scope="module")
def gap_model(server, model_store, tiny_model_dir):
    build_archive(tiny_model_dir, GAP_MODEL, model_store, model_config(**GAP_CONFIG))
    server.client.register(f"{GAP_MODEL}.mar", GAP_MODEL, workers=1)
    yield GAP_MODEL
    server.client.unregister(GAP_MODEL)


def _collect(client, path: str, body: dict, headers: dict | None = None) -> tuple[int | None, str, float]:
    """(status, whole body, seconds) of a streamed request read to its end; status None: the connection broke."""
    start = time.monotonic()
    try:
        r = requests.post(f"{client.inference_url}/predictions/{path}", json=body, stream=True, timeout=90,
                          headers={"Authorization": f"Bearer {client.key('inference')}", **(headers or {})})
        text = b"".join(r.iter_content(chunk_size=None)).decode("utf-8", "replace")
        return r.status_code, text, time.monotonic() - start
    except requests.RequestException as err:
        return None, repr(err), time.monotonic() - start


def test_a_worker_dying_between_two_iterations_answers_every_open_client(server, gap_model):
    client = server.client
    [worker] = server.workers(gap_model)
    requests_ = [
        (gap_model, {"prompt": "流一", "stream": True, **LONG}),
        (gap_model, {"prompt": "整一", **LONG}),
        (f"{gap_model}/1.0/v1/completions", {"prompt": "开放", "stream": True, "max_tokens": 250, "ignore_eos": True}),
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(_collect, client, path, body) for path, body in requests_]
        time.sleep(1.0)  # all three are open and generating
        killer = pool.submit(_collect, client, gap_model, {"prompt": "死", **LONG}, {"X-Fault-Injection": "exit-soon"})
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
