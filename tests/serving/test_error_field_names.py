"""Errors name the field at fault in a form every answer can carry, on both APIs.

JSON lets a key hold an unpaired surrogate (`{"\\udfff": 1}`), which UTF-8 cannot encode. An error that
names such a field shows it escaped (`handler.serving.errors.field_label`, the one place for both APIs),
and its answer goes through TorchServe's own encoding as a 400, never a 500.
The same request against a live server: tests/e2e/test_bad_input.py.
"""

from __future__ import annotations

import json

import pytest

from handler.serving.errors import RequestError, field_label
from handler.serving.openai.protocol import OpenAIError, error_object
from tests.serving.handlers import LIMITS, make_handler

# (id, raw JSON body, the field the error names, as shown)
BODIES = [
    ("lone-low-surrogate-key", b'{"prompt": "hi", "\\udfff": 1}', "\\udfff"),
    ("lone-high-surrogate-in-a-key", b'{"prompt": "hi", "a\\ud800b": 1}', "a\\ud800b"),
    ("surrogate-key-in-a-nested-value", b'{"prompt": "hi", "stop": [{"\\udc80": 1}]}', "stop"),
]
ROUTES = {"native": "", "openai": "v1/completions"}


@pytest.fixture(scope="module")
def handler(tiny_model_dir):
    return make_handler(tiny_model_dir, warmup=False, limits=LIMITS)


@pytest.mark.parametrize("name,shown", [("temperature", "temperature"), ("你好", "你好"), ("\udfff", "\\udfff"),
                                        ("x\ud83d", "x\\ud83d"), ("😀\udc00", "😀\\udc00")])
def test_field_label_escapes_only_what_utf8_cannot_carry(name, shown):
    assert field_label(name) == shown
    assert RequestError(name, "m").field == shown and OpenAIError(name, "m").field == shown
    shown.encode("utf-8")


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("body,field", [(b, f) for _, b, f in BODIES], ids=[i for i, _, _ in BODIES])
def test_a_surrogate_field_name_is_a_400_naming_it_on_both_apis(handler, route, body, field):
    headers = {"Content-Type": "application/json", "url_path": ROUTES[route]}
    codes, texts, _ = handler.frontend.serve([body], [headers])  # through TorchServe's own response encoding
    assert codes == [400], texts
    answer = json.loads(texts[0].encode("utf-8"))
    if route == "openai":
        assert answer["error"]["param"] == field and answer["error"]["type"] == "invalid_request_error", answer
        assert "surrogate" in answer["error"]["message"]
    else:
        assert answer["field"] == field and answer["code"] == 400 and "surrogate" in answer["message"], answer


def test_the_openai_error_object_names_the_escaped_field():
    error = error_object(OpenAIError("\udfff", "unknown field '\\udfff'", code="unknown_parameter"))["error"]
    assert error["param"] == "\\udfff"
    json.dumps(error, ensure_ascii=False).encode("utf-8")
