"""Property-based fuzzing of the request path in-process: whatever one request holds, it gets its own answer.

From a TorchServe batch entry (any bytes, any content type, any headers, JSON of any shape and depth, any
Unicode: tests/fuzz_inputs.py) to a prepared engine request or its error, and through the whole handler
(tests.ts_context.Frontend, with TorchServe's own decoding of the worker's input and encoding of its
output) in batches that mix fuzzed requests with good ones:

- nothing raises out of `read_request`, `NativeApi.prepare` or the handler;
- every refusal is a documented status (400 bad input, 404 unknown route, 413 body over the limit, 507 does
  not fit this worker) naming a field of the request, in an error body that is valid UTF-8 JSON; a 500
  (an internal fault) is never the answer to input;
- every good request in a batch gets its own right answer, token for token (gpt2ops.expected), and the
  engine ends idle with nothing left behind.

The number of examples scales with FUZZ_SCALE (default 1: 4,000 entries and 100 batches of up to 9 requests).
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpt2ops.expected import ExpectedAnswers
from handler.serving import responses
from handler.serving.errors import RequestError, field_label
from handler.serving.fields import BY_NAME
from handler.serving.native import Prepared, RawRequest, read_request
from tests.fuzz_inputs import REQUEST_OBJECTS, as_worker, worker_requests
from tests.fuzz_profile import reproducible
from tests.serving.handlers import make_handler, one_torch_thread

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
DOCUMENTED = {400, 404, 413, 507}  # what input may get; 500 is an internal fault, never the answer to input
LIMITS = {"max_prompt_tokens": 64, "max_new_tokens": 8}
# the seed and the example database come from the profile (tests/fuzz_profile.py)
FUZZ = dict(deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                                   HealthCheck.filter_too_much])


def examples(n: int) -> int:
    return max(10, int(n * SCALE))


@pytest.fixture(scope="module")
def handler(tiny_model_dir):
    """Short generations (at most 8 tokens) so that valid fuzzed requests cost little; one torch thread (the
    fuzz has a time budget)."""
    with one_torch_thread():
        yield make_handler(tiny_model_dir, warmup=False, limits=LIMITS, defaults={"max_new_tokens": 4})


@pytest.fixture(scope="module")
def preparation(handler):
    return handler.native


def fields_of(entry: dict) -> set[str]:
    """The names an error may give: the body, the prompt, the route, the known fields, and the request's own
    field names (form fields, or the keys of its JSON object) as errors show them (`field_label`)."""
    names = {"body", "prompt", "url_path", *BY_NAME, *(field_label(k) for k in entry if isinstance(k, str))}
    for value in entry.values():
        if isinstance(value, (bytes, bytearray)):
            try:
                value = json.loads(value)
            except Exception:  # noqa: BLE001 - not JSON: it names no fields
                continue
        if isinstance(value, dict):
            names.update(field_label(k) for k in value if isinstance(k, str))
    return names


def check_error(err: RequestError, entry: dict) -> None:
    """A refusal: documented status, a field of this request, a message, an encodable JSON body that says so."""
    assert err.status in DOCUMENTED, f"{err.status} {err.field}: {err.message}"
    assert isinstance(err.field, str) and err.field in fields_of(entry), err.field
    assert isinstance(err.message, str) and err.message.strip()
    body = err.to_json().encode("utf-8")  # TorchServe encodes the answer as UTF-8 outside the handler
    assert json.loads(body) == {"code": err.status, "type": json.loads(body)["type"], "field": err.field,
                                "message": err.message}


@reproducible
@settings(max_examples=examples(1000), **FUZZ)
@given(worker_requests())
def test_read_request_reads_or_refuses_every_entry(request_):
    entry, headers = request_
    try:
        raw = read_request(entry, headers, 4096)
    except RequestError as err:
        check_error(err, entry)
        assert err.status in (400, 413)
    else:
        assert isinstance(raw, RawRequest) and isinstance(raw.prompt, str) and raw.prompt.strip()
        assert isinstance(raw.fields, dict) and "prompt" not in raw.fields


def check_prepared(result, entry: dict) -> str:
    """Check what prepare gave; returns "prepared" or "refused: <field>"."""
    if isinstance(result, RequestError):
        check_error(result, entry)
        return f"refused: {result.field if result.field in BY_NAME or result.field in ('prompt', 'body') else '?'}"
    assert isinstance(result, Prepared)
    request = result.request
    assert request.prompt_ids and request.params.max_new_tokens <= LIMITS["max_new_tokens"]
    # the prompt is echoed back in full_text: the answer must be encodable whatever the prompt is
    responses.json_text({"full_text": result.prompt}).encode("utf-8")
    return "prepared"


def test_prepare_answers_every_entry_with_a_request_or_its_own_error(preparation):
    seen: Counter = Counter()

    @reproducible
    @settings(max_examples=examples(1500), **FUZZ)
    @given(worker_requests())
    @example(({"body": b"[" * 5000 + b"]" * 5000}, {"Content-Type": "application/json"}))
    def prepare(request_):
        entry, headers = request_
        seen[check_prepared(preparation.prepare("fuzz", entry, headers), entry)] += 1

    prepare()
    print(f"\n{sum(seen.values())} entries: {dict(seen.most_common())}")
    assert seen["prepared"] >= 0.02 * sum(seen.values()), seen  # the fuzz reaches past the checks too


def test_prepare_answers_every_json_object(preparation):
    """JSON objects shaped like requests (every field, right type or not), parsed as TorchServe parses them:
    the fuzz reaches every field's checks, and past them."""
    seen: Counter = Counter()

    @reproducible
    @settings(max_examples=examples(1500), **FUZZ)
    @given(REQUEST_OBJECTS)
    def prepare(obj):
        entry, headers = as_worker([("body", "application/json", json.dumps(obj).encode())],
                                   {"Content-Type": "application/json"})
        seen[check_prepared(preparation.prepare("fuzz", entry, headers), entry)] += 1

    prepare()
    print(f"\n{sum(seen.values())} entries: {dict(seen.most_common())}")
    assert seen["prepared"] >= 0.02 * sum(seen.values()), seen
    assert {f"refused: {name}" for name in [*BY_NAME, "prompt"]} <= set(seen), seen  # every field was refused


# ---- the handler: fuzzed requests in batches with good ones ----

GOOD = [
    {"prompt": "你好", "max_new_tokens": 4, "decoding": "greedy", "return_token_ids": True},
    {"prompt": "Hello, how are you?", "max_new_tokens": 3, "return_token_ids": True},
    {"prompt": "春天来了", "decoding": "sample", "seed": 7, "temperature": 0.8, "max_new_tokens": 5,
     "return_token_ids": True},
    {"prompt": "streamed", "stream": True, "max_new_tokens": 6, "return_token_ids": True},
]
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def expected(handler, tiny_model_dir):
    answers = ExpectedAnswers(tiny_model_dir, defaults=handler.settings.defaults, limits=handler.settings.limits)
    return [answers(body).tokens for body in GOOD]


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def check_openai_answer(status: int, text: str) -> None:
    """An answer of the OpenAI-compatible routes (`v1/`): OpenAI's error shape, a completion, a model list,
    or server-sent events ending with [DONE]."""
    if text.startswith("data: "):
        assert text.endswith("data: [DONE]\n\n"), text
        events = [json.loads(block[len("data: "):]) for block in text.split("\n\n")[:-2]]
        assert all("error" in e or e["object"] == "text_completion" for e in events), text
        return
    answer = json.loads(text)
    if status != 200:
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], text
        return
    assert answer["object"] in ("text_completion", "list", "model"), text


def check_answer(status: int, text: str) -> None:
    """A fuzzed request's answer: a documented status, and a body that is what that status promises."""
    assert status == 200 or status in DOCUMENTED, (status, text)
    if text.startswith(("data: ", '{"error": ', '{"id": "cmpl-', '{"object": ')):
        check_openai_answer(status, text)
        return
    if status != 200:
        error = json.loads(text.splitlines()[-1])  # a stream that failed late ends with the error line
        assert error["code"] == status and isinstance(error["field"], str) and error["message"], text
        return
    objects = lines(text)
    assert objects, text
    last = objects[-1]
    if "pool" in last:  # the describe route
        assert last["load"]["slots_in_use"] >= 0
        return
    assert last["finish_reason"] in ("length", "eos", "stop", "timeout"), text
    assert last["full_text"].endswith(last["generated_text"])
    if len(objects) > 1:  # streamed: the chunks join to the text
        assert "".join(o["text"] for o in objects) == last["generated_text"]


def test_fuzzed_requests_in_a_batch_never_cost_a_good_request_its_answer(handler, expected):
    seen: Counter = Counter()

    @reproducible
    @settings(max_examples=examples(100), **FUZZ)
    @given(fuzzed=st.lists(worker_requests(), min_size=1, max_size=6),
           good=st.lists(st.sampled_from(range(len(GOOD))), min_size=1, max_size=3),
           order=st.randoms(use_true_random=False), hang_ups=st.dictionaries(st.integers(0, 8), st.integers(1, 3)))
    def batch(fuzzed, good, order, hang_ups):
        items = [("fuzz", entry, headers) for entry, headers in fuzzed] + [("good", g, None) for g in good]
        order.shuffle(items)
        entries = [{"body": GOOD[x]} if kind == "good" else x for kind, x, _ in items]
        headers = [JSON_HEADERS if kind == "good" else h for kind, _, h in items]
        drop = {i: n for i, n in hang_ups.items() if i < len(items) and items[i][0] == "fuzz"}
        statuses, texts, chunks = handler.frontend.serve(entries, headers, entries=True, drop=drop)
        for i, (kind, x, _) in enumerate(items):
            if kind == "good":
                assert statuses[i] == 200, texts[i]
                assert lines(texts[i])[-1]["token_ids"] == expected[x], GOOD[x]
            elif not (i in drop and len(chunks[i]) == drop[i] and statuses[i] == 200):  # else: it hung up
                check_answer(statuses[i], texts[i])
                seen[statuses[i]] += 1
        # the next call (a good request) cancels what clients left; then nothing is left anywhere
        statuses, texts, _ = handler.frontend.serve([GOOD[0]])
        assert statuses == [200] and lines(texts[0])[-1]["token_ids"] == expected[0]
        stats = handler.engine.stats()
        assert (stats.slots_in_use, stats.waiting, handler.loop.jobs) == (0, 0, {})
        assert handler.engine.tracked == 0

    batch()
    print(f"\nfuzzed requests in 100 batches: {dict(seen)}")
    assert seen[200] >= 1 and seen[400] >= 1, seen  # fuzzed requests were generated, and refused


# ---- what the fuzz found (each failed on the code before its fix) ----

DIGITS_5000 = b'{"prompt": "hi", "max_new_tokens": ' + b"9" * 5000 + b"}"  # Python's parser stops at 4300
FOUND = [
    # id, entry, headers, status, field, words
    ("content-length-not-ascii-digits", {"body": {"prompt": "hi", "top_k": 1}}, {"Content-Length": "²"}, 400,
     "top_k", "top_k must be >= 2"),  # "²".isdigit() but int("²") raised ValueError: a 500
    ("content-length-past-the-parsers-limit", {"body": {"prompt": "hi", "top_k": 1}},
     {"Content-Length": "9" * 5000}, 400, "top_k", "top_k must be >= 2"),  # int() raised ValueError: a 500
    ("integer-past-the-parsers-limit", {"body": DIGITS_5000}, JSON_HEADERS, 400, "body", "number too long"),
    ("nested-past-the-recursion-limit", {"body": b'{"prompt": "hi", "stop": ' + b"[" * 5000 + b"]" * 5000 + b"}"},
     JSON_HEADERS, 400, "body", "nested too deeply"),
    ("number-field-beyond-a-float", {"body": {"prompt": "hi", "decoding": "sample", "temperature": 10**400}},
     JSON_HEADERS, 400, "temperature", "must be a finite number, got 1000000"),
    ("integer-field-beyond-a-float", {"body": {"prompt": "hi", "top_k": 10**400}}, JSON_HEADERS, 400, "top_k",
     "top_k must be <= 16, got 100000000000...(401 digits)"),  # formatting the message overflowed
    ("prompt-with-unpaired-surrogate", {"body": {"prompt": "a\ud800"}}, JSON_HEADERS, 400, "prompt",
     "unpaired UTF-16 surrogate (U+D800 at character 1)"),  # the tokenizer raised TypeError: a 500
    ("stop-with-unpaired-surrogate", {"body": {"prompt": "hi", "stop": ["\udfff"]}}, JSON_HEADERS, 400, "stop",
     "unpaired UTF-16 surrogate (U+DFFF at character 0)"),  # would never match: refused, not ignored
    ("field-name-with-unpaired-surrogate", {"body": {"prompt": "hi", "\ud83d": 1}}, JSON_HEADERS, 400, "\\ud83d",
     "unpaired UTF-16 surrogate"),  # echoed in "field": TorchServe could not encode the answer, the worker died;
    # now named escaped (errors.field_label), on both APIs
]


@pytest.mark.parametrize("entry,headers,status,field,words", [c[1:] for c in FOUND], ids=[c[0] for c in FOUND])
def test_what_the_fuzz_found_is_refused_naming_the_field(preparation, entry, headers, status, field, words):
    error = preparation.prepare("found", entry, headers)
    assert isinstance(error, RequestError), error
    assert (error.status, error.field) == (status, field) and words in error.message, error.message
    check_error(error, entry)


@pytest.mark.parametrize("header", ["describe", "explain"])
def test_describe_or_explain_header_on_the_first_request_costs_no_one_an_answer(handler, expected, header):
    """TorchServe's base handler answered a whole call with one describe answer (or failed in `explain_handle`)
    when the first request carried `describe: True` (`explain: True`): 503 for every request of the call."""
    headers = [{**JSON_HEADERS, header: "True"}, JSON_HEADERS, JSON_HEADERS]
    statuses, texts, _ = handler.frontend.serve([GOOD[1], GOOD[0], {"prompt": "x", "top_k": 1}], headers)
    assert statuses == [200, 200, 400], texts
    assert [lines(t)[-1].get("token_ids") for t in texts[:2]] == [expected[1], expected[0]]


def test_an_unencodable_name_in_an_error_does_not_kill_the_worker(handler, expected):
    """The error naming the field "\\ud83d" went to TorchServe's UTF-8 encoding after the handler returned, which
    raised there: the worker process died and every request in it failed."""
    statuses, texts, _ = handler.frontend.serve([{"prompt": "hi", "\ud83d": 1}, GOOD[0]])
    assert statuses == [400, 200]
    assert json.loads(texts[0])["field"] == "\\ud83d" and texts[0].isascii()  # named escaped (errors.field_label)
    assert lines(texts[1])[-1]["token_ids"] == expected[0]
