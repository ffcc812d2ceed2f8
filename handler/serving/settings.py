"""The handler's settings: the `handler:` section of model-config.yaml, checked once at start-up.

Frontend keys of the same file (`batchSize`, `responseTimeout`, ...) belong to
TorchServe; the handler reads `batchSize` and `responseTimeout` to size its
warm-up and to refuse generations that could not finish in time.
A wrong setting stops the worker at start with a message naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from handler.engine.params import GenerationParams, RequestLimits

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_RESPONSE_TIMEOUT_S = 120  # TorchServe's default_response_timeout


@dataclass(frozen=True)
class HandlerSettings:
    dtype: str = "auto"  # auto (float16 on GPU, float32 on CPU) | float16 | bfloat16 | float32
    stop_check_interval: int = 4  # decode steps between looks at the tokens on the host
    warmup: bool = True  # one generation at the largest batch and length before serving
    timeout_fraction: float = 0.8  # generations are sized to finish within this part of responseTimeout
    kv_budget_mib: float | None = None  # most MiB one batch's decode buffers may take (None: what the device has)
    fault_injection: bool = False  # tests only: the header "X-Fault-Injection: oom" fails a generation with OOM
    defaults: GenerationParams = GenerationParams()
    limits: RequestLimits = RequestLimits()
    max_batch_size: int = 1  # TorchServe's batchSize
    response_timeout_s: float = DEFAULT_RESPONSE_TIMEOUT_S

    @classmethod
    def from_model_config(cls, model_yaml_config: Mapping[str, Any] | None) -> "HandlerSettings":
        config = dict(model_yaml_config or {})
        raw = dict(config.get("handler") or {})
        limits = RequestLimits.from_config(raw.pop("limits", None))
        defaults = GenerationParams.defaults_from_config(raw.pop("defaults", None), limits)
        known = {"dtype", "stop_check_interval", "warmup", "timeout_fraction", "kv_budget_mib", "fault_injection"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown handler keys {unknown}; known: {sorted(known | {'limits', 'defaults'})}")
        settings = cls(
            defaults=defaults,
            limits=limits,
            max_batch_size=int(config.get("batchSize", 1)),
            response_timeout_s=float(config.get("responseTimeout", DEFAULT_RESPONSE_TIMEOUT_S)),
            **raw,
        )
        settings.check()
        return settings

    def check(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"handler.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.stop_check_interval, int) or not 1 <= self.stop_check_interval <= 64:
            raise ValueError(f"handler.stop_check_interval must be an integer in [1, 64], got {self.stop_check_interval!r}")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"handler.warmup must be true or false, got {self.warmup!r}")
        if not 0 < self.timeout_fraction <= 1:
            raise ValueError(f"handler.timeout_fraction must be in (0, 1], got {self.timeout_fraction!r}")
        if not isinstance(self.fault_injection, bool):
            raise ValueError(f"handler.fault_injection must be true or false, got {self.fault_injection!r}")
        if self.kv_budget_mib is not None and not self.kv_budget_mib > 0:
            raise ValueError(f"handler.kv_budget_mib must be positive, got {self.kv_budget_mib!r}")
        if self.max_batch_size < 1:
            raise ValueError(f"batchSize must be >= 1, got {self.max_batch_size}")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if device.type == "cuda" else torch.float32
        return DTYPES[self.dtype]
