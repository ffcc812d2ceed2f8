"""The operator's limits (`handler.limits` in model-config.yaml): bounds that narrow what requests may ask.

The ranges that hold for every worker are `GenerationParams`'s (`handler.engine.params.RANGES`, the one
range checker); a limit here only lowers an upper end (`handler.serving.fields.Field.bound` says which
limit bounds which field), and admission (`handler.serving.admission`) adds what depends on the prompt,
the pool and the time a step takes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from handler.engine.params import MAX_LOGPROBS


@dataclass(frozen=True)
class RequestLimits:
    """Bounds an operator sets in model-config.yaml (`handler.limits`); requests beyond them get 400."""

    max_prompt_tokens: int = 512  # longest prompt, in tokens
    max_new_tokens: int = 256  # largest `max_new_tokens` a request may ask for
    max_top_k: int = 16  # most contrastive candidates per step (the pool holds scratch positions for them)
    max_stop_strings: int = 4  # most entries in `stop`
    max_stop_length: int = 64  # longest stop string, in characters
    max_body_bytes: int = 65536  # largest request body the handler accepts
    max_choices: int = 32  # most generations one OpenAI-compatible request may ask for (prompts x n)
    max_logprobs: int = 5  # most alternatives per token a request may ask for (logprobs, prompt_logprobs)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | None) -> "RequestLimits":
        raw = dict(raw or {})
        refuse_unknown_keys("handler.limits", raw, {f.name for f in fields(cls)})
        for name, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"handler.limits.{name} must be a positive integer, got {value!r}")
        if raw.get("max_logprobs", 0) > MAX_LOGPROBS:
            raise ValueError(f"handler.limits.max_logprobs must be at most {MAX_LOGPROBS} (the engine's bound), "
                             f"got {raw['max_logprobs']}")
        return cls(**raw)


def refuse_unknown_keys(section: str, raw: Mapping[str, Any], known) -> None:
    """ValueError naming the keys of model-config.yaml's `section` (e.g. handler.limits) that it does not know."""
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; known: {sorted(known)}")
