"""What one request asks of the engine: `GenerationParams`, which checks its own invariants wherever it is built.

Modelled on vLLM's `SamplingParams`: building one with a value out of range
raises `InvalidParameter` naming the field, e.g. ``top_k must be >= 2, got 1``,
whether it comes from a request, an operator's defaults, the warm-up or a
benchmark. Operator limits (the largest `max_new_tokens` or `top_k` a worker
allows) are the serving layer's (`handler.serving.fields`); here are only the
ranges that hold for every worker.

Decoding modes (field `decoding`):

- ``contrastive``: contrastive search (Su et al. 2022, "A Contrastive Framework
  for Neural Text Generation") over the `top_k` most likely tokens, with
  degeneration penalty `penalty_alpha`. With ``do_sample`` it is contrastive
  *sampling*: one of the k candidates is drawn with probability
  softmax(score / temperature) instead of taking the best score.
- ``greedy``: the most likely token at every step.
- ``sample``: ancestral sampling from softmax(logits / temperature), restricted
  to the `top_k` most likely tokens (0: no restriction) and the smallest set of
  tokens whose probability reaches `top_p`.

Logits processing (every mode, applied to the logits before the mode chooses:
before contrastive search takes its top k, as transformers 4.55 applies its
logits processors, and before greedy or sampling), in this order:
`logit_bias` added; `repetition_penalty` (transformers'
`RepetitionPenaltyLogitsProcessor`, over prompt and generated tokens);
`frequency_penalty` and `presence_penalty` (OpenAI's definition, over the
generated tokens); no end-of-text id before `min_tokens` generated tokens.
Logprobs (`logprobs`, `prompt_logprobs`) come from the model's own
log-softmax (``raw``) or from the processed logits (``processed``: after the
above and, for decoding="sample", the temperature); prompt logprobs are always
raw (nothing processes the prompt's logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

DECODING_MODES = ("contrastive", "greedy", "sample")
SEED_LIMIT = 2**32  # seeds feed a 32-bit counter-based generator (handler.engine.sampling)
MAX_TEMPERATURE = 100.0
MAX_EOS_IDS = 8  # end-of-text ids one request may name (handler.engine.pool.EOS_WIDTH)
MAX_LOGPROBS = 20  # alternatives per token a request may ask for (the serving layer narrows it)
MAX_LOGIT_BIAS = 300  # (token id, bias) pairs one request may give (handler.engine.pool.BIAS_WIDTH)
LOGPROBS_SOURCES = ("raw", "processed")


PARAM = type("Param", (), {"__repr__": lambda self: "PARAM"})()  # in a message's parts: the parameter's own name


@dataclass(frozen=True)
class OtherParam:
    """In a message's parts: another parameter, which each API names its own way (`max_new_tokens` is OpenAI's
    `max_tokens`)."""

    name: str

    def __str__(self) -> str:
        return self.name


def spell(parts: tuple, name: str, names: Mapping[str, str] | None = None) -> str:
    """A message's parts as text, with `name` for the parameter (`max_new_tokens`, or OpenAI's `max_tokens`) and
    `names` renaming the other parameters it mentions."""
    names = names or {}
    return "".join(name if part is PARAM else names.get(part.name, part.name) if isinstance(part, OtherParam)
                   else str(part) for part in parts)


class InvalidParameter(ValueError):
    """A parameter out of its range: `field` names it, as data; the message names it through `PARAM`, so that
    each API renders the name it knows the parameter by (`spelled`) without rewriting text."""

    def __init__(self, field: str, *parts: Any):
        self.field = field
        self.parts = parts
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return spell(self.parts, self.field)


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of allowed values."""

    low: float
    high: float
    low_open: bool = False

    def require(self, name: str, value) -> None:
        """Raise InvalidParameter naming `name` when `value` is outside this range."""
        if (value <= self.low) if self.low_open else (value < self.low):
            raise InvalidParameter(name, PARAM, f" must be {'>' if self.low_open else '>='} {fmt(self.low)}, "
                                   f"got {fmt(value)}")
        if value > self.high:
            raise InvalidParameter(name, PARAM, f" must be <= {fmt(self.high)}, got {fmt(value)}")

    def narrowed(self, high: float) -> "Range":
        """The same range with a lower upper end (an operator's limit)."""
        return Range(self.low, min(self.high, high), self.low_open)


def describe(value: Any) -> str:
    """A value as a message shows it: its repr, cut at 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def type_name(value: Any) -> str:
    """A value's type as JSON calls it: "an integer", "a string", "null"."""
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def as_integer(name: str, value: Any) -> int:
    """`value` if it is an integer (not a boolean); else InvalidParameter naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParameter(name, PARAM, f" must be an integer, got {type_name(value)} ({describe(value)})")
    return value


def as_number(name: str, value: Any) -> float:
    """`value` as a finite float (JSON's integers of any length included); else InvalidParameter naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, PARAM, f" must be a number, got {type_name(value)} ({describe(value)})")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the largest float (JSON allows any number of digits)
        raise InvalidParameter(name, PARAM, f" must be a finite number, got {describe(value)}") from None
    if not math.isfinite(number):
        raise InvalidParameter(name, PARAM, f" must be a finite number, got {number}")
    return number


def as_boolean(name: str, value: Any) -> bool:
    """`value` if it is true or false; else InvalidParameter naming `name`."""
    if not isinstance(value, bool):
        raise InvalidParameter(name, PARAM, f" must be true or false, got {type_name(value)} ({describe(value)})")
    return value


def as_decoding(name: str, value: Any) -> str:
    """`value` if it names a decoding mode; else InvalidParameter naming `name`."""
    if not isinstance(value, str) or value not in DECODING_MODES:
        raise InvalidParameter(name, PARAM, f" must be one of {', '.join(map(repr, DECODING_MODES))}, "
                               f"got {describe(value)}")
    return value


def fmt(x: float) -> str:
    """A number as a message shows it: 4294967295, 0.6, 1e-05; an integer exactly, however large (a float of it
    may overflow), shortened past 24 digits."""
    if isinstance(x, int):
        text = str(x)
        return text if len(text) <= 24 else f"{text[:12]}...({len(text.lstrip('-'))} digits)"
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


# The ranges that hold for every worker (the serving layer may narrow the upper ends).
RANGES = {
    "max_new_tokens": Range(1, math.inf),
    "penalty_alpha": Range(0.0, 1.0),
    "top_k/contrastive": Range(2, math.inf),
    "top_k/sample": Range(0, math.inf),
    "temperature": Range(0.0, MAX_TEMPERATURE, low_open=True),
    "top_p": Range(0.0, 1.0, low_open=True),
    "seed": Range(0, SEED_LIMIT - 1),
    "repetition_penalty": Range(0.0, 10.0, low_open=True),
    "presence_penalty": Range(-2.0, 2.0),
    "frequency_penalty": Range(-2.0, 2.0),
    "logit_bias/bias": Range(-100.0, 100.0),
    "min_tokens": Range(0, math.inf),
    "logprobs": Range(0, MAX_LOGPROBS),
    "prompt_logprobs": Range(0, MAX_LOGPROBS),
}


@dataclass(frozen=True)
class GenerationParams:
    """What one request asks of the generator; see the module docstring for the modes."""

    max_new_tokens: int = 64  # tokens to generate at most
    decoding: str = "contrastive"  # "contrastive" | "greedy" | "sample"
    penalty_alpha: float = 0.6  # contrastive: the degeneration penalty (0 is greedy)
    top_k: int = 4  # contrastive: candidates per step (>= 2); sample: keep the k most likely (0: off)
    do_sample: bool = False  # contrastive: contrastive sampling; sample: true; greedy: false
    temperature: float = 1.0  # softmax temperature when sampling
    top_p: float = 1.0  # nucleus sampling (decoding=sample; 1 is off)
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one generated
    seed: int | None = None  # the sampler's seed; None: the worker draws one and reports it
    eos_token_id: tuple[int, ...] | None = None  # end-of-text ids; None: the model's own
    ignore_eos: bool = False  # generate max_new_tokens whatever end-of-text comes (load tests, benchmarks)
    stream: bool = False  # stream the text as newline-delimited JSON chunks
    return_token_ids: bool = False  # add the generated token ids to the answer
    repetition_penalty: float = 1.0  # transformers': logit > 0 divided, else multiplied, over prompt + generated
    presence_penalty: float = 0.0  # OpenAI's: logit -= presence * (count > 0), counts of generated tokens
    frequency_penalty: float = 0.0  # OpenAI's: logit -= frequency * count, counts of generated tokens
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs added to the logits
    min_tokens: int = 0  # no end-of-text id can be chosen before this many generated tokens
    logprobs: int | None = None  # each generated token's logprob and its n most likely alternatives (None: off)
    prompt_logprobs: int | None = None  # each prompt token's logprob (the first None) and n alternatives
    logprobs_source: str = "raw"  # "raw": the model's log-softmax; "processed": what the choice was made from

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise InvalidParameter for the first field out of its range."""
        as_decoding("decoding", self.decoding)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                RANGES[name].require(name, as_integer(name, getattr(self, name)))
        new = as_integer("max_new_tokens", self.max_new_tokens)
        if not (new == 0 and self.prompt_logprobs is not None):  # 0: score the prompt, generate nothing
            RANGES["max_new_tokens"].require("max_new_tokens", new)
        for name in ("do_sample", "ignore_eos", "stream", "return_token_ids"):
            as_boolean(name, getattr(self, name))
        require_mode_agrees(self.decoding, self.do_sample)
        RANGES["penalty_alpha"].require("penalty_alpha", as_number("penalty_alpha", self.penalty_alpha))
        if self.decoding != "greedy":
            RANGES[f"top_k/{self.decoding}"].require("top_k", as_integer("top_k", self.top_k))
        RANGES["temperature"].require("temperature", as_number("temperature", self.temperature))
        RANGES["top_p"].require("top_p", as_number("top_p", self.top_p))
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise InvalidParameter("stop", PARAM, f" must be a tuple of non-empty strings, got {self.stop!r}")
        if self.seed is not None:
            RANGES["seed"].require("seed", as_integer("seed", self.seed))
        if self.eos_token_id is not None:
            ids = self.eos_token_id
            if not isinstance(ids, tuple) or not 1 <= len(ids) <= MAX_EOS_IDS \
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise InvalidParameter("eos_token_id", PARAM, f" must be 1 to {MAX_EOS_IDS} token ids, got {ids!r}")
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            RANGES[name].require(name, as_number(name, getattr(self, name)))
        require_logit_bias(self.logit_bias)
        RANGES["min_tokens"].require("min_tokens", as_integer("min_tokens", self.min_tokens))
        if self.min_tokens > self.max_new_tokens:
            raise InvalidParameter("min_tokens", PARAM, " must be <= ", OtherParam("max_new_tokens"),
                                   f" ({self.max_new_tokens}), got {self.min_tokens}")
        if not isinstance(self.logprobs_source, str) or self.logprobs_source not in LOGPROBS_SOURCES:
            raise InvalidParameter("logprobs_source", PARAM, f" must be one of "
                                   f"{', '.join(map(repr, LOGPROBS_SOURCES))}, got {describe(self.logprobs_source)}")

    def end_ids(self, model_eos: tuple[int, ...]) -> tuple[int, ...]:
        """The token ids that end this request: none with `ignore_eos`, else its own or the model's."""
        if self.ignore_eos:
            return ()
        return self.eos_token_id if self.eos_token_id is not None else model_eos

    @property
    def samples(self) -> bool:
        """True when the output depends on a random draw."""
        return self.decoding == "sample" or (self.decoding == "contrastive" and self.do_sample)

    @property
    def processes_logits(self) -> bool:
        """True when a penalty, a bias or min_tokens changes the logits before the choice."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias) or self.min_tokens > 0)

    @property
    def extras(self) -> bool:
        """True when the decode step must run its optional part for this request (processing or logprobs):
        the step's `extras` flag (handler.engine.step); a batch without such a request never pays for it."""
        return self.processes_logits or self.logprobs is not None

    @property
    def num_candidates(self) -> int:
        """Candidates the engine scores per step for this request (1 outside contrastive decoding)."""
        return self.top_k if self.decoding == "contrastive" else 1


def require_logit_bias(pairs) -> None:
    """`pairs` as `GenerationParams.logit_bias` wants them: a tuple of at most MAX_LOGIT_BIAS (token id, bias)
    pairs, ids integers >= 0 and unique, biases in [-100, 100]; else InvalidParameter naming logit_bias. The ids
    are checked against the vocabulary when the engine takes the request (it knows the model)."""
    if not isinstance(pairs, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in pairs):
        raise InvalidParameter("logit_bias", PARAM, f" must be a tuple of (token id, bias) pairs, got "
                               f"{describe(pairs)}")
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidParameter("logit_bias", PARAM, f" must have at most {MAX_LOGIT_BIAS} entries, got {len(pairs)}")
    seen = set()
    for token, bias in pairs:
        token = as_integer("logit_bias", token)
        if token < 0:
            raise InvalidParameter("logit_bias", PARAM, f" token ids must be >= 0, got {token}")
        if token in seen:
            raise InvalidParameter("logit_bias", PARAM, f" names token id {token} twice")
        seen.add(token)
        bias = as_number("logit_bias", bias)
        if not -100.0 <= bias <= 100.0:
            raise InvalidParameter("logit_bias", PARAM, f" biases must be in [-100, 100], got {fmt(bias)} for "
                                   f"token id {token}")


def require_mode_agrees(decoding: str | None, do_sample: bool | None) -> None:
    """The one rule tying `do_sample` to the decoding mode (None: not given); InvalidParameter naming do_sample."""
    if decoding == "greedy" and do_sample:
        raise InvalidParameter("do_sample", PARAM, " must be false with decoding='greedy'; use decoding='sample'")
    if decoding == "sample" and do_sample is False:
        raise InvalidParameter("do_sample", PARAM, " must be true with decoding='sample'; use decoding='greedy'")
