"""The native API (`/predictions/<model>`): a prompt and its fields in, one generation's answer out.

A body is a JSON object ``{"prompt": "...", ...fields}`` (the fields:
`handler.serving.fields`); a plain-text body is a prompt with default
parameters; form fields ``prompt=...&max_new_tokens=...`` are accepted too
(values other than the prompt are read as JSON when they parse). A JSON body
that TorchServe form-decoded (``curl --data`` without a JSON content type) loses
everything up to the first ``=`` or is dropped entirely, so it is refused with
a message that says to send ``Content-Type: application/json``. What every
body obeys (size, UTF-8, JSON limits) is `handler.serving.body`'s.

`NativeApi.start` reads, maps and submits one request and returns its
`NativeCall` (`handler.serving.call.Call`), or the `RequestError` its client gets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from handler.engine.core import Engine
from handler.engine.scheduler import Generation
from handler.engine.stopping import FinishReason
from handler.serving import responses
from handler.serving.body import (JSON_HINT, body_of, content_type, decode, parse_json, require_declared_size,
                                  require_fields_text, require_text)
from handler.serving.preparation import EngineRequests
from handler.serving.errors import RequestError, fault_while_reading
from handler.serving.fields import params_from_request, require_prompt_text
from handler.serving.logprobs import TokenStrings, Trail
from handler.serving.settings import HandlerSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawRequest:
    prompt: str
    fields: dict[str, Any]  # everything but the prompt, not yet validated


def read_request(entry: Mapping[str, Any], headers: Mapping[str, Any], max_body_bytes: int) -> RawRequest:
    """One batch entry (and its request headers) -> prompt and fields; RequestError when unreadable."""
    media_type = content_type(headers)
    length = require_declared_size(headers, max_body_bytes)
    has_body, body = body_of(entry)
    if has_body:
        return _from_body(body, media_type, max_body_bytes)
    return _from_form(entry, media_type, length)


def _from_body(body: Any, media_type: str, max_body_bytes: int) -> RawRequest:
    if isinstance(body, (bytes, bytearray)):
        text = decode(body, max_body_bytes)
        if media_type == "application/json" or text.lstrip().startswith("{"):
            body = parse_json(text)
        else:
            return _from_text(text)
    if isinstance(body, str) and media_type != "application/json":
        return _from_text(body)
    if not isinstance(body, dict):
        raise RequestError("body", 'body must be a JSON object such as {"prompt": "..."}')
    return _from_object(body)


def _from_text(text: str) -> RawRequest:
    require_text("prompt", text)
    if not text.strip():
        raise RequestError("prompt", 'the body is empty: send {"prompt": "..."} or the prompt as text/plain')
    return RawRequest(text, {})


def _from_object(obj: dict[str, Any]) -> RawRequest:
    require_fields_text(obj)
    if "prompt" not in obj:
        raise RequestError("prompt", "prompt is required")
    prompt = obj["prompt"]
    if not isinstance(prompt, str):
        raise RequestError("prompt", f"prompt must be a string, got {type(prompt).__name__}")
    require_prompt_text("prompt", prompt)
    fields = {k: v for k, v in obj.items() if k != "prompt"}
    return RawRequest(prompt, fields)


def _from_form(entry: Mapping[str, Any], media_type: str, length: int | None) -> RawRequest:
    if not entry:
        if length:
            raise RequestError(
                "body",
                f"the body was sent as {media_type or 'form data'} (curl --data's default) and TorchServe's form "
                f"decoder dropped it; {JSON_HINT}",
            )
        raise RequestError("prompt", 'the body is empty: send {"prompt": "..."}')
    if any(isinstance(key, str) and key.lstrip().startswith("{") for key in entry):
        raise RequestError(
            "body", f"the JSON body was sent as {media_type or 'form data'} and arrived mangled; {JSON_HINT}"
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


@dataclass
class Prepared:
    """A native request ready for the engine, with what its answer needs."""

    prompt: str
    request: Any  # handler.engine.scheduler.Request


@dataclass
class NativeCall:
    """One native request in progress: its generation, and how its chunks, answer and errors look."""

    prompt: str
    generation: Generation
    stream: bool
    strings: TokenStrings | None = None  # token strings, when the request asked for logprobs
    trail: Trail | None = None  # a stream's generated tokens with logprobs, as they go out

    def __post_init__(self):
        if self.stream and self.generation.request.params.logprobs is not None:
            self.trail = Trail(self.strings)

    @property
    def generations(self) -> list[Generation]:
        return [self.generation]

    @property
    def done(self) -> bool:
        return self.generation.done

    @property
    def content_type(self) -> str:
        return responses.STREAM_CONTENT_TYPE if self.stream else responses.JSON_CONTENT_TYPE

    def chunk(self) -> str:
        return responses.chunk(self.generation, self.strings, self.trail) if self.stream else ""

    def final(self) -> str:
        return responses.final(self.prompt, self.generation, self.stream, self.strings, self.trail)

    def failure(self) -> Generation | None:
        return self.generation if self.generation.finish_reason is FinishReason.ERROR else None

    def error(self, error: RequestError, opened: bool) -> str:
        return error.to_json() + ("\n" if self.stream and opened else "")


class NativeApi:
    """The native generation route for one worker: its settings, engine requests and engine."""

    def __init__(self, settings: HandlerSettings, engine_requests: EngineRequests, engine: Engine):
        self.settings = settings
        self.engine_requests = engine_requests
        self.engine = engine

    def prepare(self, request_id: str, entry: Any, headers: Mapping[str, Any] | None) -> Prepared | RequestError:
        """One entry of TorchServe's batch (and its headers) -> a Prepared, or the RequestError to answer.
        Nothing raised here reaches TorchServe (which would fail the whole batch)."""
        headers = headers if isinstance(headers, Mapping) else {}
        try:
            settings = self.settings
            raw = read_request(entry if isinstance(entry, Mapping) else {}, headers, settings.limits.max_body_bytes)
            params = params_from_request(raw.fields, defaults=settings.defaults, limits=settings.limits,
                                         vocab_size=self.engine_requests.vocab_size)
            return Prepared(raw.prompt, self.engine_requests.make(request_id, raw.prompt, params, headers))
        except RequestError as err:
            return err
        except Exception as err:  # noqa: BLE001 - an internal fault fails this request alone, never the batch
            logger.exception("preparing request %s failed", request_id)
            return fault_while_reading(err)

    def start(self, request_id: str, entry: Any, headers: Mapping[str, Any]) -> NativeCall | RequestError:
        """Read, map, admit and submit one request: its call, or the error to answer at once."""
        prepared = self.prepare(request_id, entry, headers)
        if isinstance(prepared, RequestError):
            return prepared
        params = prepared.request.params
        strings = self.engine_requests.strings if params.logprobs is not None or params.prompt_logprobs is not None \
            else None
        return NativeCall(prepared.prompt, self.engine.submit(prepared.request), params.stream, strings)
