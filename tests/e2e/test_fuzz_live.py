"""Bounded fuzz of the live server: random bodies, content types, headers and routes, sent together with good
requests so that TorchServe batches them, against a real TorchServe with the real archive (the variant
`tiny-fuzz` of tests/e2e/conftest.py: the shipped model-config.yaml with at most 16 new tokens, 8 by default,
so that the valid requests among the fuzzed ones stay cheap and the run bounded).

Each example sends a few fuzzed requests (tests/fuzz_inputs.py: any bytes, any JSON, any Unicode, headers
such as `describe: True`, unknown routes) and good requests at once. Every good request must get its right
answer token for token (gpt2ops.expected), every answer must be valid UTF-8 and carry a status no worse than
documented (no 5xx but 507; a handler's error JSON names a field and repeats its status), and afterwards
the worker is the one that started (same pid), idle, and never answered a call with a message-level error
(TorchServe's "Invoking custom service failed" / "number of batch response mismatched" in its log).

A few hundred fuzzed bodies per run (FUZZ_SCALE scales them).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gpt2ops import server_logs
from gpt2ops.expected import ExpectedAnswers
from handler.serving.settings import HandlerSettings
from gpt2ops.local_server import model_config
from tests.e2e.conftest import VARIANTS
from tests.fuzz_inputs import HttpRequest, http_requests

MODEL = "tiny-fuzz"
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
EXAMPLES = max(5, int(60 * SCALE))
GOOD = [
    {"prompt": "你好", "max_new_tokens": 6, "decoding": "greedy", "return_token_ids": True},
    {"prompt": "Who are you?", "max_new_tokens": 5, "return_token_ids": True},
    {"prompt": "春天来了", "decoding": "sample", "seed": 3, "top_k": 20, "max_new_tokens": 7, "return_token_ids": True},
    {"prompt": "streamed", "max_new_tokens": 6, "stream": True, "return_token_ids": True},
]
# what the worker logs when a call failed as a whole (TorchServe then fails every job of it) or the worker died,
# and the handler's own internal faults (handler.serving: input must never cause one)
FAILED_CALL = ("Invoking custom service failed", "number of batch response mismatched", "Backend worker process died",
               "Invalid model predict output", "Unsupported model output data type", "failed as a whole",
               "preparing request", "accepting request", "answering request", "dropping request")


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    settings = HandlerSettings.from_model_config(model_config(**VARIANTS[MODEL]))
    answers = ExpectedAnswers(tiny_model_dir, defaults=settings.defaults, limits=settings.limits)
    return [answers(body).tokens for body in GOOD]


@pytest.fixture(scope="module")
def before(server):
    """The worker and the log's length before the fuzz."""
    server.client.register(f"{MODEL}.mar", MODEL)
    [worker] = server.workers(MODEL)
    logs = server.run_dir / "logs"
    return worker, {server_logs.MODEL_LOG: server_logs.size_of(logs / server_logs.MODEL_LOG)}


def send(client, request: HttpRequest) -> tuple[int, bytes]:
    url = f"{client.inference_url}/predictions/{MODEL}" + (f"/1.0/{request.suffix}" if request.suffix else "")
    r = client._call("inference", "POST", url, data=request.body, headers=request.http_headers())
    return r.status_code, r.content


def good_request(body: dict) -> HttpRequest:
    return HttpRequest("", "application/json", json.dumps(body, ensure_ascii=False).encode())


def last_line(content: bytes) -> dict:
    return json.loads(content.decode("utf-8").strip().splitlines()[-1])


def check_fuzzed(status: int, content: bytes) -> None:
    text = content.decode("utf-8")  # every answer is valid UTF-8
    assert status < 500 or status == 507, (status, text)
    if status == 200 or not text.strip():
        return
    try:
        error = json.loads(text)  # a whole JSON error (TorchServe's own are indented over several lines)
    except ValueError:
        error = json.loads(text.strip().splitlines()[-1])  # a stream that failed ends with its error line
    if "field" in error:  # the handler's error; TorchServe's own (unknown model version, ...) names none
        assert error["code"] == status and isinstance(error["field"], str) and error["message"], text


def test_fuzzed_requests_beside_good_ones_on_the_live_server(client, expected, before):
    seen = {"fuzzed": 0, "good": 0, "statuses": {}}

    # no shrinking: against a live server (and a worker that may have to restart) it takes many minutes; the
    # failing batch is reported as it was sent
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=False, print_blob=True,
              phases=(Phase.explicit, Phase.reuse, Phase.generate),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example])
    @given(fuzzed=st.lists(http_requests, min_size=3, max_size=6),
           good=st.lists(st.sampled_from(range(len(GOOD))), min_size=2, max_size=3),
           order=st.randoms(use_true_random=False))
    def batch(fuzzed, good, order):
        items = [(None, r) for r in fuzzed] + [(g, good_request(GOOD[g])) for g in good]
        order.shuffle(items)
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            answers = list(pool.map(lambda item: send(client, item[1]), items))
        for (g, request), (status, content) in zip(items, answers):
            if g is None:
                check_fuzzed(status, content)
                seen["fuzzed"] += 1
                seen["statuses"][status] = seen["statuses"].get(status, 0) + 1
            else:
                assert status == 200, content
                assert last_line(content)["token_ids"] == expected[g], GOOD[g]
                seen["good"] += 1

    batch()
    print(f"\nlive fuzz: {seen['fuzzed']} fuzzed requests (statuses {dict(sorted(seen['statuses'].items()))}) "
          f"beside {seen['good']} good ones")
    assert seen["fuzzed"] >= 3 * EXAMPLES and seen["statuses"].get(400, 0) >= 1


def test_after_the_fuzz_the_worker_is_the_same_idle_and_never_failed_a_call(server, client, before):
    worker, offsets = before
    [now] = server.workers(MODEL)
    assert (now["pid"], now["startTime"]) == (worker["pid"], worker["startTime"])  # never restarted
    load = client.report(MODEL)["load"]
    assert (load["slots_in_use"], load["requests_waiting"]) == (0, 0)
    logs = server.run_dir / "logs"
    written = server_logs.read_from(logs / server_logs.MODEL_LOG, offsets[server_logs.MODEL_LOG])
    ours = [line for line in written.splitlines() if f"-{MODEL}_" in line]  # this model's worker, not the others'
    assert ours, "the worker logged nothing: wrong log?"
    assert not [line for line in ours if any(marker in line for marker in FAILED_CALL)]
