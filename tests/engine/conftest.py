"""Helpers of the engine tests: requests from prompts, and running them through a pool."""

from __future__ import annotations

import pytest

from handler.engine import Engine, GenerationParams, PoolShape, Request, generate

EOS = (0,)

# one set of parameters per decoding mode, for the tests that run each mode through the same check
MODES = {
    "contrastive": {"decoding": "contrastive", "penalty_alpha": 0.6, "top_k": 4},
    "contrastive-sampling": {"decoding": "contrastive", "penalty_alpha": 0.5, "top_k": 5, "do_sample": True,
                             "temperature": 0.6},
    "greedy": {"decoding": "greedy"},
    "sample": {"decoding": "sample", "do_sample": True, "top_k": 40, "top_p": 0.9, "temperature": 0.7},
}


def requests_for(prompts, params, seeds=None, eos=EOS) -> list[Request]:
    """One request per prompt, ids "0", "1", ..."""
    seeds = seeds or [0] * len(prompts)
    params = params if isinstance(params, list) else [params] * len(prompts)
    return [Request(str(i), list(p), q, eos, s) for i, (p, q, s) in enumerate(zip(prompts, params, seeds))]


def alone(model, request: Request) -> list[int]:
    """The tokens a request gets when it is the only one in its pool."""
    return generate(model, [Request("alone", request.prompt_ids, request.params, request.eos_ids, request.seed)])[0].tokens


@pytest.fixture
def make_engine(fp32_model):
    """An engine over the tiny fp32 model: make_engine(max_slots, max_len=96, max_top_k=16, **kw)."""

    def make(max_slots: int, max_len: int = 96, max_top_k: int = 16, **kw) -> Engine:
        return Engine(fp32_model[1], PoolShape(max_slots, max_len, max_top_k), **kw)

    return make


__all__ = ["EOS", "MODES", "GenerationParams", "alone", "requests_for"]
