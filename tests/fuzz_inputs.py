"""What a client can send, as `hypothesis` strategies, and how TorchServe's worker hands it to the handler.

Two levels:

- HTTP (`http_requests`): a URL suffix, a Content-Type, extra headers and the body's bytes; what the live
  fuzz (tests/e2e/test_fuzz_live.py) sends to a real server.
- Worker (`worker_requests`): the same request after TorchServe's frontend and Python worker: the batch entry
  (`{"body": ...}` or one key per form field) and the request's headers, decoded by TorchServe's own code
  (`ts.protocol.otf_message_handler._retrieve_request`, `ts.service.Service.retrieve_data_for_inference`),
  so that JSON arrives parsed, text decoded, and anything else as bytes, exactly as in a worker.

The bodies are built to reach every step of the path: any bytes; JSON of any shape, nested thousands of
levels deep, with NaN, infinities, integers of thousands of digits; any Unicode in strings and keys
(unpaired surrogates, NUL, noncharacters); request-shaped objects whose fields have the right type or any
other, so that validation is reached past the first check; form fields; headers the worker, TorchServe's
base handler or this handler read (Content-Type, Content-Length, url_path, describe, explain, ...).
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

from hypothesis import strategies as st
from ts.protocol.otf_message_handler import _retrieve_request
from ts.service import Service

from handler.engine.params import DECODING_MODES
from handler.serving.fields import BY_NAME

# ---- text and JSON values ----

ANY_CHAR = st.characters(exclude_categories=())  # every code point, unpaired surrogates and NUL included
ODD = st.sampled_from(["\ud800", "\udfff", "\ud83d", "\x00", "\ufffd", "\ufeff", "\uffff", "\U0010ffff", "\u202e",
                       "e\u0301", "\r\n", "\t", "\\", '"', "{", "="])
WORDS = st.sampled_from(["你好", "hello", "春天来了", " ", "the", "。"])
TEXT = st.lists(st.one_of(ANY_CHAR, ODD, WORDS), max_size=12).map("".join)  # anything, unpaired surrogates too
UNICODE = st.lists(st.characters(exclude_categories=("Cs",)) | WORDS, max_size=12).map("".join)  # valid text
# integers beyond a float (1.8e308) and up to Python's 4300-digit conversion limit, either sign
HUGE_INT = st.builds(lambda digits, sign, low: sign * (10**digits + low), st.integers(300, 4200),
                     st.sampled_from([1, -1]), st.integers(0, 10**6))
INTEGERS = st.integers() | HUGE_INT
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.none() | st.booleans() | INTEGERS | FLOATS | TEXT
KEYS = st.sampled_from(sorted(BY_NAME) + ["prompt"]) | TEXT
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(KEYS, inner, max_size=4), max_leaves=10)


def nested(depth: int, leaf, kind: str):
    """`leaf` inside `depth` lists or objects."""
    for _ in range(depth):
        leaf = [leaf] if kind == "list" else {"a": leaf}
    return leaf


# objects json.dumps can still write; nesting past the parsers' recursion limits is built as text (BODIES)
DEEP = st.builds(nested, st.integers(1, 400), SCALARS, st.sampled_from(["list", "object"]))


def field_values(name: str):
    """Values for one request field: mostly its own type, in and out of range, sometimes any JSON."""
    typed = {
        "max_new_tokens": st.integers(-2, 300) | HUGE_INT,
        "decoding": st.sampled_from(DECODING_MODES) | TEXT,
        "penalty_alpha": st.floats(-1, 2) | FLOATS | HUGE_INT,
        "top_k": st.integers(-2, 60_000) | HUGE_INT,
        "do_sample": st.booleans(),
        "temperature": st.floats(-1, 150) | FLOATS | HUGE_INT,
        "top_p": st.floats(-1, 2) | FLOATS | HUGE_INT,
        "stop": st.lists(UNICODE | TEXT, max_size=6) | UNICODE | TEXT,
        "seed": st.integers(-1, 2**33) | HUGE_INT,
        "eos_token_id": st.integers(-1, 3000) | st.lists(st.integers(-1, 3000), max_size=10),
        "ignore_eos": st.booleans(),
        "stream": st.booleans(),
        "return_token_ids": st.booleans(),
        "repetition_penalty": st.floats(-1, 12) | FLOATS | HUGE_INT,
        "presence_penalty": st.floats(-3, 3) | FLOATS | HUGE_INT,
        "frequency_penalty": st.floats(-3, 3) | FLOATS | HUGE_INT,
        "logit_bias": st.dictionaries(st.integers(-1, 3000).map(str) | TEXT, st.floats(-150, 150) | FLOATS | INTEGERS,
                                      max_size=4),
        "min_tokens": st.integers(-2, 300) | HUGE_INT,
        "logprobs": st.integers(-1, 25) | HUGE_INT,
        "prompt_logprobs": st.integers(-1, 25) | HUGE_INT,
        "logprobs_source": st.sampled_from(["raw", "processed"]) | TEXT,
    }[name]
    return st.one_of(typed, typed, typed, JSON_VALUES, DEEP)


PROMPTS = st.one_of(UNICODE, UNICODE, UNICODE, TEXT, st.sampled_from(["你好", "Hello", " ", "", "\x00", "\ud800x"]),
                    JSON_VALUES)


def _request_object(fields: dict, extra: dict, keep_prompt: bool) -> dict:
    obj = {**fields, **extra}
    if not keep_prompt:
        obj.pop("prompt", None)
    return obj


REQUEST_OBJECTS = st.builds(  # {"prompt": ..., some fields, maybe unknown keys}; one in ten without a prompt
    _request_object,
    st.fixed_dictionaries({"prompt": PROMPTS}, optional={name: field_values(name) for name in BY_NAME}),
    st.dictionaries(KEYS, JSON_VALUES, max_size=2) | st.just({}) | st.just({}),
    st.sampled_from([True] * 9 + [False]),
)

# ---- bodies (bytes) ----


def json_bytes(value, ascii_only: bool) -> bytes:
    """`value` as JSON text; unpaired surrogates either escaped (valid JSON) or encoded raw (invalid UTF-8)."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def splice(data: bytes, at: int, cut: int, insert: bytes) -> bytes:
    at = at % (len(data) + 1)
    return data[:at] + insert + data[at + cut:]


JSON_BODIES = st.builds(json_bytes, REQUEST_OBJECTS | REQUEST_OBJECTS | JSON_VALUES | DEEP, st.booleans())
BODIES = st.one_of(
    JSON_BODIES, JSON_BODIES, JSON_BODIES,
    st.builds(splice, JSON_BODIES, st.integers(0, 10**6), st.integers(0, 8), st.binary(max_size=6)),  # mangled
    st.binary(max_size=200),
    TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),  # nested past any recursion limit
    st.integers(1, 5000).map(lambda n: b'{"prompt": "hi", "stop": ' + b"[" * n + b"]" * n + b"}"),
    st.builds(lambda n, name: b'{"prompt": "hi", "%s": %s}' % (name.encode(), b"9" * n),  # past 4300 digits too
              st.integers(300, 6000), st.sampled_from(sorted(BY_NAME))),
    st.dictionaries(TEXT, TEXT, max_size=4).map(lambda d: urlencode(
        {k.encode("utf-8", "surrogatepass"): v.encode("utf-8", "surrogatepass") for k, v in d.items()}).encode()),
)

CONTENT_TYPES = st.sampled_from([
    "application/json", "application/json", "application/json; charset=utf-8", "APPLICATION/JSON", "text/plain",
    "text/plain; charset=latin-1", "text/html", "application/x-www-form-urlencoded", "application/octet-stream",
    "application/jsonl", "", "*/*", ";", "application/json;;;",
]) | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)

# headers read by someone on the way: TorchServe's worker and base handler, this handler
HEADER_NAMES = ["Content-Type", "content-type", "Content-Length", "url_path", "X-Fault-Injection", "describe",
                "explain", "Accept", "body", "data", "prompt"]
HEADER_VALUES = st.sampled_from(["True", "true", "oom", "describe", "", "0", "²", "١٢", "-5", "99999999999999999999",
                                 "9" * 5000, "v1/completions", "/", "../..", "application/json"]) | \
    st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs",)), max_size=20)
SUFFIXES = st.sampled_from(["", "", "", "", "describe", "/describe/", "describe/x", "v1/completions", "%00", "..",
                            "DESCRIBE"]) | st.text(st.characters(min_codepoint=33, max_codepoint=126,
                                                                 exclude_characters="?#%/\\"), max_size=12)


@dataclass
class HttpRequest:
    """One request as a client sends it to /predictions/<model>[/<version>/<suffix>]."""

    suffix: str
    content_type: str | None
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def http_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.content_type is not None:  # an HTTP client sends no leading whitespace in a header value
            headers["Content-Type"] = self.content_type.lstrip(" \t")
        return headers


HTTP_HEADER_NAMES = st.sampled_from(["describe", "explain", "url_path", "X-Fault-Injection", "Accept", "body",
                                     "prompt", "Describe"]) | \
    st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"), min_size=1,
            max_size=12).filter(lambda n: n.lower() not in {"host", "content-length", "transfer-encoding",
                                                             "connection", "expect", "authorization", "te",
                                                             "upgrade", "trailer", "keep-alive", "content-type"})
HTTP_HEADER_VALUES = st.sampled_from(["True", "true", "oom", "describe", "0", "v1/completions", "x"]) | \
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=20)

http_requests = st.builds(
    HttpRequest, st.integers(0, 4).flatmap(lambda n: SUFFIXES if n == 0 else st.just("")),  # mostly generation
    CONTENT_TYPES | st.none(), BODIES,
    st.dictionaries(HTTP_HEADER_NAMES, HTTP_HEADER_VALUES, max_size=3),
)

# ---- what the Python worker hands the handler ----


class _Frames:
    """A socket that holds one message of the frontend, for TorchServe's own decoder."""

    def __init__(self, data: bytes):
        self.data, self.at = bytes(data), 0

    def recv(self, n: int) -> bytes:
        chunk = self.data[self.at:self.at + n]
        self.at += len(chunk)
        return chunk


def _framed(value: bytes) -> bytes:
    return struct.pack("!i", len(value)) + value


def as_worker(parameters: list[tuple[str, str, bytes]], headers: dict[str, str]) -> tuple[dict, dict]:
    """(batch entry, request headers) as TorchServe 0.12's Python worker decodes this request's frame."""
    frame = _framed(b"fuzz")
    for name, value in headers.items():
        frame += _framed(name.encode()) + _framed(value.encode())
    frame += struct.pack("!i", -1)
    for name, content_type, value in parameters:
        frame += _framed(name.encode("utf-8", "surrogatepass")) + _framed(content_type.encode()) + _framed(value)
    frame += struct.pack("!i", -1)
    logging.disable(logging.WARNING)  # the worker logs a traceback for every body that is not JSON
    try:
        request = _retrieve_request(_Frames(frame))
        processors, batch, _ = Service.retrieve_data_for_inference([request])
    finally:
        logging.disable(logging.NOTSET)
    return batch[0], processors[0].get_request_properties()


def frontend_parameters(request: HttpRequest) -> list[tuple[str, str, bytes]]:
    """The parameters TorchServe's frontend makes of a request: form fields decoded, else one "body"."""
    content_type = request.content_type or ""
    if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(request.body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            return []
        return [(k, "", v.encode("utf-8", "surrogatepass")) for k, v in pairs if k]
    return [("body", content_type, request.body)]


FORM_VALUES = st.one_of(
    TEXT.map(lambda t: ("", t.encode("utf-8", "surrogatepass"))),
    st.binary(max_size=20).map(lambda b: ("", b)),
    st.builds(lambda v, a: ("application/json", json_bytes(v, a)), JSON_VALUES, st.booleans()),
    st.builds(lambda n: ("", str(n).encode()), st.integers(-3, 300) | HUGE_INT),
)
def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# field names travel as UTF-8 from the frontend: valid Unicode, not empty
MULTIPART = st.dictionaries(KEYS.filter(lambda k: k != "" and _encodable(k)) | st.just("prompt"),
                            FORM_VALUES, max_size=5).map(
    lambda d: [(k, ct, v) for k, (ct, v) in d.items()])


@st.composite
def worker_requests(draw) -> tuple[dict, dict]:
    """(entry, headers) as the handler receives them: a body, or form fields (multipart: any types)."""
    http = draw(http_requests)
    parameters = frontend_parameters(http) if draw(st.integers(0, 3)) else draw(MULTIPART)
    headers = {**{k: v for k, v in http.http_headers().items() if k != "Content-Type"},
               **draw(st.dictionaries(st.sampled_from(HEADER_NAMES), HEADER_VALUES, max_size=3))}
    if http.content_type is not None:
        headers["Content-Type"] = http.content_type
    headers["url_path"] = http.suffix if draw(st.integers(0, 4)) == 0 else ""  # mostly generation: the deeper path
    if draw(st.booleans()):
        headers["Content-Length"] = draw(st.sampled_from([str(len(http.body))]) | HEADER_VALUES)
    return as_worker(parameters, headers)
