"""Bad input against the real server: a clear 4xx naming the problem, and the worker keeps serving.

Each row is one malformed request: how it is sent, the status, the field the JSON error names,
and words its message must contain.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.conftest import MODEL

JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
LONG_PROMPT = "春天来了，花开了，鸟儿在树上唱歌。" * 40  # > 256 tokens


def js(obj) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False).encode(), "headers": JSON}


def raw(data: bytes | str, headers=JSON) -> dict:
    return {"data": data.encode() if isinstance(data, str) else data, "headers": headers}


CASES = [
    # id, request, status, field, words in the message
    ("invalid-json", raw('{"prompt": bad'), 400, "body", "not valid JSON"),
    ("truncated-json", raw('{"prompt": "hi"'), 400, "body", "not valid JSON"),
    ("json-array", raw("[1, 2]"), 400, "body", "JSON object"),
    ("json-string", raw('"hello"'), 400, "body", "JSON object"),
    ("json-number", raw("42"), 400, "body", "JSON object"),
    ("empty-json-body", raw(""), 400, "body", "not valid JSON"),
    ("invalid-utf8-json", raw(b'{"prompt": "\xff\xfe"}'), 400, "body", "UTF-8"),
    ("invalid-utf8-octets", raw(b"\xc3\x28 hello", {"Content-Type": "application/octet-stream"}), 400, "body",
     "UTF-8"),
    ("form-encoded-json", raw('{"prompt": "你是谁?"}', FORM), 400, "body", "Content-Type: application/json"),
    ("form-mangled-json", raw('{"prompt": "a=b"}', FORM), 400, "body", "Content-Type: application/json"),
    ("missing-prompt", js({"max_new_tokens": 5}), 400, "prompt", "required"),
    ("prompt-null", js({"prompt": None}), 400, "prompt", "must be a string"),
    ("prompt-number", js({"prompt": 12}), 400, "prompt", "must be a string"),
    ("prompt-list", js({"prompt": ["a", "b"]}), 400, "prompt", "must be a string"),
    ("prompt-empty", js({"prompt": ""}), 400, "prompt", "empty"),
    ("prompt-whitespace", js({"prompt": " \n\t "}), 400, "prompt", "whitespace"),
    ("prompt-too-long", js({"prompt": LONG_PROMPT}), 400, "prompt", "the limit is 256"),
    ("unknown-field", js({"prompt": "hi", "temprature": 0.5}), 400, "temprature", "did you mean 'temperature'"),
    ("max-new-tokens-string", js({"prompt": "hi", "max_new_tokens": "10"}), 400, "max_new_tokens", "integer"),
    ("max-new-tokens-float", js({"prompt": "hi", "max_new_tokens": 10.5}), 400, "max_new_tokens", "integer"),
    ("max-new-tokens-bool", js({"prompt": "hi", "max_new_tokens": True}), 400, "max_new_tokens", "integer"),
    ("max-new-tokens-zero", js({"prompt": "hi", "max_new_tokens": 0}), 400, "max_new_tokens", ">= 1, got 0"),
    ("max-new-tokens-huge", js({"prompt": "hi", "max_new_tokens": 10**9}), 400, "max_new_tokens", "<= 256"),
    ("top-k-one", js({"prompt": "hi", "top_k": 1}), 400, "top_k", "top_k must be >= 2, got 1"),
    ("top-k-over-limit", js({"prompt": "hi", "top_k": 17}), 400, "top_k", "<= 16"),
    ("alpha-above-one", js({"prompt": "hi", "penalty_alpha": 1.5}), 400, "penalty_alpha", "<= 1"),
    ("alpha-negative", js({"prompt": "hi", "penalty_alpha": -0.1}), 400, "penalty_alpha", ">= 0"),
    ("alpha-nan", raw('{"prompt": "hi", "penalty_alpha": NaN}'), 400, "penalty_alpha", "finite"),
    ("alpha-with-greedy", js({"prompt": "hi", "decoding": "greedy", "penalty_alpha": 0.5}), 400, "penalty_alpha",
     "only to decoding='contrastive'"),
    ("decoding-unknown", js({"prompt": "hi", "decoding": "beam"}), 400, "decoding", "one of"),
    ("do-sample-string", js({"prompt": "hi", "do_sample": "yes"}), 400, "do_sample", "true or false"),
    ("do-sample-with-greedy", js({"prompt": "hi", "decoding": "greedy", "do_sample": True}), 400, "do_sample",
     "must be false"),
    ("temperature-zero", js({"prompt": "hi", "decoding": "sample", "temperature": 0}), 400, "temperature", "> 0"),
    ("temperature-without-sampling", js({"prompt": "hi", "temperature": 0.7}), 400, "temperature",
     "only when sampling"),
    ("top-p-above-one", js({"prompt": "hi", "decoding": "sample", "top_p": 1.5}), 400, "top_p", "<= 1"),
    ("top-p-with-contrastive", js({"prompt": "hi", "top_p": 0.9}), 400, "top_p", "only to decoding='sample'"),
    ("seed-negative", js({"prompt": "hi", "decoding": "sample", "seed": -1}), 400, "seed", ">= 0"),
    ("seed-too-large", js({"prompt": "hi", "decoding": "sample", "seed": 2**32}), 400, "seed", "<= 4294967295"),
    ("stop-not-a-list", js({"prompt": "hi", "stop": 5}), 400, "stop", "string or a list"),
    ("stop-too-many", js({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}), 400, "stop", "at most 4"),
    ("stop-empty-string", js({"prompt": "hi", "stop": [""]}), 400, "stop", "must not be empty"),
    ("stop-too-long", js({"prompt": "hi", "stop": ["x" * 65]}), 400, "stop", "at most 64 characters"),
    ("eos-out-of-vocab", js({"prompt": "hi", "eos_token_id": 10**6}), 400, "eos_token_id", "must be in [0,"),
    ("eos-string", js({"prompt": "hi", "eos_token_id": "</s>"}), 400, "eos_token_id", "integer"),
    ("stream-string", js({"prompt": "hi", "stream": "true"}), 400, "stream", "true or false"),
    # scoring (issue 22): logprobs within the operator's limit, biases within the vocabulary, penalties in range
    ("logprobs-over-limit", js({"prompt": "hi", "logprobs": 6}), 400, "logprobs", "logprobs must be <= 5, got 6"),
    ("logprobs-negative", js({"prompt": "hi", "logprobs": -1}), 400, "logprobs", ">= 0"),
    ("prompt-logprobs-over-limit", js({"prompt": "hi", "prompt_logprobs": 21}), 400, "prompt_logprobs", "<= 5"),
    ("logit-bias-outside-vocabulary", js({"prompt": "hi", "logit_bias": {"50256": -100}}), 400, "logit_bias",
     "outside the vocabulary"),
    ("logit-bias-not-an-id", js({"prompt": "hi", "logit_bias": {"hi": 1}}), 400, "logit_bias", "decimal"),
    ("logit-bias-over", js({"prompt": "hi", "logit_bias": {"5": 150}}), 400, "logit_bias", "[-100, 100]"),
    ("presence-penalty-over", js({"prompt": "hi", "presence_penalty": 2.5}), 400, "presence_penalty", "<= 2"),
    ("frequency-penalty-under", js({"prompt": "hi", "frequency_penalty": -2.5}), 400, "frequency_penalty", ">= -2"),
    ("repetition-penalty-zero", js({"prompt": "hi", "repetition_penalty": 0}), 400, "repetition_penalty", "> 0"),
    ("min-tokens-over-max", js({"prompt": "hi", "min_tokens": 9, "max_new_tokens": 8}), 400, "min_tokens", "8"),
    ("logprobs-source-unknown", js({"prompt": "hi", "logprobs": 1, "logprobs_source": "logits"}), 400,
     "logprobs_source", "one of"),
    ("body-over-handler-limit", js({"prompt": "x" * 70000}), 413, "body", "the limit is 65536 bytes"),
]


@pytest.fixture(scope="module")
def worker_before(server):
    [worker] = server.workers(MODEL)
    return worker


@pytest.mark.parametrize("name,request_,status,field,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_gets_a_clear_error(client, worker_before, name, request_, status, field, words):
    r = client.predict_raw(MODEL, data=request_["data"], headers=request_["headers"])
    assert r.status_code == status, r.text
    error = r.json()
    assert error["code"] == status
    assert error["field"] == field
    assert words in error["message"]


def test_table_is_large_enough():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_body_over_the_servers_request_limit_is_refused_by_the_frontend(client):
    r = client.predict_raw(MODEL, data=b"x" * 2_000_000, headers={"Content-Type": "text/plain"})
    assert r.status_code == 413


def test_all_bad_requests_at_once_beside_good_ones(client):
    """The whole table concurrently, interleaved with good requests: statuses unchanged, good ones answered."""
    good = js({"prompt": "你好", "max_new_tokens": 4, "decoding": "greedy"})
    jobs = [item for case in CASES for item in ((case[1], case[2]), (good, 200))]
    with ThreadPoolExecutor(max_workers=16) as pool:
        responses = list(pool.map(lambda job: client.predict_raw(MODEL, data=job[0]["data"],
                                                                 headers=job[0]["headers"]), jobs))
    assert [r.status_code for r in responses] == [status for _, status in jobs]
    assert all(r.json()["completion_tokens"] == 4 for (_, status), r in zip(jobs, responses) if status == 200)


SURROGATE_NAME = b'{"prompt": "hi", "\\udfff": 1}'  # a JSON key holding an unpaired surrogate (escaped, valid JSON)


@pytest.mark.parametrize("suffix", ["", "/1.0/v1/completions"], ids=["native", "openai"])
def test_a_field_name_holding_a_surrogate_is_a_400_naming_it_escaped(client, worker_before, suffix):
    """Was a 500 (UnicodeEncodeError) on the OpenAI route: its error object copied the raw name into "param"."""
    r = client._call("inference", "POST", f"{client.inference_url}/predictions/{MODEL}{suffix}", data=SURROGATE_NAME,
                     headers=JSON)
    assert r.status_code == 400, r.text
    answer = json.loads(r.content.decode("utf-8"))
    shown = answer["error"]["param"] if suffix else answer["field"]
    assert shown == "\\udfff", answer


def test_after_the_table_the_worker_still_serves_and_never_restarted(client, server, worker_before):
    answer = client.generate(MODEL, "你是谁?", max_new_tokens=8)
    assert answer["completion_tokens"] == 8 and answer["full_text"].startswith("你是谁?")
    [worker] = server.workers(MODEL)
    assert (worker["pid"], worker["startTime"]) == (worker_before["pid"], worker_before["startTime"])
    assert "Worker died" not in server.log("ts_log.log")
