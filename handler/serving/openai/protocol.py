"""The OpenAI-compatible API's protocol: its routes' names, its request fields, its error shape, its reading.

What each field becomes is documented in docs/openai-api.md (tests/serving/test_openai_api.py checks that
its table lists exactly `FIELDS`, with the shipped limits). Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with the native API's statuses; an error the native rules
raise names the field as this API knows it (`OPENAI_NAMES`: `max_tokens`, not `max_new_tokens`), rendered
from the error's data (`RequestError.spelled`), never by rewriting its text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from handler.engine import params
from handler.engine.params import InvalidParameter, type_name
from handler.engine.stopping import FinishReason
from handler.serving.body import (JSON_HINT, body_of, decode, parse_json, require_declared_size,
                                  require_fields_text)
from handler.serving.errors import RequestError, field_label
from handler.serving.fields import require_prompt_text, unknown_field
from handler.serving.routes import ReadyAnswer

PREFIX = "v1"
JSON_CONTENT_TYPE = "application/json"
SSE_CONTENT_TYPE = "text/event-stream"
DONE_EVENT = "data: [DONE]\n\n"
OWNED_BY = "torchserve"
MODELS, COMPLETIONS, CHAT = "models", "completions", "chat/completions"
PATHS = (MODELS, f"{MODELS}/<id>", COMPLETIONS)

# OpenAI's finish reasons: eos and a stop string are "stop"; max_tokens and the time budget are "length"
FINISH_REASONS = {FinishReason.EOS: "stop", FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                  FinishReason.TIMEOUT: "length", FinishReason.CANCELLED: "stop"}
ERROR_CODES = {400: "invalid_value", 404: "not_found", 413: "request_too_large", 500: "internal_error",
               507: "insufficient_memory"}


# ---- the request fields (what each becomes: docs/openai-api.md) ----

FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options",
          "echo", "user", "logprobs", "best_of", "logit_bias", "suffix", "frequency_penalty", "presence_penalty",
          "decoding", "penalty_alpha", "top_k", "do_sample", "eos_token_id", "ignore_eos", "repetition_penalty",
          "min_tokens", "logprobs_source")
UNSUPPORTED = ("best_of", "suffix")
PASSED_ON = ("logit_bias", "frequency_penalty", "presence_penalty")  # OpenAI's, under the same native names
# this package's and vLLM's extra fields, passed through as they are (`extra_body` in the official client)
NATIVE_EXTRAS = ("decoding", "penalty_alpha", "top_k", "do_sample", "eos_token_id", "ignore_eos", "repetition_penalty",
                 "min_tokens", "logprobs_source")
OPENAI_NAMES = {"max_new_tokens": "max_tokens"}  # native name -> this API's, where they differ


# ---- errors in OpenAI's shape ----


class OpenAIError(RequestError):
    """A RequestError with OpenAI's `code` (a short string; the status's default when not given)."""

    def __init__(self, field: str | None, message: str, status: int = 400, code: str | None = None):
        super().__init__(field or "", message, status)
        self.code = code


def model_not_found(wanted: str, served: str) -> OpenAIError:
    return OpenAIError("model", f"the model {wanted!r} does not exist here; this server serves {served!r}", 404,
                       "model_not_found")


def error_object(err: RequestError) -> dict:
    """`{"error": {...}}` for a RequestError (a native one, or an OpenAIError), naming fields as this API does."""
    code = getattr(err, "code", None) or ERROR_CODES.get(err.status, "error")
    name = err.name if isinstance(err, OpenAIError) else OPENAI_NAMES.get(err.name, err.name)  # native rules'
    param = field_label(name) or None
    if param in ("body", "url_path"):
        param = None
    return {"error": {"message": err.spelled(name, OPENAI_NAMES), "type": "invalid_request_error" if err.status < 500
                      else "server_error", "param": param, "code": code}}


def error_json(err: RequestError) -> str:
    return json.dumps(error_object(err), ensure_ascii=False)


def ready_error(err: RequestError) -> ReadyAnswer:
    return ReadyAnswer(error_json(err), JSON_CONTENT_TYPE, err.status)


# ---- the request ----


@dataclass(frozen=True)
class CompletionRequest:
    """An OpenAI completions request, read; its fields about generation still in OpenAI's names."""

    prompts: tuple[str, ...]
    n: int
    given: dict[str, Any]  # the fields given (not null), in OpenAI's names: `call.to_params` maps them
    seed: int | None  # the request's seed (used when it samples)
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # OpenAI's `logprobs`: alternatives per token (its range: the native field's)


def read_body(entry: Any, headers: Mapping[str, Any], max_body_bytes: int) -> dict:
    """One TorchServe entry -> the JSON object of a completions request (handler.serving.body's rules);
    RequestError when there is none."""
    require_declared_size(headers, max_body_bytes)
    entry = entry if isinstance(entry, Mapping) else {}
    has_body, body = body_of(entry)
    if not has_body:
        if entry:  # form fields: TorchServe form-decoded the body
            raise OpenAIError(None, f"the body arrived as form fields; {JSON_HINT}")
        body = b""
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass")
    if isinstance(body, (bytes, bytearray)):
        if not body.strip():
            raise OpenAIError(None, 'completions takes a JSON body: POST {"model": ..., "prompt": ...} with '
                              "the header 'Content-Type: application/json'")
        body = parse_json(decode(body, max_body_bytes))
    if not isinstance(body, dict):
        raise OpenAIError(None, 'body must be a JSON object such as {"model": "...", "prompt": "..."}')
    require_fields_text(body)
    return body


def _typed(read: Callable[[str, Any], Any], name: str, value: Any) -> Any:
    """`value` read by the one type reader (the same type rules and messages), errors in OpenAI's kind."""
    try:
        return read(name, value)
    except InvalidParameter as err:
        raise OpenAIError(name, err.message) from None


def as_boolean(name: str, value: Any) -> bool:
    return _typed(params.as_boolean, name, value)


def as_integer(name: str, value: Any) -> int:
    return _typed(params.as_integer, name, value)


def as_number(name: str, value: Any) -> float:
    return _typed(params.as_number, name, value)


def _asks_for_nothing(name: str, value: Any) -> bool:
    """Whether an unsupported field's value changes nothing (what clients such as LangChain send by default)."""
    if name == "best_of":
        return isinstance(value, int) and not isinstance(value, bool) and value == 1
    return name == "suffix" and value == ""


def _unsupported(name: str, value: Any) -> None:
    """Fields that change the answer in ways this server cannot: refused unless they ask for nothing."""
    if _asks_for_nothing(name, value):
        return
    why = {"best_of": "this server does not rank several generations (use n for several choices)",
           "suffix": "GPT-2 cannot insert text before a suffix"}[name]
    raise OpenAIError(name, f"{name} is not supported: {why}; leave it out", code="unsupported_parameter")


def read_completion(body: Mapping[str, Any], model_id: str, max_choices: int) -> CompletionRequest:
    """An OpenAI completions body -> CompletionRequest; OpenAIError naming the field at fault."""
    for name in body:
        if name not in FIELDS:
            hint = {v: k for k, v in OPENAI_NAMES.items()}.get(name)
            raise OpenAIError(str(name), unknown_field(name, FIELDS, hint), code="unknown_parameter")
    given = {k: v for k, v in body.items() if v is not None}  # null is "not given", as OpenAI reads it
    for name in UNSUPPORTED:
        if name in given:
            _unsupported(name, given[name])
    if "model" in given:
        if not isinstance(given["model"], str):
            raise OpenAIError("model", f"model must be a string, got {type_name(given['model'])}")
        if given["model"] != model_id:
            raise model_not_found(given["model"], model_id)
    if "user" in given and not isinstance(given["user"], str):
        raise OpenAIError("user", f"user must be a string, got {type_name(given['user'])}")
    prompts = _prompts(given.get("prompt"))
    n = as_integer("n", given.get("n", 1))
    if not 1 <= n <= max_choices:
        raise OpenAIError("n", f"n must be between 1 and {max_choices}, got {n}")
    if len(prompts) * n > max_choices:
        raise OpenAIError("n" if n > 1 else "prompt", f"{len(prompts)} prompts x n={n} asks for "
                          f"{len(prompts) * n} choices; the limit is {max_choices}")
    stream = as_boolean("stream", given.get("stream", False))
    include_usage = False
    if "stream_options" in given:
        options = given["stream_options"]
        if not stream:
            raise OpenAIError("stream_options", "stream_options is only allowed with stream: true")
        if not isinstance(options, dict):
            raise OpenAIError("stream_options", f"stream_options must be an object, got {type_name(options)}")
        for key in options:
            if key != "include_usage":
                raise OpenAIError("stream_options", f"unknown stream_options field {key!r}; known: 'include_usage'")
        include_usage = as_boolean("stream_options.include_usage", options.get("include_usage", False)) \
            if options.get("include_usage") is not None else False
    echo = as_boolean("echo", given.get("echo", False))
    seed = as_integer("seed", given["seed"]) if "seed" in given else None
    logprobs = as_integer("logprobs", given["logprobs"]) if "logprobs" in given else None
    return CompletionRequest(prompts, n, given, seed, stream, include_usage, echo, logprobs)


def _prompts(value: Any) -> tuple[str, ...]:
    if value is None:
        raise OpenAIError("prompt", "prompt is required", code="missing_required_parameter")
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts:
        raise OpenAIError("prompt", f"prompt must be a string or a non-empty list of strings, got {type_name(value)}")
    for i, prompt in enumerate(prompts):
        where = "prompt" if isinstance(value, str) else f"prompt[{i}]"
        if not isinstance(prompt, str):
            token_ids = isinstance(prompt, int) or (isinstance(prompt, list) and prompt
                                                    and all(isinstance(t, int) for t in prompt))
            raise OpenAIError("prompt", f"{where} must be a string, got {type_name(prompt)}"
                              + ("; prompts as token ids are not supported: send text" if token_ids else ""))
        require_prompt_text(where, prompt)
    return tuple(prompts)


