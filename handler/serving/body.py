"""The request body, read once for every API: its size, its encoding, its JSON and its content type.

TorchServe hands the handler one dict per request. What is in it depends on
how the client sent the body (seen on TorchServe 0.12.0):

- ``application/json``: ``{"body": <parsed JSON>}``, or the raw bytes when the
  JSON did not parse.
- ``text/*``: ``{"body": <str>}``; other types: ``{"body": <bytes>}``.
- ``application/x-www-form-urlencoded`` (what ``curl --data`` sends unless told
  otherwise) and ``multipart/form-data``: one key per form field.

Each API decides what a body means (`handler.serving.native`,
`handler.serving.openai.protocol`); the rules every body obeys are here:

- size: the declared `Content-Length` and the bytes themselves within
  `limits.max_body_bytes` (413);
- encoding: UTF-8, and every string of it, names included, Unicode text that
  UTF-8 can carry (JSON may escape an unpaired surrogate, ``"\\ud800"``, which no
  tokenizer takes and no answer can echo: refused naming the field it is in);
- JSON: what Python's parser refuses, nesting deeper than its recursion limit
  and integers longer than its 4300 digits included, is a 400 naming the body.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from handler.serving.errors import RequestError

JSON_HINT = "send JSON with the header 'Content-Type: application/json'"


def header(headers: Mapping[str, Any], name: str) -> str:
    """A request header by case-insensitive name ('' when absent)."""
    lowered = name.lower()
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == lowered and isinstance(value, str):
            return value
    return ""


def content_type(headers: Mapping[str, Any]) -> str:
    """The media type of the body, lower case, without its parameters ('' when absent)."""
    return header(headers, "Content-Type").split(";")[0].strip().lower()


def content_length(headers: Mapping[str, Any]) -> int | None:
    """The Content-Length header as a number of bytes, or None when absent or not a plain decimal number."""
    value = header(headers, "Content-Length").strip()
    if not (value.isascii() and value.isdigit()):  # "²".isdigit() is true, and int("²") fails
        return None
    try:
        return int(value)
    except ValueError:  # more digits than Python converts (4300): no body is that long
        return None


def require_declared_size(headers: Mapping[str, Any], max_body_bytes: int) -> int | None:
    """The declared Content-Length; 413 when it is over the limit."""
    length = content_length(headers)
    if length is not None and length > max_body_bytes:
        raise too_large(length, max_body_bytes)
    return length


def too_large(size: int, limit: int) -> RequestError:
    return RequestError("body", f"body is {size} bytes; the limit is {limit} bytes", status=413)


def body_of(entry: Mapping[str, Any]) -> tuple[bool, Any]:
    """(whether TorchServe passed a body, the body): it is under "body", or "data" for some clients."""
    if "body" in entry or "data" in entry:
        return True, entry["body"] if "body" in entry else entry["data"]
    return False, None


def decode(body: bytes | bytearray, max_body_bytes: int) -> str:
    """The body's bytes as text; 413 over the limit, 400 when they are not UTF-8."""
    if len(body) > max_body_bytes:
        raise too_large(len(body), max_body_bytes)
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError("body", f"body is not valid UTF-8 ({err.reason} at byte {err.start})") from None


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


def require_text(name: str, value: Any) -> None:
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


def require_fields_text(obj: dict[str, Any]) -> None:
    """RequestError naming the first field whose name or value holds a string that is not valid Unicode."""
    for key, value in obj.items():
        require_text(key, key)
        require_text(key, value)
