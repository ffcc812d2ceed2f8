"""The OpenAI-compatible API in-process: the request mapping as tables, and the handler's answers and streams
through `tests.ts_context.Frontend` (TorchServe's continuous-batching frontend, as its source behaves).

The end-to-end tests with the official client against a real TorchServe are in tests/e2e/test_openai.py.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from gpt2ops import REPO
from handler.serving.errors import RequestError
from handler.serving.openai.call import to_params
from handler.serving.openai.protocol import error_object, read_body, read_completion
from handler.serving.settings import HandlerSettings
from tests.serving.handlers import local

SETTINGS = HandlerSettings.from_model_config(yaml.safe_load((REPO / "model-config.yaml").read_text()))
VOCAB = 1000
MODEL = "tiny-gpt2"  # tests.ts_context.make_context's model name


def mapped(body: dict):
    """A body through the mapping: GenerationParams, or (status, OpenAI error object)."""
    try:
        return to_params(read_completion({"prompt": "hi", **body}, MODEL, SETTINGS.limits.max_choices), SETTINGS,
                       VOCAB)
    except RequestError as err:
        return err.status, error_object(err)["error"]


# ---- the mapping: OpenAI fields -> the native fields -> GenerationParams ----

MAPPED = [
    # nothing about decoding: the operator's default (model-config.yaml: contrastive search, alpha 0.6, k 4)
    ({}, dict(decoding="contrastive", do_sample=False, penalty_alpha=0.6, top_k=4, max_new_tokens=64)),
    ({"temperature": 0}, dict(decoding="greedy", do_sample=False)),
    ({"temperature": 0.0, "top_p": 1}, dict(decoding="greedy")),  # LangChain sends top_p 1 always
    ({"temperature": 0.7}, dict(decoding="sample", do_sample=True, temperature=0.7, top_k=0, top_p=1.0)),
    ({"temperature": 1, "top_k": 8}, dict(decoding="sample", top_k=8, temperature=1.0)),
    ({"top_p": 0.9}, dict(decoding="sample", top_p=0.9, temperature=1.0)),
    ({"penalty_alpha": 0.3, "top_k": 6}, dict(decoding="contrastive", penalty_alpha=0.3, top_k=6, do_sample=False)),
    ({"penalty_alpha": 0.6, "temperature": 0}, dict(decoding="contrastive", do_sample=False)),
    ({"penalty_alpha": 0.6, "temperature": 0.5}, dict(decoding="contrastive", do_sample=True, temperature=0.5)),
    ({"decoding": "contrastive", "temperature": 0.7, "seed": 5}, dict(do_sample=True, temperature=0.7, seed=5)),
    ({"decoding": "greedy", "temperature": 0}, dict(decoding="greedy")),
    ({"decoding": "sample", "top_p": 0.5}, dict(decoding="sample", top_p=0.5)),
    ({"do_sample": True}, dict(decoding="contrastive", do_sample=True)),  # the native meaning
    ({"max_tokens": 5, "stop": "\n"}, dict(max_new_tokens=5, stop=("\n",))),
    ({"stop": ["a", "b"], "max_tokens": None}, dict(stop=("a", "b"), max_new_tokens=64)),
    ({"temperature": 0.8, "seed": 11}, dict(decoding="sample", seed=11)),
    ({"temperature": 0, "seed": 11}, dict(decoding="greedy", seed=None)),  # deterministic: no seed needed
    ({"eos_token_id": [3, 4]}, dict(eos_token_id=(3, 4))),
    # null is "not given", and the fields that ask for nothing are accepted (what LangChain sends by default)
    ({"temperature": None, "logprobs": None, "best_of": 1, "logit_bias": {}, "suffix": "", "frequency_penalty": 0,
      "presence_penalty": 0.0, "user": "u-1", "echo": False, "n": 1, "seed": None, "stream": None},
     dict(decoding="contrastive", do_sample=False)),
    ({"model": MODEL, "logit_bias": None, "suffix": None}, dict(decoding="contrastive")),
    # scoring: logprobs (and with echo the prompt's), penalties and biases under their native names
    ({"logprobs": 3}, dict(logprobs=3, prompt_logprobs=None)),
    ({"logprobs": 0, "echo": True}, dict(logprobs=0, prompt_logprobs=0)),
    ({"logprobs": 5, "echo": True, "max_tokens": 0}, dict(logprobs=5, prompt_logprobs=5, max_new_tokens=0)),
    ({"echo": True, "max_tokens": 0}, dict(logprobs=None, prompt_logprobs=0, max_new_tokens=0)),
    ({"echo": True}, dict(logprobs=None, prompt_logprobs=None)),  # echo alone: the prompt's text, no scoring
    ({"logit_bias": {"3": -100, "999": 2.5}}, dict(logit_bias=((3, -100.0), (999, 2.5)))),
    ({"presence_penalty": 1.5, "frequency_penalty": -0.5}, dict(presence_penalty=1.5, frequency_penalty=-0.5)),
    ({"repetition_penalty": 1.3, "min_tokens": 4}, dict(repetition_penalty=1.3, min_tokens=4)),
    ({"logprobs": 1, "logprobs_source": "processed"}, dict(logprobs=1, logprobs_source="processed")),
    ({"temperature": 0, "logprobs": 1, "echo": True, "max_tokens": 1, "seed": 1234},  # lm-evaluation-harness's
     dict(decoding="greedy", logprobs=1, prompt_logprobs=1, max_new_tokens=1)),
]


@pytest.mark.parametrize("body,expect", MAPPED, ids=[json.dumps(b)[:60] for b, _ in MAPPED])
def test_fields_map_onto_generation_params(body, expect):
    params = mapped(body)
    assert not isinstance(params, tuple), params
    for name, value in expect.items():
        assert getattr(params, name) == value, name


REFUSED = [
    # id, body, status, param, words
    ("logprobs-over-limit", {"logprobs": 6}, 400, "logprobs", "logprobs must be <= 5, got 6"),
    ("logprobs-over-limit-echo", {"logprobs": 20, "echo": True}, 400, "logprobs", "logprobs must be <= 5"),
    ("logprobs-negative", {"logprobs": -1}, 400, "logprobs", ">= 0"),
    ("logprobs-bool", {"logprobs": True}, 400, "logprobs", "integer"),
    ("best-of", {"best_of": 2}, 400, "best_of", "not supported"),
    ("logit-bias-outside-vocabulary", {"logit_bias": {"50256": -100}}, 400, "logit_bias",
     "token id 50256, outside the vocabulary (ids 0 … 999)"),
    ("logit-bias-key", {"logit_bias": {"a": 1}}, 400, "logit_bias", "token ids written in decimal"),
    ("logit-bias-negative-key", {"logit_bias": {"-1": 1}}, 400, "logit_bias", "token ids written in decimal"),
    ("logit-bias-value", {"logit_bias": {"5": 101}}, 400, "logit_bias", "in [-100, 100], got 101 for '5'"),
    ("logit-bias-string-value", {"logit_bias": {"5": "1"}}, 400, "logit_bias", "numbers"),
    ("logit-bias-twice", {"logit_bias": {"5": 1, "05": 2}}, 400, "logit_bias", "twice"),
    ("logit-bias-list", {"logit_bias": [[5, 1]]}, 400, "logit_bias", "object"),
    ("logit-bias-too-many", {"logit_bias": {str(i): 1 for i in range(301)}}, 400, "logit_bias", "at most 300"),
    ("suffix", {"suffix": "end"}, 400, "suffix", "not supported"),
    ("frequency-penalty-over", {"frequency_penalty": 2.5}, 400, "frequency_penalty", "<= 2"),
    ("presence-penalty-under", {"presence_penalty": -3}, 400, "presence_penalty", ">= -2"),
    ("presence-penalty-bool", {"presence_penalty": False}, 400, "presence_penalty", "number"),
    ("repetition-penalty-zero", {"repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ("repetition-penalty-over", {"repetition_penalty": 11}, 400, "repetition_penalty", "<= 10"),
    ("min-tokens-over", {"min_tokens": 9, "max_tokens": 8}, 400, "min_tokens",
     "min_tokens must be <= max_tokens (8), got 9"),  # the other field named as this API names it
    ("min-tokens-negative", {"min_tokens": -1}, 400, "min_tokens", ">= 0"),
    ("logprobs-source", {"logprobs": 1, "logprobs_source": "logits"}, 400, "logprobs_source", "'raw', 'processed'"),
    ("max-tokens-zero-without-echo", {"max_tokens": 0, "logprobs": 1}, 400, "max_tokens", "only allowed with echo"),
    ("temperature-negative", {"temperature": -0.5}, 400, "temperature", ">= 0"),
    ("temperature-string", {"temperature": "hot"}, 400, "temperature", "number"),
    ("temperature-over", {"temperature": 101}, 400, "temperature", "<= 100"),
    ("greedy-with-temperature", {"decoding": "greedy", "temperature": 0.5}, 400, "temperature", "greedy"),
    ("sample-at-zero", {"decoding": "sample", "temperature": 0}, 400, "temperature", "greedy"),
    ("contrastive-do-sample-false", {"penalty_alpha": 0.6, "do_sample": False, "temperature": 0.7}, 400,
     "temperature", "contradicts do_sample"),
    ("top-p-with-greedy", {"temperature": 0, "top_p": 0.9}, 400, "top_p", "only to decoding='sample'"),
    ("top-p-zero", {"top_p": 0}, 400, "top_p", "> 0"),
    ("max-tokens-zero", {"max_tokens": 0}, 400, "max_tokens", "max_tokens 0 generates nothing"),
    ("max-tokens-negative", {"max_tokens": -1}, 400, "max_tokens", "max_tokens must be >= 1, got -1"),
    ("max-tokens-over", {"max_tokens": 1000}, 400, "max_tokens", "max_tokens must be <= 256"),
    ("max-tokens-float", {"max_tokens": 8.5}, 400, "max_tokens", "integer"),
    ("top-k-one", {"top_k": 1}, 400, "top_k", "top_k must be >= 2"),
    ("seed-over", {"temperature": 1, "seed": 2**32}, 400, "seed", "<= 4294967295"),
    ("seed-string", {"seed": "7"}, 400, "seed", "integer"),
    ("n-zero", {"n": 0}, 400, "n", "between 1 and 32"),
    ("n-over", {"n": 33}, 400, "n", "between 1 and 32"),
    ("n-string", {"n": "2"}, 400, "n", "integer"),
    ("choices-over", {"prompt": ["a", "b", "c"], "n": 11}, 400, "n", "33 choices; the limit is 32"),
    ("prompt-missing", {"prompt": None}, 400, "prompt", "required"),
    ("prompt-empty-list", {"prompt": []}, 400, "prompt", "non-empty list"),
    ("prompt-token-ids", {"prompt": [50, 51, 52]}, 400, "prompt", "token ids are not supported"),
    ("prompt-token-id-lists", {"prompt": [[50, 51]]}, 400, "prompt", "token ids are not supported"),
    ("prompt-mixed", {"prompt": ["a", 3]}, 400, "prompt", "prompt[1] must be a string"),
    ("prompt-whitespace", {"prompt": "  "}, 400, "prompt", "empty or only whitespace"),
    ("prompt-object", {"prompt": {"text": "hi"}}, 400, "prompt", "an object"),
    ("model-other", {"model": "gpt-3.5-turbo-instruct"}, 404, "model", "does not exist here"),
    ("model-number", {"model": 3}, 400, "model", "string"),
    ("stream-string", {"stream": "yes"}, 400, "stream", "true or false"),
    ("stream-options-alone", {"stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed"),
    ("stream-options-unknown", {"stream": True, "stream_options": {"usage": True}}, 400, "stream_options",
     "include_usage"),
    ("echo-string", {"echo": "yes"}, 400, "echo", "true or false"),
    ("user-number", {"user": 5}, 400, "user", "string"),
    ("unknown-field", {"temprature": 0.5}, 400, "temprature", "did you mean 'temperature'"),
    ("native-name", {"max_new_tokens": 8}, 400, "max_new_tokens", "did you mean 'max_tokens'"),
    ("native-only", {"return_token_ids": True}, 400, "return_token_ids", "unknown field"),
    ("stop-too-many", {"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("decoding-unknown", {"decoding": "beam"}, 400, "decoding", "one of"),
]


@pytest.mark.parametrize("name,body,status,param,words", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_fields_are_named_in_openai_shape(name, body, status, param, words):
    outcome = mapped(body)
    assert isinstance(outcome, tuple), f"accepted: {outcome}"
    got_status, error = outcome
    assert got_status == status
    assert error["param"] == param
    assert words in error["message"], error["message"]
    assert error["type"] == "invalid_request_error"
    assert isinstance(error["code"], str) and error["code"]


def test_unsupported_fields_have_their_own_code():
    for field in ("best_of", "suffix"):
        body = {field: "x" if field == "suffix" else 2}
        assert mapped(body)[1]["code"] == "unsupported_parameter", field


# ---- the handler through TorchServe's frontend ----


@pytest.fixture(autouse=True)
def nothing_left_open(request):
    """Every test leaves its handler with no open job and an idle engine: the frontend here reuses request ids
    from call to call (TorchServe's are unique), so a job left open would answer the next test's request."""
    yield
    for name in ("handler", "static_handler"):
        if name in request.fixturenames:
            h = request.getfixturevalue(name)
            assert not h.loop.jobs and not h.engine.busy, (h.loop.jobs, h.engine.stats())


def send(h, bodies: list, paths: list[str] | str = "v1/completions", **kw):
    """Requests with url_path set as TorchServe sets it; returns (statuses, full bodies, chunks per request)."""
    paths = [paths] * len(bodies) if isinstance(paths, str) else paths
    headers = [{"Content-Type": "application/json", "url_path": p} for p in paths]
    return h.frontend.serve(bodies, headers, **kw)


def events(text: str) -> list:
    """The SSE events of a streamed body: JSON objects, and "[DONE]"; the framing checked on the way."""
    assert text.endswith("\n\n"), text[-200:]
    out = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_lists_the_served_model(handler):
    codes, bodies, _ = send(handler, [b"", b"", b"{}"], ["v1/models", f"v1/models/{MODEL}", "v1/models"])
    assert codes == [200, 200, 200]  # TorchServe does not pass the method: any method lists the models
    listing, card, _ = map(json.loads, bodies)
    assert listing["object"] == "list" and listing["data"] == [card]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "torchserve"
    assert card["max_model_len"] == 512 and isinstance(card["created"], int)


@pytest.mark.parametrize("path,status,code,words", [
    ("v1/models/gpt-4", 404, "model_not_found", "'gpt-4' does not exist here"),
    ("v1/chat/completions", 404, "unsupported_endpoint", "GPT-2 has no chat template"),
    ("v1/embeddings", 404, "unknown_url", "known: v1/models, v1/models/<id>, v1/completions"),
    ("v1", 404, "unknown_url", "known: v1/models"),
])
def test_other_routes_answer_404_in_openai_shape(handler, path, status, code, words):
    codes, bodies, _ = send(handler, [b""], path)
    assert codes == [status]
    error = json.loads(bodies[0])["error"]
    assert error["code"] == code and words in error["message"]
    if path == "v1/chat/completions":
        assert "completions endpoint (v1/completions)" in error["message"]


def test_native_404_names_the_openai_routes_too(handler):
    codes, bodies, _ = send(handler, [b""], "v2/completions")
    assert codes == [404]
    body = json.loads(bodies[0])
    assert body["field"] == "url_path" and "'v1/completions'" in body["message"] and "'describe'" in body["message"]


@pytest.mark.parametrize("body,words", [
    (b"", "takes a JSON body: POST"),  # a GET: TorchServe hands over an empty body
    (b'{"prompt": "hi"', "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"prompt": "\xff"}', "UTF-8"),
    (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),  # TorchServe's worker passes deep nesting on as bytes
    (b'{"prompt": 1' + b"0" * 5000 + b"}", "number too long"),  # past Python's 4300 digits
    (b'{"prompt": "\\ud800x"}', "unpaired UTF-16 surrogate"),  # the tokenizer would raise: refused by name
    ({"prompt": "x" * 70_000}, None),  # under TorchServe's limit, over the handler's: refused by size below
])
def test_unreadable_bodies_are_400_in_openai_shape(handler, body, words):
    headers = {"Content-Type": "application/json", "url_path": "v1/completions"}
    if isinstance(body, dict):
        headers["Content-Length"] = str(len(json.dumps(body)))
    codes, bodies, _ = handler.frontend.serve([body], [headers])
    error = json.loads(bodies[0])["error"]
    if words is None:
        assert codes == [413] and "the limit is 65536 bytes" in error["message"]
    else:
        assert codes == [400] and words in error["message"], error
    assert error["param"] in (None, "prompt") and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("field,value", [("temperature", 10**400), ("top_p", -(10**400)), ("temperature", "0.5"),
                                         ("n", 2.0), ("echo", 1), ("seed", "7")],
                         ids=["huge-temperature", "huge-negative-top_p", "string-temperature", "float-n", "integer-echo",
                              "string-seed"])
def test_mistyped_and_unrepresentable_numbers_are_400_naming_the_field(handler, field, value):
    headers = {"Content-Type": "application/json", "url_path": "v1/completions"}
    body = json.dumps({"prompt": "hi", "max_tokens": 2, field: value})
    codes, bodies, _ = handler.frontend.serve([body.encode()], [headers])
    error = json.loads(bodies[0])["error"]
    assert codes == [400] and error["param"] == field and field in error["message"], error


def test_a_content_length_past_4300_digits_is_not_a_fault(handler):
    headers = {"Content-Type": "application/json", "url_path": "v1/completions", "Content-Length": "9" * 5000}
    codes, bodies, _ = handler.frontend.serve([{"prompt": "hi", "max_tokens": 2}], [headers])
    assert codes == [200], bodies  # the header is ignored; the body that arrived is what is read


def test_form_fields_are_refused_with_the_content_type_hint():
    """TorchServe form-decodes curl --data's default content type: the entry holds fields, not "body"."""
    with pytest.raises(RequestError) as err:
        read_body({"prompt": b"hi", "max_tokens": b"5"}, {"Content-Type": "application/x-www-form-urlencoded"},
                  65536)
    assert err.value.status == 400 and "Content-Type: application/json" in err.value.message


def test_a_completion_is_the_engines_answer(handler):
    prompt = "你是谁?"
    codes, bodies, _ = send(handler, [{"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}])
    assert codes == [200]
    assert handler.frontend.context.get_response_content_type(0) == "application/json"
    answer = json.loads(bodies[0])
    want = local(handler, prompt, decoding="greedy", max_new_tokens=12)
    assert answer["object"] == "text_completion" and answer["model"] == MODEL
    assert answer["id"].startswith("cmpl-") and isinstance(answer["created"], int)
    assert answer["choices"] == [{"text": want.text.text(), "index": 0,
                                  "finish_reason": "length" if str(want.finish_reason) == "length" else "stop",
                                  "logprobs": None}]
    n_prompt = len(handler.loaded.tokenizer.encode(prompt))
    assert answer["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": len(want.tokens),
                               "total_tokens": n_prompt + len(want.tokens)}


def test_default_decoding_is_the_operators_contrastive_search(handler):
    codes, bodies, _ = send(handler, [{"prompt": "A journey of", "max_tokens": 10, "echo": True}])
    assert codes == [200]
    [choice] = json.loads(bodies[0])["choices"]
    want = local(handler, "A journey of", max_new_tokens=10)  # the native default: contrastive, alpha 0.6, k 4
    assert choice["text"] == "A journey of" + want.text.text()


def test_prompts_and_n_are_choices_in_order_with_their_own_seeds(handler):
    prompts = ["春天来了", "Hello there"]
    # a high temperature: the trained tiny model is sure enough of its corpus that at 0.9 three samples of
    # nine tokens can agree
    body = {"prompt": prompts, "n": 3, "temperature": 1.8, "seed": 41, "max_tokens": 9, "ignore_eos": True}
    codes, bodies, _ = send(handler, [body])
    assert codes == [200]
    answer = json.loads(bodies[0])
    assert [c["index"] for c in answer["choices"]] == list(range(6))
    for c in answer["choices"]:
        p, j = divmod(c["index"], 3)
        want = local(handler, prompts[p], decoding="sample", temperature=1.8, seed=41 + j, max_new_tokens=9,
                     ignore_eos=True)
        assert c["text"] == want.text.text()
    assert len({c["text"] for c in answer["choices"][:3]}) > 1  # n samples of one prompt differ
    assert answer["usage"]["prompt_tokens"] == sum(len(handler.loaded.tokenizer.encode(p)) for p in prompts)
    assert answer["usage"]["completion_tokens"] == 6 * 9
    again = json.loads(send(handler, [body])[1][0])
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in answer["choices"]]  # the seed reproduces
    assert handler.engine.stats().slots_in_use == 0 and handler.engine.get("request-0#0") is None  # all forgotten


def test_a_stream_is_sse_events_that_join_to_the_answer(handler):
    body = {"prompt": ["你是谁?", "Who"], "max_tokens": 40, "temperature": 0, "n": 2}
    plain = json.loads(send(handler, [body])[1][0])
    codes, bodies, chunks = send(handler, [{**body, "stream": True, "stream_options": {"include_usage": True}}])
    assert codes == [200]
    assert handler.frontend.context.get_response_content_type(0) == "text/event-stream"
    assert len(chunks[0]) > 2  # events went out while the generations ran
    got = events(bodies[0])
    assert got[-1] == "[DONE]" and got.count("[DONE]") == 1
    *chunk_events, usage_event, _ = got
    assert usage_event["choices"] == [] and usage_event["usage"] == plain["usage"]
    texts, reasons = {}, {}
    for e in chunk_events:
        assert e["object"] == "text_completion" and e["id"] == got[0]["id"] and e["usage"] is None
        [choice] = e["choices"]
        assert choice["index"] not in reasons, "an event after the choice's finish_reason"
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"] is not None:
            reasons[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["text"] for c in plain["choices"]}
    assert reasons == {c["index"]: c["finish_reason"] for c in plain["choices"]}


def test_a_stream_echoes_the_prompt_first(handler):
    codes, bodies, _ = send(handler, [{"prompt": "Hello", "max_tokens": 20, "temperature": 0, "stream": True,
                                       "echo": True}])
    got = events(bodies[0])
    assert codes == [200] and "usage" not in got[0]
    assert got[0]["choices"][0]["text"].startswith("Hello")
    text = "".join(e["choices"][0]["text"] for e in got[:-1])
    assert text == "Hello" + local(handler, "Hello", decoding="greedy", max_new_tokens=20).text.text()


def test_openai_and_native_requests_share_a_batch(handler):
    bodies = [{"prompt": "a", "max_tokens": 6, "temperature": 0}, {"prompt": "b", "max_new_tokens": 5},
              {"prompt": "c", "logprobs": 9}, {"prompt": "d", "top_k": 1}]
    codes, texts, _ = send(handler, bodies, ["v1/completions", "", "v1/completions", ""])
    assert codes == [200, 200, 400, 400]
    assert json.loads(texts[0])["usage"]["completion_tokens"] == 6
    assert json.loads(texts[1])["completion_tokens"] == 5  # the native answer, unchanged
    assert json.loads(texts[2])["error"]["param"] == "logprobs"
    assert json.loads(texts[3]) == {"code": 400, "type": "InvalidRequest", "field": "top_k",
                                    "message": "top_k must be >= 2, got 1"}


def test_a_prompt_of_a_list_over_the_limit_is_named_by_its_index(handler):
    codes, bodies, _ = send(handler, [{"prompt": ["ok", "春天来了，花开了。" * 40]}])
    assert codes == [400]
    error = json.loads(bodies[0])["error"]
    assert error["param"] == "prompt" and error["message"].startswith("prompt[1]: prompt is")
    assert "the limit is 64" in error["message"]
    assert not handler.engine.busy  # nothing of it reached the engine


def test_a_client_that_goes_away_frees_every_choice(handler):
    before = handler.engine.stats().generated_tokens
    body = {"prompt": "I will hang up", "n": 3, "temperature": 0, "max_tokens": 90, "stream": True}
    # it goes away after the first call's chunk; "I stay" is running then, so the frontend calls again
    codes, _, chunks = send(handler, [body, {"prompt": "I stay", "max_tokens": 90, "temperature": 0}], drop={0: 1})
    assert codes == [200, 200] and len(chunks[0]) == 1
    after = handler.engine.stats()
    assert after.slots_in_use == 0 and after.waiting == 0
    assert after.generated_tokens - before < 90 + 3 * 30  # the three choices stopped generating at once
    assert all(handler.engine.get(f"request-0#{i}") is None for i in range(3))


def test_out_of_memory_in_one_choice_is_507_for_the_call_alone(handler, monkeypatch):
    import handler.engine.runner as runner

    real = runner.prefill_slot
    bad = handler.loaded.tokenizer.encode("b")

    def oom_for_b(model, pool, slot, prompt_ids, *args):
        if list(prompt_ids) == bad:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, pool, slot, prompt_ids, *args)

    monkeypatch.setattr(runner, "prefill_slot", oom_for_b)
    codes, bodies, _ = send(handler, [{"prompt": ["a", "b"], "max_tokens": 30, "temperature": 0},
                                      {"prompt": "c", "max_tokens": 6, "temperature": 0}])
    assert codes == [507, 200]
    error = json.loads(bodies[0])["error"]
    assert error["type"] == "server_error" and error["code"] == "insufficient_memory"
    assert "out of memory" in error["message"]
    assert json.loads(bodies[1])["usage"]["completion_tokens"] == 6
    assert handler.engine.stats().slots_in_use == 0 and not handler.engine.busy  # choice "a" was cancelled


def test_a_failure_after_events_went_out_is_an_error_event(handler, monkeypatch):
    import handler.engine.runner as runner

    real, calls = runner.decode_one_token, {"n": 0}

    def fails_later(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 12:
            raise ValueError("a bug")
        return real(*args, **kw)

    monkeypatch.setattr(runner, "decode_one_token", fails_later)
    codes, bodies, chunks = send(handler, [{"prompt": "Hello", "max_tokens": 90, "temperature": 0,
                                            "stream": True}])
    monkeypatch.undo()
    assert codes == [200] and len(chunks[0]) > 1  # the status line had gone out with the first events
    got = events(bodies[0])
    assert got[-1] == "[DONE]" and got[-2]["error"]["type"] == "server_error"
    assert "ValueError" in got[-2]["error"]["message"]


def test_run_to_completion_streams_events_as_intermediate_responses(static_handler):
    body = {"prompt": "你是谁?", "max_tokens": 40, "temperature": 0, "stream": True}
    codes, bodies, _ = send(static_handler, [body])
    assert codes == [200]
    sent = b"".join(static_handler.frontend.context.cl_socket.sent).decode("utf-8", errors="replace")
    early = [json.loads(m) for m in re.findall(r"data: (\{.*?\})\n\n", sent)]
    assert early and all(e["choices"][0]["finish_reason"] is None for e in early)  # sent before the end
    final = events(bodies[0])
    assert final[-1] == "[DONE]" and final[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    plain = json.loads(send(static_handler, [{**body, "stream": False}])[1][0])
    assert "".join(e["choices"][0]["text"] for e in early + final[:-1]) == plain["choices"][0]["text"]


def test_the_docs_table_lists_the_fields_the_code_knows_with_the_shipped_config():
    from handler.serving.openai.protocol import FIELDS

    lines = (REPO / "docs" / "openai-api.md").read_text(encoding="utf-8").splitlines()
    start = lines.index("| OpenAI field | type | here |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        name, _type, becomes = (cell.strip() for cell in line.strip("|").split("|", 2))
        rows[name.strip("`")] = becomes
    assert list(rows) == list(FIELDS)
    limits, defaults = SETTINGS.limits, SETTINGS.defaults
    assert f"1 … {limits.max_new_tokens}; absent: the operator's default ({defaults.max_new_tokens})" in \
        rows["max_tokens"]
    assert f"(`{defaults.decoding}`)" in rows["temperature"]
    assert f"at most {limits.max_stop_strings} strings of 1 … {limits.max_stop_length} characters" in rows["stop"]
    assert f"`limits.max_choices` ({limits.max_choices}," in rows["n"]
    assert f"0 … `limits.max_logprobs` ({limits.max_logprobs})" in rows["logprobs"]



def test_logprobs_plain_and_streamed_agree_and_echo_scores_the_prompt(handler):
    """Through the handler and the engine: the stream's chunks carry their tokens' logprobs, joined they are the
    plain answer's; echo puts the prompt's tokens first (the first one null), also with max_tokens 0."""
    body = {"prompt": ["你是谁?", "Who are you"], "max_tokens": 30, "temperature": 0, "logprobs": 2, "echo": True,
            "ignore_eos": True}
    plain = json.loads(send(handler, [body])[1][0])
    got = events(send(handler, [{**body, "stream": True}])[1][0])
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    joined = {}
    for e in got[:-1]:
        [c] = e["choices"]
        into = joined.setdefault(c["index"], {"text": "", **{k: [] for k in keys}})
        into["text"] += c["text"]
        for k in keys:
            into[k] += c["logprobs"][k]
    for choice in plain["choices"]:
        lp, prompt = choice["logprobs"], body["prompt"][choice["index"]]
        n = len(handler.loaded.tokenizer.encode(prompt))
        assert joined[choice["index"]] == {"text": choice["text"], **lp}
        assert choice["text"].startswith(prompt) and len(lp["tokens"]) == n + 30
        assert lp["token_logprobs"][0] is None and lp["text_offset"][n] == len(prompt)
        assert all(lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values()) for i in range(n, n + 30))
    scored = json.loads(send(handler, [{**body, "max_tokens": 0}])[1][0])
    for choice, full in zip(scored["choices"], plain["choices"]):
        n = len(choice["logprobs"]["tokens"])
        assert choice["text"] == body["prompt"][choice["index"]] and choice["finish_reason"] == "length"
        assert choice["logprobs"] == {k: v[:n] for k, v in full["logprobs"].items()}
    assert scored["usage"]["completion_tokens"] == 0
