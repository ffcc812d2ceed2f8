"""Bounded fuzz of the live server: random bodies, content types, headers and routes, sent together with good
requests so that TorchServe batches them, against a real TorchServe with the real archive (the variant
`tiny-fuzz` of tests/e2e/conftest.py: the shipped model-config.yaml with at most 16 new tokens, 8 by default,
so that the valid requests among the fuzzed ones stay cheap and the run bounded).

Each example sends a few fuzzed requests (tests/fuzz_inputs.py: any bytes, any JSON, any Unicode, headers
such as `describe: True`, unknown routes) and good requests at once. Every good request must get its right
answer token for token (gpt2ops.expected), every answer must be valid UTF-8 and carry a status no worse than
documented (no 5xx but 507, save TorchServe's own form-decoder limits, each named by `torchserve_form_limit`;
a handler's error JSON names a field and repeats its status), and afterwards
the worker is the one that started (same pid), idle, and never answered a call with a message-level error
(TorchServe's "Invoking custom service failed" / "number of batch response mismatched" in its log).

A few hundred fuzzed bodies per run (FUZZ_SCALE scales them).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote_plus

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from gpt2ops import server_logs
from gpt2ops.expected import ExpectedAnswers
from handler.serving.settings import HandlerSettings
from gpt2ops.local_server import model_config
from tests.e2e.conftest import VARIANTS
from tests.fuzz_inputs import HttpRequest, http_requests
from tests.fuzz_profile import reproducible

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


# ---- TorchServe's own limits: answers its Java front end gives before the handler runs ----
# TorchServe decodes form bodies itself (Netty's HttpPostRequestDecoder, for application/x-www-form-urlencoded
# and multipart/form-data) before any worker sees the request, and answers 500 with the decoder's exception to
# a body it cannot decode. No handler can prevent that; the Kubernetes proxy refuses form bodies (415,
# deploy/kubernetes/base/proxy/nginx.conf.template) and docs/engine.md lists these limits for the local server.
# Each is named by TorchServe's exact answer AND by what makes the body undecodable, so that any other 500,
# even to a form body, still fails the fuzz.
FORM_URLENCODED = "application/x-www-form-urlencoded"
DECODER_ERROR = "ErrorDataDecoderException"
BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")  # a % not followed by two hex digits


def form_decoded(content_type: str | None) -> bool:
    """Whether TorchServe form-decodes a body of this type (InferenceRequestHandler: the type before ";",
    any case, or Netty's multipart test)."""
    value = (content_type or "").strip().lower()
    return value.split(";")[0].strip() == FORM_URLENCODED or value.startswith("multipart/form-data")


def has_blank_form_name(body: bytes) -> bool:
    """A field of the form whose name is empty once decoded ("=x", "a=1&&b=2", "&a", "+=1"); an empty last
    field ("a=1&") is not one: TorchServe ignores it."""
    fields = body.split(b"&")
    if fields and fields[-1] == b"":
        fields = fields[:-1]
    return any(not unquote_plus(f.split(b"=", 1)[0].decode("latin-1")).strip() for f in fields)


def torchserve_form_limit(request: HttpRequest, status: int, content: bytes) -> str | None:
    """The name of TorchServe's limit that this answer is, or None when it is not one of them."""
    if status != 500 or not form_decoded(request.content_type):
        return None
    try:
        error = json.loads(content)
    except ValueError:
        return None
    if not isinstance(error, dict) or error.keys() != {"code", "type", "message"} or error["type"] != DECODER_ERROR:
        return None
    message = error["message"]
    if message == "java.lang.IllegalArgumentException: empty name" and has_blank_form_name(request.body):
        return "form field with an empty name"
    if message.startswith(("Invalid hex byte", "Bad string")) and BAD_ESCAPE.search(request.body):
        return "form field with a bad %-escape"
    return None


def check_fuzzed(request: HttpRequest, status: int, content: bytes) -> str | None:
    """A fuzzed request's answer meets what the package guarantees; returns the name of the TorchServe limit
    it hit instead (the only 500s allowed), or None."""
    text = content.decode("utf-8")  # every answer is valid UTF-8
    limit = torchserve_form_limit(request, status, content)
    if limit is not None:
        return limit
    assert status < 500 or status == 507, (status, text, request)
    if status == 200 or not text.strip():
        return None
    try:
        error = json.loads(text)  # a whole JSON error (TorchServe's own are indented over several lines)
    except ValueError:
        error = json.loads(text.strip().splitlines()[-1])  # a stream that failed ends with its error line
    if "field" in error:  # the handler's error; TorchServe's own (unknown model version, ...) names none
        assert error["code"] == status and isinstance(error["field"], str) and error["message"], text
    return None


def test_fuzzed_requests_beside_good_ones_on_the_live_server(client, expected, before):
    seen = {"fuzzed": 0, "good": 0, "statuses": {}, "torchserve limits": {}}

    # no shrinking: against a live server (and a worker that may have to restart) it takes many minutes; the
    # failing batch is reported as it was sent
    @reproducible  # the seed and the example database: the profile (tests/fuzz_profile.py)
    @settings(max_examples=EXAMPLES, deadline=None,
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
                limit = check_fuzzed(request, status, content)
                if limit is not None:
                    seen["torchserve limits"][limit] = seen["torchserve limits"].get(limit, 0) + 1
                seen["fuzzed"] += 1
                seen["statuses"][status] = seen["statuses"].get(status, 0) + 1
            else:
                assert status == 200, content
                assert last_line(content)["token_ids"] == expected[g], GOOD[g]
                seen["good"] += 1

    batch()
    print(f"\nlive fuzz: {seen['fuzzed']} fuzzed requests (statuses {dict(sorted(seen['statuses'].items()))}) "
          f"beside {seen['good']} good ones; TorchServe's own limits hit: {seen['torchserve limits']}")
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


# ---- the limits named above, as TorchServe answers them (and the predicate no wider than they are) ----

LIMIT_CASES = [
    # id, content type, body, TorchServe's limit (None: the package answers, never 5xx)
    ("empty-name", FORM_URLENCODED, b"=x&&=", "form field with an empty name"),
    ("empty-field-between", FORM_URLENCODED, b"prompt=hi&&max_new_tokens=2", "form field with an empty name"),
    ("blank-name", "Application/X-WWW-Form-Urlencoded; charset=utf-8", b"+=1", "form field with an empty name"),
    ("bad-escape-in-a-value", FORM_URLENCODED, b"prompt=%", "form field with a bad %-escape"),
    ("bad-escape-in-a-name", FORM_URLENCODED, b"%zz=1", "form field with a bad %-escape"),
    ("empty-last-field", FORM_URLENCODED, b"prompt=hi&max_new_tokens=2&", None),
    ("same-body-as-json", "application/json", b"=x&&=", None),
    ("same-body-as-text", "text/plain", b"=x&&=", None),
]


@pytest.mark.parametrize("content_type,body,limit", [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES])
def test_torchserve_form_limits_are_exactly_what_the_fuzz_names(client, before, content_type, body, limit):
    request = HttpRequest("", content_type, body)
    status, content = send(client, request)
    assert torchserve_form_limit(request, status, content) == limit, (status, content)
    if limit is None:
        assert check_fuzzed(request, status, content) is None and status < 500


@pytest.mark.parametrize("status,content_type,body,content", [
    (500, FORM_URLENCODED, b"a=1", b'{"code": 500, "type": "ErrorDataDecoderException", '
                                   b'"message": "java.lang.IllegalArgumentException: empty name"}'),  # no empty name
    (500, "application/json", b"=x", b'{"code": 500, "type": "ErrorDataDecoderException", '
                                      b'"message": "java.lang.IllegalArgumentException: empty name"}'),  # not a form
    (500, FORM_URLENCODED, b"=x", b'{"code": 500, "type": "InternalServerError", "field": "body", '
                                  b'"message": "internal error"}'),  # the handler's own 500
    (500, FORM_URLENCODED, b"a=%41", b'{"code": 500, "type": "ErrorDataDecoderException", '
                                     b'"message": "Invalid hex byte"}'),  # the escape is good
    (503, FORM_URLENCODED, b"=x", b'{"code": 503, "type": "ErrorDataDecoderException", '
                                  b'"message": "java.lang.IllegalArgumentException: empty name"}'),
])
def test_no_other_answer_passes_for_a_torchserve_limit(status, content_type, body, content):
    request = HttpRequest("", content_type, body)
    assert torchserve_form_limit(request, status, content) is None
    with pytest.raises(AssertionError):
        check_fuzzed(request, status, content)
