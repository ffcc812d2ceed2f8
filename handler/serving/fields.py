"""The request fields, in one table: it drives request parsing, the operator's defaults and the request table of docs/api.md.

Each `Field` says what JSON type a field takes, in which decoding modes it
applies, how an operator's limit narrows its range, and whether an operator
may give it a default (`handler.defaults` in model-config.yaml). From the table:

- `params_from_request`: a request's fields -> `GenerationParams`, or a
  `RequestError` naming the first field at fault (400);
- `defaults_from_config`: `handler.defaults` -> the `GenerationParams` that
  requests start from (a wrong default stops the worker, naming the key);
- `markdown_rows`: the request table of docs/api.md (tests/serving/test_fields.py
  checks that the page shows exactly these rows).

The ranges that hold for every worker live with `GenerationParams`
(`handler.engine.params.RANGES`), which checks them wherever it is built;
here the limits of this worker narrow them.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from handler.engine.params import (DECODING_MODES, LOGPROBS_SOURCES, MAX_EOS_IDS, MAX_LOGIT_BIAS, PARAM, RANGES,
                                   GenerationParams, InvalidParameter, Range, as_boolean, as_decoding, as_integer,
                                   as_number, describe, fmt, require_mode_agrees, type_name)
from handler.serving.errors import RequestError
from handler.serving.limits import RequestLimits, refuse_unknown_keys


# ---- JSON readers: each returns the value in the engine's type or raises InvalidParameter naming the field ----


def _plain(read: Callable[[str, Any], Any]) -> Callable[[str, Any, RequestLimits], Any]:
    """A reader of `handler.engine.params` (one home for the type rules), in the table's signature."""
    return lambda name, value, limits: read(name, value)


read_integer, read_number, read_boolean, read_decoding = map(_plain, (as_integer, as_number, as_boolean,
                                                                      as_decoding))


def read_stop(name: str, value: Any, limits: RequestLimits) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidParameter(name, PARAM, f" must be a string or a list of strings, got {type_name(value)}")
    if len(value) > limits.max_stop_strings:
        raise InvalidParameter(name, PARAM, f" must have at most {limits.max_stop_strings} strings, got {len(value)}")
    for item in value:
        if not isinstance(item, str):
            raise InvalidParameter(name, PARAM, f" must contain only strings, got {type_name(item)} ({describe(item)})")
        if not item:
            raise InvalidParameter(name, PARAM, " strings must not be empty")
        if len(item) > limits.max_stop_length:
            raise InvalidParameter(name, PARAM, f" strings must be at most {limits.max_stop_length} characters, "
                                   f"got {len(item)}")
    return tuple(value)


def read_token_ids(name: str, value: Any, limits: RequestLimits) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or len(items) > MAX_EOS_IDS:
        raise InvalidParameter(name, PARAM, f" must be an integer or a list of 1 to {MAX_EOS_IDS} integers, "
                               f"got {describe(value)}")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise InvalidParameter(name, PARAM, f" must be an integer or a list of integers, got {describe(value)}")
    return tuple(items)


LOGIT_BIAS_BOUND = RANGES["logit_bias/bias"].high  # a bias is in [-100, 100] (OpenAI's)


def read_logit_bias(name: str, value: Any, limits: RequestLimits) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias, `{"50256": -100}` (token ids as JSON object keys, so strings) -> (id, bias) pairs."""
    if not isinstance(value, dict):
        raise InvalidParameter(name, PARAM, ' must be an object of token id -> bias, such as {"50256": -100}, '
                               f"got {type_name(value)}")
    if len(value) > MAX_LOGIT_BIAS:
        raise InvalidParameter(name, PARAM, f" may name at most {MAX_LOGIT_BIAS} token ids, got {len(value)}")
    pairs: dict[int, float] = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise InvalidParameter(name, PARAM, f" keys must be token ids written in decimal, such as \"50256\"; "
                                   f"got {describe(key)}")
        token = int(key)
        if token in pairs:
            raise InvalidParameter(name, PARAM, f" names token id {token} twice")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise InvalidParameter(name, PARAM, f" values must be numbers, got {type_name(bias)} for {key!r}")
        number = as_number(name, bias)
        if not -LOGIT_BIAS_BOUND <= number <= LOGIT_BIAS_BOUND:
            raise InvalidParameter(name, PARAM, f" values must be in [-{fmt(LOGIT_BIAS_BOUND)}, "
                                   f"{fmt(LOGIT_BIAS_BOUND)}], got {fmt(number)} for {key!r}")
        pairs[token] = number
    return tuple(pairs.items())


def read_source(name: str, value: Any, limits: RequestLimits) -> str:
    if not isinstance(value, str) or value not in LOGPROBS_SOURCES:
        raise InvalidParameter(name, PARAM, f" must be one of {', '.join(map(repr, LOGPROBS_SOURCES))}, "
                               f"got {describe(value)}")
    return value


# ---- the table ----

Bound = Callable[[RequestLimits, int], float]  # (limits, vocabulary size) -> the largest value allowed


@dataclass(frozen=True)
class Field:
    name: str
    type: str  # as docs/api.md shows it
    read: Callable[[str, Any, RequestLimits], Any]
    doc: str  # the rule, as docs/api.md shows it ({limits.<name>} is filled in)
    modes: tuple[str, ...] = DECODING_MODES  # the decodings it applies to
    sampling_only: bool = False  # applies only when the request samples
    bound: Bound | dict[str, Bound] | None = None  # an operator limit on the upper end (per mode when a dict)
    configurable: bool = True  # an operator may set its default in handler.defaults
    default_doc: str | None = None  # the default as docs/api.md shows it, where the value says it badly

    def range(self, mode: str, limits: RequestLimits, vocab_size: int) -> Range | None:
        """The allowed range in `mode` for this worker (None: not a number)."""
        base = RANGES.get(f"{self.name}/{mode}") or RANGES.get(self.name)
        bound = self.bound.get(mode) if isinstance(self.bound, dict) else self.bound
        if base is None or bound is None:
            return base
        return base.narrowed(bound(limits, vocab_size))


FIELDS = (
    Field("max_new_tokens", "integer", read_integer,
          "1 … `limits.max_new_tokens` ({limits.max_new_tokens}), or 0 with `prompt_logprobs` (score the prompt "
          "only); prompt + this ≤ the model's `n_positions` and a "
          "slot's positions; and no more than the worker can generate within the response timeout",
          bound=lambda limits, vocab: limits.max_new_tokens),
    Field("decoding", "string", read_decoding, "`contrastive`, `greedy` or `sample`"),
    Field("penalty_alpha", "number", read_number, "0 … 1; `contrastive` only (0 is greedy)", modes=("contrastive",)),
    Field("top_k", "integer", read_integer,
          "`contrastive`: candidates per step, 2 … `max_top_k` ({limits.max_top_k}). `sample`: 0 (off, the default "
          "there) or 1 … "
          "vocabulary size", modes=("contrastive", "sample"),
          bound={"contrastive": lambda limits, vocab: limits.max_top_k, "sample": lambda limits, vocab: vocab}),
    Field("do_sample", "boolean", read_boolean,
          "`contrastive`: contrastive *sampling*. `sample`: must be true. `greedy`: must be false"),
    Field("temperature", "number", read_number, "0 < T ≤ 100; only when sampling", sampling_only=True),
    Field("top_p", "number", read_number, "0 < p ≤ 1; `sample` only", modes=("sample",)),
    Field("stop", "string or list", read_stop,
          "at most {limits.max_stop_strings} strings, each 1 … {limits.max_stop_length} characters; the text ends "
          "before the first one generated"),
    Field("seed", "integer", read_integer,
          "0 … 2³²−1; only when sampling. The same seed gives the same text whatever shares the pool; without "
          "one the worker draws a seed and returns it", sampling_only=True, configurable=False),
    Field("eos_token_id", "integer or list", read_token_ids,
          "token ids in the vocabulary that end generation", configurable=False),
    Field("ignore_eos", "boolean", read_boolean,
          "generate `max_new_tokens` tokens whatever end-of-text token comes (as vLLM's; for load tests and "
          "benchmarks); stop strings still end the text", configurable=False),
    Field("stream", "boolean", read_boolean, "stream the text as JSON lines"),
    Field("return_token_ids", "boolean", read_boolean, "add `token_ids` to the answer"),
    Field("repetition_penalty", "number", read_number,
          "0 < r ≤ 10 (1: off); transformers' `RepetitionPenaltyLogitsProcessor`: the logit of every token of the "
          "prompt and of the text so far is divided by r when positive, multiplied by r when negative"),
    Field("presence_penalty", "number", read_number,
          "−2 … 2 (0: off); OpenAI's: a token generated at least once loses this much logit"),
    Field("frequency_penalty", "number", read_number,
          "−2 … 2 (0: off); OpenAI's: a token loses this much logit for each time it was generated"),
    Field("logit_bias", "object", read_logit_bias,
          "token id (a string, as OpenAI's: `{{\"50256\": -100}}`) → bias added to its logit, −100 … 100; at most "
          f"{MAX_LOGIT_BIAS} ids, each in the vocabulary", configurable=False, default_doc="none"),
    Field("min_tokens", "integer", read_integer,
          "0 … `max_new_tokens`: no end-of-text token (`eos_token_id`) before this many new tokens", configurable=False),
    Field("logprobs", "integer", read_integer,
          "0 … `limits.max_logprobs` ({limits.max_logprobs}): each generated token's logprob and its n most likely "
          "alternatives, in the answer's `logprobs`", bound=lambda limits, vocab: limits.max_logprobs,
          configurable=False, default_doc="none"),
    Field("prompt_logprobs", "integer", read_integer,
          "0 … `limits.max_logprobs` ({limits.max_logprobs}): each prompt token's logprob (the first's is null) and "
          "its n most likely alternatives, in the answer's `prompt_logprobs`",
          bound=lambda limits, vocab: limits.max_logprobs, configurable=False, default_doc="none"),
    Field("logprobs_source", "string", read_source,
          "the distribution logprobs come from: `raw`, the model's own log-softmax (vLLM's default); `processed`, "
          "after the penalties, `logit_bias`, `min_tokens` and (when sampling) temperature: what the token was "
          "chosen from. The prompt's logprobs are always raw"),
)
BY_NAME = {f.name: f for f in FIELDS}
PROMPT = "prompt"


def require_prompt_text(where: str, prompt: str) -> None:
    """The prompt rule of every API: some text that is not whitespace (`where`: how the error names it)."""
    if not prompt.strip():
        raise RequestError("prompt", f"{where} must not be empty or only whitespace")


def unknown_field(name: str, known, hint: str | None = None) -> str:
    """The message for a field no API knows: with the closest known name as a hint (or `hint`, when given)."""
    hint = hint or next(iter(difflib.get_close_matches(name, sorted(known), n=1)), "")
    return f"unknown field {name!r}" + (f"; did you mean {hint!r}?" if hint else "")


def _applies(field: Field, mode: str, name: str) -> None:
    if mode not in field.modes:
        allowed = " or ".join(repr(m) for m in field.modes)
        raise InvalidParameter(name, PARAM, f" applies only to decoding={allowed}, not {mode!r}")


def _resolve(given: Mapping[str, Any], defaults: GenerationParams, limits: RequestLimits, vocab_size: int,
             *, operator: bool) -> GenerationParams:
    """Read `given` over `defaults` through the table; raise InvalidParameter for the first field at fault."""
    values = {name: BY_NAME[name].read(name, value, limits) for name, value in given.items()}
    mode = values.get("decoding", defaults.decoding)
    if not operator:  # a request may not set what its mode would ignore; operator defaults serve every mode
        for name in values:
            _applies(BY_NAME[name], mode, name)
    do_sample = values.get("do_sample")
    require_mode_agrees(mode, do_sample)
    if mode != "contrastive":
        values["do_sample"] = mode == "sample"
    elif do_sample is None:
        values["do_sample"] = defaults.do_sample
    if mode == "sample" and "top_k" not in values and not operator:
        values["top_k"] = 0  # the contrastive default k does not apply to sampling
    samples = mode == "sample" or values["do_sample"]
    if not operator:
        for name in values:
            if BY_NAME[name].sampling_only and not samples:
                raise InvalidParameter(name, PARAM, " applies only when sampling (decoding='sample', or do_sample=true)")
    for name, value in values.items():  # this worker's limits narrow the upper ends (the engine checks the rest)
        rng = BY_NAME[name].range(mode, limits, vocab_size)
        if rng is not None and BY_NAME[name].bound is not None:
            Range(-math.inf, rng.high).require(name, value)
    return replace(defaults, **values)


def params_from_request(request: Mapping[str, Any], *, defaults: GenerationParams, limits: RequestLimits,
                        vocab_size: int) -> GenerationParams:
    """A request's fields (everything but `prompt`) over the operator's defaults; RequestError (400) naming
    the first field at fault."""
    for name in request:
        if name not in BY_NAME:
            raise RequestError(name, unknown_field(name, set(BY_NAME) | {PROMPT}))
    try:
        params = _resolve(request, defaults, limits, vocab_size, operator=False)
        if params.eos_token_id is not None:
            for token in params.eos_token_id:
                if not 0 <= token < vocab_size:
                    raise InvalidParameter("eos_token_id", PARAM, f" must be in [0, {vocab_size}), got {token}")
        for token, _ in params.logit_bias:
            if token >= vocab_size:
                raise InvalidParameter("logit_bias", PARAM, f" names token id {token}, outside the vocabulary "
                                       f"(ids 0 … {vocab_size - 1})")
        return params
    except InvalidParameter as err:
        raise RequestError.invalid(err) from None


def defaults_from_config(raw: Mapping[str, Any] | None, limits: RequestLimits) -> GenerationParams:
    """The operator's defaults (`handler.defaults`), each checked; ValueError naming the key."""
    raw = dict(raw or {})
    refuse_unknown_keys("handler.defaults", raw, {f.name for f in FIELDS if f.configurable})
    try:
        return _resolve(raw, GenerationParams(), limits, vocab_size=2**31, operator=True)
    except InvalidParameter as err:
        raise ValueError(f"handler.defaults: {err.message}") from None


def markdown_rows(defaults: GenerationParams, limits: RequestLimits) -> list[str]:
    """The request table rows of docs/api.md (`prompt` first), for `defaults` and `limits`."""
    rows = [f"| `{PROMPT}` | string | required | not empty or whitespace; at most `max_prompt_tokens` "
            f"({limits.max_prompt_tokens}) tokens |"]
    for f in FIELDS:
        doc = f.doc.format(limits=limits)
        default = f.default_doc or _shown(f.name, getattr(defaults, f.name))
        rows.append(f"| `{f.name}` | {f.type} | {default} | {doc} |")
    return rows


def _shown(name: str, default: Any) -> str:
    """A default as the request table of docs/api.md shows it."""
    if default is None:
        return "drawn" if name == "seed" else "the model's"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, str):
        return f"`{default}`"
    if isinstance(default, tuple):
        return "`[" + ", ".join(repr(x) for x in default) + "]`"
    return str(default)
