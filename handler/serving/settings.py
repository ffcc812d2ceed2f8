"""The handler's settings: the `handler:` section of model-config.yaml, checked once at start-up.

Frontend keys of the same file (`batchSize`, `responseTimeout`,
`continuousBatching`, ...) belong to TorchServe; the handler reads `batchSize`
(the requests generating at once, and the default number of slots),
`responseTimeout` (to refuse generations that could not finish in time) and
`continuousBatching` (per-step scheduling, or each batch run to completion).
A wrong setting stops the worker at start with a message naming the key.

The file is YAML 1.1 (TorchServe reads it with yaml.safe_load): an unquoted on/off/yes/no/true/false is a
boolean, not a word. `compile: on` and `compile: off` (as the docs show them) mean what they say; in any other
field that takes words (dtype, pool.decode_shapes, defaults.decoding) a boolean is refused with a message
naming the field and showing the quoted form (`yaml_choice`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from handler.engine.params import GenerationParams
from handler.serving.fields import defaults_from_config
from handler.serving.limits import RequestLimits, refuse_unknown_keys

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_RESPONSE_TIMEOUT_S = 120  # TorchServe's default_response_timeout
DECODE_SHAPES = ("buckets", "fixed")
COMPILE = ("auto", "on", "off")  # handler.engine.compiled.SETTINGS
COMPILE_BOOLEANS = {True: "on", False: "off"}  # `compile: on` / `compile: off` unquoted: YAML booleans
# the fields that take words, where a YAML boolean is refused, each with a word shown in the message
WORD_FIELDS = {"handler": {"dtype": "float16"}, "handler.pool": {"decode_shapes": "fixed"},
               "handler.defaults": {"decoding": "greedy"}}


def yaml_choice(field: str, value: Any, booleans: Mapping[bool, str] | None = None, example: str = "...") -> Any:
    """A word field's value as YAML gave it: a boolean is `booleans[value]` when the field gives booleans a
    meaning (compile: on -> 'on'), else a ValueError naming the field and the quoting that keeps the word."""
    if not isinstance(value, bool):
        return value
    if booleans is not None:
        return booleans[value]
    name = field.rsplit(".", 1)[-1]
    raise ValueError(f"{field} must be a word, got the YAML boolean {str(value).lower()}: YAML reads an unquoted "
                     f"on/off/yes/no/true/false as a boolean; quote the value in model-config.yaml "
                     f"(e.g. {name}: \"{example}\")")


def _words(section: str, raw: dict) -> dict:
    """`raw` with its word fields checked for YAML booleans (yaml_choice)."""
    for name, example in WORD_FIELDS.get(section, {}).items():
        if name in raw:
            raw[name] = yaml_choice(f"{section}.{name}", raw[name], example=example)
    return raw


@dataclass(frozen=True)
class PoolSettings:
    """`handler.pool`: the slot pool allocated once at start (handler.engine.pool)."""

    max_slots: int | None = None  # requests decoded at once; None: batchSize
    max_len: int | str = "auto"  # positions per slot; auto: max_prompt_tokens + max_new_tokens (<= the model's)
    budget_mib: float | None = None  # most MiB the pool may take; None: what the GPU has free, no cap on the CPU
    decode_shapes: str = "buckets"  # buckets: the smallest shape holding the live slots | fixed: always the full pool

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | None) -> "PoolSettings":
        raw = _words("handler.pool", dict(raw or {}))
        refuse_unknown_keys("handler.pool", raw, {f.name for f in fields(cls)})
        settings = cls(**raw)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.max_slots is not None and not _positive_int(self.max_slots):
            raise ValueError(f"handler.pool.max_slots must be a positive integer, got {self.max_slots!r}")
        if self.max_len != "auto" and not _positive_int(self.max_len):
            raise ValueError(f"handler.pool.max_len must be 'auto' or a positive integer, got {self.max_len!r}")
        if self.budget_mib is not None and (isinstance(self.budget_mib, bool)
                                            or not isinstance(self.budget_mib, (int, float)) or self.budget_mib <= 0):
            raise ValueError(f"handler.pool.budget_mib must be a positive number, got {self.budget_mib!r}")
        if self.decode_shapes not in DECODE_SHAPES:
            raise ValueError(f"handler.pool.decode_shapes must be one of {DECODE_SHAPES}, got {self.decode_shapes!r}")


@dataclass(frozen=True)
class HandlerSettings:
    dtype: str = "auto"  # auto (float16 on GPU, float32 on CPU) | float16 | bfloat16 | float32
    stop_check_interval: int = 4  # decode steps between looks at the tokens on the host
    iteration_ms: float = 25.0  # continuous batching: decoding per call of the frontend before it gets answers
    warmup: bool = True  # time a step at the full pool before serving
    # the decode step: auto = compiled + CUDA graphs on a GPU, eager on the CPU | on = compiled on any device |
    # off = eager; a fast step that fails its start-up self-check (or errs) falls back to eager by itself
    compile: str = "auto"
    timeout_fraction: float = 0.8  # a request ends ("timeout") after this part of responseTimeout
    fault_injection: bool = False  # tests only: the header "X-Fault-Injection" (handler.serving.preparation)
    pool: PoolSettings = PoolSettings()
    defaults: GenerationParams = GenerationParams()
    limits: RequestLimits = RequestLimits()
    max_batch_size: int = 1  # TorchServe's batchSize
    response_timeout_s: float = DEFAULT_RESPONSE_TIMEOUT_S
    continuous_batching: bool = False  # TorchServe's continuousBatching

    @classmethod
    def from_model_config(cls, model_yaml_config: Mapping[str, Any] | None) -> "HandlerSettings":
        config = dict(model_yaml_config or {})
        raw = _words("handler", dict(config.get("handler") or {}))
        if "compile" in raw:
            raw["compile"] = yaml_choice("handler.compile", raw["compile"], COMPILE_BOOLEANS)
        limits = RequestLimits.from_config(raw.pop("limits", None))
        defaults = defaults_from_config(_words("handler.defaults", dict(raw.pop("defaults", None) or {})), limits)
        pool = PoolSettings.from_config(raw.pop("pool", None))
        # the sections were popped above; the frontend's keys are read from the top level, not from handler:
        refuse_unknown_keys("handler", raw, {f.name for f in fields(cls)} - {"max_batch_size", "response_timeout_s",
                                                                            "continuous_batching"})
        settings = cls(
            pool=pool,
            defaults=defaults,
            limits=limits,
            max_batch_size=config.get("batchSize", 1),
            response_timeout_s=float(config.get("responseTimeout", DEFAULT_RESPONSE_TIMEOUT_S)),
            continuous_batching=config.get("continuousBatching", False),
            **raw,
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"handler.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not _positive_int(self.stop_check_interval) or self.stop_check_interval > 64:
            raise ValueError(f"handler.stop_check_interval must be an integer in [1, 64], got {self.stop_check_interval!r}")
        if isinstance(self.iteration_ms, bool) or not isinstance(self.iteration_ms, (int, float)) \
                or not 0 < self.iteration_ms <= 10_000:
            raise ValueError(f"handler.iteration_ms must be a number in (0, 10000], got {self.iteration_ms!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"handler.compile must be one of {COMPILE}, got {self.compile!r}")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"handler.warmup must be true or false, got {self.warmup!r}")
        if not 0 < self.timeout_fraction <= 1:
            raise ValueError(f"handler.timeout_fraction must be in (0, 1], got {self.timeout_fraction!r}")
        if not isinstance(self.fault_injection, bool):
            raise ValueError(f"handler.fault_injection must be true or false, got {self.fault_injection!r}")
        if not _positive_int(self.max_batch_size):
            raise ValueError(f"batchSize must be >= 1, got {self.max_batch_size!r}")
        if not isinstance(self.continuous_batching, bool):
            raise ValueError(f"continuousBatching must be true or false, got {self.continuous_batching!r}")

    @property
    def max_slots(self) -> int:
        return self.pool.max_slots or self.max_batch_size

    @property
    def request_budget_s(self) -> float:
        """Seconds a request may generate before it ends as "timeout"."""
        return self.timeout_fraction * self.response_timeout_s

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1
