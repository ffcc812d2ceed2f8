"""Reading a TorchServe batch entry into a prompt and fields, for every way a body can arrive."""

from __future__ import annotations

import pytest

from handler.serving.errors import RequestError
from handler.serving.native import read_request

JSON = {"Content-Type": "application/json"}
LIMIT = 1000

OK = [
    ({"body": {"prompt": "你是谁?"}}, JSON, "你是谁?", {}),
    ({"body": {"prompt": "hi", "top_k": 3}}, JSON, "hi", {"top_k": 3}),
    ({"data": {"prompt": "hi"}}, JSON, "hi", {}),
    ({"body": "plain prompt"}, {"Content-Type": "text/plain"}, "plain prompt", {}),
    ({"body": b"bytes prompt"}, {"Content-Type": "application/octet-stream"}, "bytes prompt", {}),
    ({"body": '{"prompt": "x"}'.encode()}, {}, "x", {}),
    ({"body": bytearray('{"prompt": "中文"}'.encode())}, {"content-type": "application/json"}, "中文", {}),
    ({"prompt": "form", "max_new_tokens": "5", "decoding": "greedy"}, {"Content-Type": "multipart/form-data"},
     "form", {"max_new_tokens": 5, "decoding": "greedy"}),
    ({"prompt": b"123"}, {"Content-Type": "application/x-www-form-urlencoded"}, "123", {}),
]


@pytest.mark.parametrize("entry,headers,prompt,fields", OK)
def test_readable_bodies(entry, headers, prompt, fields):
    raw = read_request(entry, headers, LIMIT)
    assert raw.prompt == prompt and raw.fields == fields


BAD = [
    ({"body": b'{"prompt": '}, JSON, 400, "body", "not valid JSON"),
    ({"body": b"\xff\xfe"}, {}, 400, "body", "not valid UTF-8"),
    ({"body": [1]}, JSON, 400, "body", "JSON object"),
    ({"body": "text"}, JSON, 400, "body", "JSON object"),
    ({"body": b"x" * 1001}, {}, 413, "body", "body is 1001 bytes; the limit is 1000 bytes"),
    ({"body": {"prompt": "x"}}, {**JSON, "Content-Length": "5000"}, 413, "body", "the limit is 1000"),
    ({"body": {}}, JSON, 400, "prompt", "prompt is required"),
    ({"body": {"prompt": 3}}, JSON, 400, "prompt", "must be a string"),
    ({"body": {"prompt": "\n "}}, JSON, 400, "prompt", "must not be empty or only whitespace"),
    ({"body": "   "}, {"Content-Type": "text/plain"}, 400, "prompt", "the body is empty"),
    ({"body": ""}, {}, 400, "prompt", "the body is empty"),
    ({}, {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "24"}, 400, "body",
     "form decoder dropped it"),
    ({}, {}, 400, "prompt", "the body is empty"),
    ({'{"prompt": "a': b"", 'b"}': b""}, {"Content-Type": "application/x-www-form-urlencoded"}, 400, "body",
     "arrived mangled"),
    ({"prompt": b"\xff"}, {}, 400, "prompt", "not valid UTF-8"),
]


@pytest.mark.parametrize("entry,headers,status,field,words", BAD)
def test_unreadable_bodies(entry, headers, status, field, words):
    with pytest.raises(RequestError) as err:
        read_request(entry, headers, LIMIT)
    assert (err.value.status, err.value.field) == (status, field)
    assert words in err.value.message
