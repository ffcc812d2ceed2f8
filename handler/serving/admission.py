"""Admission: whether a valid request can be served by this worker, decided before it takes a slot.

Three questions, each answered in one place here:

- length: the prompt within `limits.max_prompt_tokens`, prompt + `max_new_tokens`
  within the model's positions (400 naming the field);
- memory: prompt + `max_new_tokens` within the positions of a slot of the pool
  this worker allocated at start (507: the request is valid, the worker too small);
- time: `max_new_tokens` that can finish before the request's deadline at the
  step time measured at warm-up (400).

And the deadline itself: a request that runs past `timeout_fraction` of the
response timeout ends with `finish_reason: "timeout"` and keeps what it generated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from handler.engine.params import PARAM, GenerationParams
from handler.engine.pool import PoolShape
from handler.memory.plan import MIB
from handler.serving.errors import RequestError
from handler.serving.limits import RequestLimits


@dataclass
class Admission:
    limits: RequestLimits
    n_positions: int  # the model's
    pool: PoolShape  # what the worker allocated
    position_bytes: int  # pool bytes per position of one slot (for the 507 message)
    request_budget_s: float  # timeout_fraction x responseTimeout
    step_ms: float | None = None  # one decode step at the full pool, measured at warm-up
    max_new_tokens_in_time: int | None = None  # set with step_ms

    def set_step_time(self, step_ms: float) -> None:
        """Record the warm-up's step time; from then on generations that cannot finish in time are refused."""
        self.step_ms = step_ms
        self.max_new_tokens_in_time = max(1, min(self.limits.max_new_tokens,
                                                 int(self.request_budget_s * 1000 / step_ms)))

    def admit(self, prompt_tokens: int, params: GenerationParams) -> None:
        """Raise RequestError (400 or 507) when this request cannot be served here."""
        limits, n_pos, new = self.limits, self.n_positions, params.max_new_tokens
        if prompt_tokens > limits.max_prompt_tokens:
            raise RequestError("prompt", f"prompt is {prompt_tokens} tokens; the limit is {limits.max_prompt_tokens}")
        if prompt_tokens + new > n_pos:
            raise RequestError(
                "max_new_tokens",
                (f"prompt ({prompt_tokens} tokens) + ", PARAM, f" ({new}) exceeds the model's {n_pos} positions; "
                 f"ask for at most {max(0, n_pos - prompt_tokens)} new tokens"),
            )
        if prompt_tokens + new > self.pool.max_len:
            need = (prompt_tokens + new) * self.position_bytes
            raise RequestError(
                "max_new_tokens",
                f"this request needs {prompt_tokens + new} positions (about {need / MIB:.1f} MiB of cache); this "
                f"worker's slots hold {self.pool.max_len} positions ({self.position_bytes * self.pool.max_len / MIB:.2f}"
                f" MiB each): use a shorter prompt or fewer new tokens (at most "
                f"{max(0, self.pool.max_len - prompt_tokens)})",
                status=507,
            )
        if self.max_new_tokens_in_time is not None and new > self.max_new_tokens_in_time:
            raise RequestError(
                "max_new_tokens",
                (PARAM, f"={new} cannot finish within the response timeout "
                 f"({self.request_budget_s:.0f} s at about {self.step_ms:.1f} ms per step); "
                 f"ask for at most {self.max_new_tokens_in_time}"),
            )

    def deadline(self, now: float | None = None) -> float:
        """When a request admitted now ends as "timeout" (time.monotonic)."""
        return (time.monotonic() if now is None else now) + self.request_budget_s
