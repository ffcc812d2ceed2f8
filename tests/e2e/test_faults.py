"""Faults against the real server: a killed worker, memory exhaustion, budgets, timeouts, a full queue."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gpt2ops.local_server import start_server
from tests.e2e.conftest import MODEL

SLOW = {"max_new_tokens": 250, "top_k": 16}  # the slowest request the limits allow on the tiny model


@pytest.fixture(scope="module")
def variants(server):
    for name in ("tiny-faults", "tiny-budget", "tiny-hurried"):
        server.client.register(f"{name}.mar", name)
    return server


def test_memory_exhaustion_is_507_and_the_next_request_succeeds(variants, client):
    [before] = variants.workers("tiny-faults")
    r = client.predict_raw("tiny-faults", {"prompt": "你好", "max_new_tokens": 8},
                           headers={"X-Fault-Injection": "oom"})
    assert r.status_code == 507
    assert "out of memory" in r.json()["message"]
    assert client.generate("tiny-faults", "你好", max_new_tokens=8)["completion_tokens"] == 8
    [after] = variants.workers("tiny-faults")
    assert after["pid"] == before["pid"]  # handled in the handler: the worker did not die


def test_exhaustion_in_a_batch_fails_only_the_request_that_does_not_fit(variants, client):
    def send(i):
        headers = {"X-Fault-Injection": "oom"} if i == 3 else {}
        return client.predict_raw("tiny-faults", {"prompt": f"第{i}个", "max_new_tokens": 6}, headers=headers)

    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(send, range(8)))
    assert [r.status_code for r in responses] == [200, 200, 200, 507, 200, 200, 200, 200]


def test_request_larger_than_the_memory_budget_is_507_up_front(variants, client):
    r = client.predict_raw("tiny-budget", {"prompt": "春天来了。" * 30, "max_new_tokens": 250, "top_k": 16})
    assert r.status_code == 507
    assert "MiB" in r.json()["message"] and r.json()["field"] == "max_new_tokens"
    assert client.generate("tiny-budget", "你好", max_new_tokens=8)["completion_tokens"] == 8


def test_prompt_plus_new_tokens_beyond_the_models_positions_is_400(variants, client):
    r = client.predict_raw("tiny-faults", {"prompt": "one two three " * 25, "max_new_tokens": 400})
    assert r.status_code == 400
    assert r.json()["field"] == "max_new_tokens" and "512 positions" in r.json()["message"]


def test_generation_that_cannot_finish_in_time_is_refused_up_front(variants, client):
    cap = client.report("tiny-hurried")["max_new_tokens_within_timeout"]
    assert 1 <= cap < 256
    r = client.predict_raw("tiny-hurried", {"prompt": "hi", "max_new_tokens": cap + 1})
    assert r.status_code == 400
    assert r.json()["field"] == "max_new_tokens" and "response timeout" in r.json()["message"]
    assert client.generate("tiny-hurried", "hi", max_new_tokens=cap, decoding="greedy")["completion_tokens"] >= 1


def test_killed_worker_recovers_and_queued_requests_are_served(server, client):
    """SIGKILL the worker mid-batch: in-flight requests get a 5xx, queued and later ones get 200s.

    An in-flight request whose status line had gone out already (continuous batching sends it with the job's
    first, empty, chunk) cannot get a 5xx any more: its connection closes mid-body (None below)."""
    server.client.register(f"{MODEL}.mar", "tiny-victim")
    [worker] = server.workers("tiny-victim")
    seen = len(server.batch_sizes())

    def send(i):
        try:
            return client.predict_raw("tiny-victim", {"prompt": f"请求{i}", **SLOW})
        except requests.RequestException:  # the connection closed mid-body
            return None

    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(send, i) for i in range(20)]
        deadline = time.monotonic() + 30
        while len(server.batch_sizes()) == seen and time.monotonic() < deadline:
            time.sleep(0.01)  # until the worker has taken its first batch
        os.kill(worker["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        responses = [f.result() for f in futures]
    codes = [None if r is None else r.status_code for r in responses]
    assert any(code is None or code >= 500 for code in codes), codes  # the batch in flight died with the worker
    assert codes.count(200) >= 1, codes  # the queued ones were served by the restarted worker
    assert set(codes) <= {200, 500, 507, None}, codes  # 507: TorchServe reports a worker that exited 137 (SIGKILL) as out of memory
    for r in responses:
        if r is not None and r.status_code == 200:
            assert r.json()["completion_tokens"] == SLOW["max_new_tokens"] or r.json()["finish_reason"] == "eos"
    while True:  # recovery: until a fresh request is answered
        r = client.predict_raw("tiny-victim", {"prompt": "after", "max_new_tokens": 4})
        if r.status_code == 200:
            break
        assert time.monotonic() - killed_at < 60, r.text
        time.sleep(0.1)
    recovery = time.monotonic() - killed_at
    [restarted] = server.workers("tiny-victim")
    assert restarted["pid"] != worker["pid"]
    print(f"\nworker killed with SIGKILL: {codes.count(200)} served, {len(codes) - codes.count(200)} failed "
          f"({sorted(set(codes), key=str)}); recovered in {recovery:.2f} s")


def test_full_queue_rejects_only_the_overflow(tmp_path, model_store, tiny_model_dir):
    """A server with job_queue_size=2: a burst gets 503 for what does not fit, 200 for the rest, then recovers."""
    srv = start_server(tmp_path, model_store, job_queue_size=2)
    try:
        srv.client.register(f"{MODEL}.mar", MODEL)
        with ThreadPoolExecutor(max_workers=30) as pool:
            responses = list(pool.map(lambda i: srv.client.predict_raw(MODEL, {"prompt": f"q{i}", **SLOW}),
                                      range(30)))
        codes = [r.status_code for r in responses]
        assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
        assert set(codes) == {200, 503}, codes
        assert all("queue" in r.text.lower() or "worker" in r.text.lower() for r in responses
                   if r.status_code == 503)
        after = srv.client.generate(MODEL, "after the burst", max_new_tokens=5)
        assert after["completion_tokens"] == 5 or after["finish_reason"] == "eos", after
        print(f"\nqueue of 2: {codes.count(200)} served, {codes.count(503)} rejected with 503")
    finally:
        srv.stop()
