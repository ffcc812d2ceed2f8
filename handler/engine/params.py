"""Generation parameters of one request: every field, its range and its default, checked in one place.

Modelled on vLLM's `SamplingParams`: `GenerationParams.from_request` is the only
place a request's fields are read and validated, and every failure is a
`RequestError` naming the field, e.g. ``top_k must be >= 2, got 1``.

Decoding modes (field `decoding`):

- ``contrastive`` (default): contrastive search (Su et al. 2022, "A Contrastive
  Framework for Neural Text Generation") over the `top_k` most likely tokens,
  with degeneration penalty `penalty_alpha`. With ``do_sample: true`` it is
  contrastive *sampling*: one of the k candidates is drawn with probability
  softmax(score / temperature) instead of taking the best score.
- ``greedy``: the most likely token at every step.
- ``sample``: ancestral sampling from softmax(logits / temperature), restricted
  to the `top_k` most likely tokens (0: no restriction) and the smallest set of
  tokens whose probability reaches `top_p`.

A field that only matters in another mode (for example `temperature` with
greedy decoding) is refused rather than silently ignored.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from handler.serving.errors import RequestError

DECODING_MODES = ("contrastive", "greedy", "sample")
SEED_LIMIT = 2**32  # seeds feed a 32-bit counter-based generator (handler.engine.sampling)
MAX_TEMPERATURE = 100.0


@dataclass(frozen=True)
class RequestLimits:
    """Bounds an operator sets in model-config.yaml (`handler.limits`); requests beyond them get 400."""

    max_prompt_tokens: int = 512  # longest prompt, in tokens
    max_new_tokens: int = 256  # largest `max_new_tokens` a request may ask for
    max_top_k: int = 16  # most contrastive candidates per step (the KV cache holds k extra slots)
    max_stop_strings: int = 4  # most entries in `stop`
    max_stop_length: int = 64  # longest stop string, in characters
    max_body_bytes: int = 65536  # largest request body the handler accepts

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | None) -> "RequestLimits":
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown handler.limits keys {unknown}; known: {sorted(known)}")
        for name, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"handler.limits.{name} must be a positive integer, got {value!r}")
        return cls(**raw)


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks of the generator. Ranges are checked by `from_request`."""

    # Tokens to generate at most: 1 <= n <= limits.max_new_tokens, and prompt + n <= n_positions.
    max_new_tokens: int = 64
    # "contrastive" | "greedy" | "sample".
    decoding: str = "contrastive"
    # Degeneration penalty of contrastive decoding: 0 <= alpha <= 1 (0 is greedy).
    penalty_alpha: float = 0.6
    # contrastive: candidates per step, 2 <= k <= limits.max_top_k.
    # sample: keep the k most likely tokens, 0 (off) or 1 <= k <= vocabulary size.
    top_k: int = 4
    # contrastive: sample among the k candidates (contrastive sampling). sample: always true.
    # greedy: must be false.
    do_sample: bool = False
    # Softmax temperature when sampling: 0 < T <= 100.
    temperature: float = 1.0
    # Nucleus sampling (decoding=sample only): 0 < p <= 1 (1 is off).
    top_p: float = 1.0
    # Stop strings: the text ends before the first one generated; at most limits.max_stop_strings,
    # each 1..limits.max_stop_length characters.
    stop: tuple[str, ...] = ()
    # Seed of the sampler, 0 <= seed < 2**32; the same seed gives the same text whatever shares
    # the batch. None: the worker draws one and reports it in the response.
    seed: int | None = None
    # Token ids that end generation; None: the model's own end-of-text token(s).
    eos_token_id: tuple[int, ...] | None = None
    # Stream the text as newline-delimited JSON chunks.
    stream: bool = False
    # Add the generated token ids to the response.
    return_token_ids: bool = False

    @property
    def samples(self) -> bool:
        """True when the output depends on a random draw."""
        return self.decoding == "sample" or (self.decoding == "contrastive" and self.do_sample)

    @property
    def num_candidates(self) -> int:
        """Candidates the engine scores per step for this request (1 outside contrastive decoding)."""
        return self.top_k if self.decoding == "contrastive" else 1

    @classmethod
    def from_request(
        cls,
        request: Mapping[str, Any],
        *,
        defaults: "GenerationParams",
        limits: RequestLimits,
        vocab_size: int,
    ) -> "GenerationParams":
        """Validate the request's fields (everything but `prompt`) over `defaults`.

        Raises `RequestError` naming the first field at fault.
        """
        known = {f.name for f in fields(cls)}
        for name in request:
            if name not in known:
                hint = difflib.get_close_matches(name, sorted(known | {"prompt"}), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                raise RequestError(name, f"unknown field {name!r}{suggestion}")

        given = dict(request)
        values: dict[str, Any] = {}
        values["decoding"] = _choice(given, "decoding", DECODING_MODES, defaults.decoding)
        mode = values["decoding"]
        values["max_new_tokens"] = _int(given, "max_new_tokens", defaults.max_new_tokens, 1, limits.max_new_tokens)
        values["stream"] = _bool(given, "stream", defaults.stream)
        values["return_token_ids"] = _bool(given, "return_token_ids", defaults.return_token_ids)
        values["stop"] = _stop(given, defaults.stop, limits)
        values["eos_token_id"] = _eos(given, defaults.eos_token_id, vocab_size)

        # Mode-specific fields: refuse the ones that would be ignored.
        _only_in(given, "penalty_alpha", mode, ("contrastive",))
        _only_in(given, "top_p", mode, ("sample",))
        _only_in(given, "top_k", mode, ("contrastive", "sample"))
        do_sample = _bool(given, "do_sample", None)
        if mode == "greedy" and do_sample:
            raise RequestError("do_sample", "do_sample must be false with decoding='greedy'; use decoding='sample'")
        if mode == "sample" and do_sample is False:
            raise RequestError("do_sample", "do_sample must be true with decoding='sample'; use decoding='greedy'")
        if mode == "contrastive":
            values["do_sample"] = defaults.do_sample if do_sample is None else do_sample
        else:
            values["do_sample"] = mode == "sample"

        if mode == "contrastive":
            values["penalty_alpha"] = _float(given, "penalty_alpha", defaults.penalty_alpha, 0.0, 1.0)
            values["top_k"] = _int(given, "top_k", defaults.top_k, 2, limits.max_top_k)
        elif mode == "sample":
            top_k = _int(given, "top_k", 0, 0, vocab_size)  # the contrastive default k does not apply
            values["top_k"] = top_k
            values["top_p"] = _float(given, "top_p", defaults.top_p, 0.0, 1.0, low_open=True)

        sampling = values["do_sample"]
        for name in ("temperature", "seed"):
            if name in given and not sampling:
                raise RequestError(name, f"{name} applies only when sampling (decoding='sample', or do_sample=true)")
        if sampling:
            values["temperature"] = _float(
                given, "temperature", defaults.temperature, 0.0, MAX_TEMPERATURE, low_open=True
            )
            values["seed"] = _int(given, "seed", None, 0, SEED_LIMIT - 1) if "seed" in given else None
        return replace(defaults, **values)

    @classmethod
    def defaults_from_config(cls, raw: Mapping[str, Any] | None, limits: RequestLimits) -> "GenerationParams":
        """The operator's defaults (`handler.defaults` in model-config.yaml), each checked for type and range.

        Unlike a request, defaults may set fields of every mode (a default `temperature` serves the
        requests that sample). `seed` and `eos_token_id` have no operator default.
        """
        raw = dict(raw or {})
        allowed = {"max_new_tokens", "decoding", "penalty_alpha", "top_k", "do_sample", "temperature", "top_p",
                   "stop", "stream", "return_token_ids"}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"unknown handler.defaults keys {unknown}; known: {sorted(allowed)}")
        base = cls()
        try:
            values = {
                "decoding": _choice(raw, "decoding", DECODING_MODES, base.decoding),
                "max_new_tokens": _int(raw, "max_new_tokens", base.max_new_tokens, 1, limits.max_new_tokens),
                "penalty_alpha": _float(raw, "penalty_alpha", base.penalty_alpha, 0.0, 1.0),
                "top_k": _int(raw, "top_k", base.top_k, 2, limits.max_top_k),
                "do_sample": _bool(raw, "do_sample", base.do_sample),
                "temperature": _float(raw, "temperature", base.temperature, 0.0, MAX_TEMPERATURE, low_open=True),
                "top_p": _float(raw, "top_p", base.top_p, 0.0, 1.0, low_open=True),
                "stop": _stop(raw, base.stop, limits),
                "stream": _bool(raw, "stream", base.stream),
                "return_token_ids": _bool(raw, "return_token_ids", base.return_token_ids),
            }
        except RequestError as err:
            raise ValueError(f"handler.defaults: {err.message}") from None
        if values["decoding"] == "greedy" and values["do_sample"]:
            raise ValueError("handler.defaults: do_sample must be false with decoding='greedy'")
        return replace(base, **values)


# ---- field readers: each returns the checked value or raises RequestError naming the field ----


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def _int(given: Mapping[str, Any], name: str, default: Any, low: int, high: int) -> Any:
    if name not in given:
        return default
    value = given[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"{name} must be an integer, got {_type_name(value)} ({_describe(value)})")
    if value < low:
        raise RequestError(name, f"{name} must be >= {low}, got {value}")
    if value > high:
        raise RequestError(name, f"{name} must be <= {high}, got {value}")
    return value


def _float(given, name, default, low, high, *, low_open=False):
    if name not in given:
        return default
    value = given[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(name, f"{name} must be a number, got {_type_name(value)} ({_describe(value)})")
    value = float(value)
    if not math.isfinite(value):
        raise RequestError(name, f"{name} must be a finite number, got {value}")
    if (value <= low) if low_open else (value < low):
        raise RequestError(name, f"{name} must be {'>' if low_open else '>='} {low:g}, got {value:g}")
    if value > high:
        raise RequestError(name, f"{name} must be <= {high:g}, got {value:g}")
    return value


def _bool(given, name, default):
    if name not in given:
        return default
    value = given[name]
    if not isinstance(value, bool):
        raise RequestError(name, f"{name} must be true or false, got {_type_name(value)} ({_describe(value)})")
    return value


def _choice(given, name, choices, default):
    if name not in given:
        return default
    value = given[name]
    if value not in choices or not isinstance(value, str):
        raise RequestError(name, f"{name} must be one of {', '.join(map(repr, choices))}, got {_describe(value)}")
    return value


def _only_in(given, name, mode, modes):
    if name in given and mode not in modes:
        allowed = " or ".join(repr(m) for m in modes)
        raise RequestError(name, f"{name} applies only to decoding={allowed}, not {mode!r}")


def _stop(given, default, limits: RequestLimits) -> tuple[str, ...]:
    if "stop" not in given:
        return default
    value = given["stop"]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RequestError("stop", f"stop must be a string or a list of strings, got {_type_name(value)}")
    if len(value) > limits.max_stop_strings:
        raise RequestError("stop", f"stop must have at most {limits.max_stop_strings} strings, got {len(value)}")
    for item in value:
        if not isinstance(item, str):
            raise RequestError("stop", f"stop must contain only strings, got {_type_name(item)} ({_describe(item)})")
        if not item:
            raise RequestError("stop", "stop strings must not be empty")
        if len(item) > limits.max_stop_length:
            raise RequestError(
                "stop", f"stop strings must be at most {limits.max_stop_length} characters, got {len(item)}"
            )
    return tuple(value)


def _eos(given, default, vocab_size: int) -> tuple[int, ...] | None:
    if "eos_token_id" not in given:
        return default
    value = given["eos_token_id"]
    items = value if isinstance(value, list) else [value]
    if not items or len(items) > 8:
        raise RequestError("eos_token_id", f"eos_token_id must be an integer or a list of 1 to 8 integers, got {_describe(value)}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise RequestError(
                "eos_token_id", f"eos_token_id must be an integer or a list of integers, got {_describe(value)}"
            )
        if not 0 <= item < vocab_size:
            raise RequestError("eos_token_id", f"eos_token_id must be in [0, {vocab_size}), got {item}")
    return tuple(items)


