"""Reading one TorchServe request entry into a prompt and its fields.

TorchServe hands the handler one dict per request. What is in it depends on
how the client sent the body (seen on TorchServe 0.12.0):

- ``application/json``: ``{"body": <parsed JSON>}``, or the raw bytes when the
  JSON did not parse.
- ``text/*``: ``{"body": <str>}``; other types: ``{"body": <bytes>}``.
- ``application/x-www-form-urlencoded`` (what ``curl --data`` sends unless told
  otherwise) and ``multipart/form-data``: one key per form field. A JSON body sent
  that way loses everything up to the first ``=`` or is dropped entirely, so it
  is refused with a message that says to send ``Content-Type: application/json``.

A JSON object is ``{"prompt": "...", ...parameters}``; a plain-text body is a
prompt with default parameters; form fields ``prompt=...&max_new_tokens=...``
are accepted too (values other than the prompt are read as JSON when they parse).

Every string of a request, names included, must be Unicode text that UTF-8 can
carry: JSON may escape an unpaired surrogate (``"\ud800"``), which no tokenizer
takes and no answer can echo, so it is refused naming the field it is in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from handler.serving.errors import RequestError

JSON_HINT = "send JSON with the header 'Content-Type: application/json'"


@dataclass(frozen=True)
class RawRequest:
    prompt: str
    fields: dict[str, Any]  # everything but the prompt, not yet validated


def header(headers: Mapping[str, Any], name: str) -> str:
    """A request header by case-insensitive name ('' when absent)."""
    lowered = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == lowered and isinstance(value, str):
            return value
    return ""


def content_length(headers: Mapping[str, Any]) -> int | None:
    """The Content-Length header as a number of bytes, or None when absent or not a plain decimal number."""
    value = header(headers, "Content-Length").strip()
    if not (value.isascii() and value.isdigit()):  # "²".isdigit() is true, and int("²") fails
        return None
    try:
        return int(value)
    except ValueError:  # more digits than Python converts (4300): no body is that long
        return None


def read_request(entry: Mapping[str, Any], headers: Mapping[str, Any], max_body_bytes: int) -> RawRequest:
    """One batch entry (and its request headers) -> prompt and fields; RequestError when unreadable."""
    content_type = header(headers, "Content-Type").split(";")[0].strip().lower()
    length = content_length(headers)
    if length is not None and length > max_body_bytes:
        raise _too_large(length, max_body_bytes)

    if "body" in entry or "data" in entry:
        body = entry["body"] if "body" in entry else entry["data"]
        return _from_body(body, content_type, max_body_bytes)
    return _from_form(entry, content_type, length)


def _too_large(size: int, limit: int) -> RequestError:
    return RequestError("body", f"body is {size} bytes; the limit is {limit} bytes", status=413)


def parse_json(text: str) -> Any:
    """JSON text -> value; RequestError naming the body for anything Python's parser refuses, including
    nesting deeper than its recursion limit and integers longer than its 4300 digits."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RequestError("body", f"body is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})"
                           ) from None
    except RecursionError:
        raise RequestError("body", "body is nested too deeply to read; a request is one flat JSON object of "
                           "fields") from None
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise RequestError("body", f"body holds a number too long to read ({str(err).split(';')[0]}); no field "
                           "takes such a number") from None


def _unpaired_surrogate(text: str) -> str | None:
    """Where `text` holds a code point UTF-8 cannot carry (an unpaired surrogate), described; else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"U+{ord(text[err.start]):04X} at character {err.start}"
    return None


def check_text(name: str, value: Any) -> None:
    """RequestError naming field `name` when a string in `value` (keys included) is not valid Unicode."""
    stack = [value]
    while stack:  # no recursion: a value may be nested as deeply as the parser allowed
        item = stack.pop()
        if isinstance(item, str):
            where = _unpaired_surrogate(item)
            if where:
                shown = ascii(name) if _unpaired_surrogate(name) else name
                raise RequestError(name, f"{shown} holds an unpaired UTF-16 surrogate ({where}), which is not "
                                   "Unicode text: send whole characters (a surrogate pair, or the character "
                                   "itself in UTF-8)")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _from_body(body: Any, content_type: str, max_body_bytes: int) -> RawRequest:
    if isinstance(body, (bytes, bytearray)):
        if len(body) > max_body_bytes:
            raise _too_large(len(body), max_body_bytes)
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RequestError("body", f"body is not valid UTF-8 ({err.reason} at byte {err.start})") from None
        if content_type == "application/json" or text.lstrip().startswith("{"):
            body = parse_json(text)
        else:
            return _from_text(text)
    if isinstance(body, str) and content_type != "application/json":
        return _from_text(body)
    if not isinstance(body, dict):
        raise RequestError("body", 'body must be a JSON object such as {"prompt": "..."}')
    return _from_object(body)


def _from_text(text: str) -> RawRequest:
    check_text("prompt", text)
    if not text.strip():
        raise RequestError("prompt", 'the body is empty: send {"prompt": "..."} or the prompt as text/plain')
    return RawRequest(text, {})


def check_fields_text(obj: dict[str, Any]) -> None:
    """RequestError naming the first field whose name or value holds a string that is not valid Unicode."""
    for key, value in obj.items():
        check_text(key, key)
        check_text(key, value)


def _from_object(obj: dict[str, Any]) -> RawRequest:
    check_fields_text(obj)
    if "prompt" not in obj:
        raise RequestError("prompt", "prompt is required")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise RequestError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RequestError("prompt", "prompt must not be empty or only whitespace")
    fields = {k: v for k, v in obj.items() if k != "prompt"}
    return RawRequest(prompt, fields)


def _from_form(entry: Mapping[str, Any], content_type: str, length: int | None) -> RawRequest:
    if not entry:
        if length:
            raise RequestError(
                "body",
                f"the body was sent as {content_type or 'form data'} (curl --data's default) and TorchServe's form "
                f"decoder dropped it; {JSON_HINT}",
            )
        raise RequestError("prompt", 'the body is empty: send {"prompt": "..."}')
    if any(isinstance(key, str) and key.lstrip().startswith("{") for key in entry):
        raise RequestError(
            "body", f"the JSON body was sent as {content_type or 'form data'} and arrived mangled; {JSON_HINT}"
        )
    obj: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, (bytes, bytearray)):
            try:
                value = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(key, f"form field {key!r} is not valid UTF-8") from None
        if key != "prompt" and isinstance(value, str):
            try:
                value = parse_json(value)
            except RequestError:
                pass  # a plain string, e.g. decoding=greedy
        obj[key] = value
    return _from_object(obj)
