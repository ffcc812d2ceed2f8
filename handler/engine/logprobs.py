"""Log-probabilities as the engine hands them out: one `TokenLogprob` per token, ids only (no text).

The device writes, at every decode step of a step with `extras` on, each slot's
chosen token's logprob and the MAX_LOGPROBS most likely (id, logprob) pairs of the
distribution it was chosen from (`handler.engine.step.record_logprobs`); the
runner brings the ones a request asked for to the host at each look, cut to its
`logprobs` alternatives. Prompt logprobs come from the prefill (all prompt
positions' logits, `handler.engine.step.prompt_logprobs`).

Which distribution (`GenerationParams.logprobs_source`):

- ``raw``: log_softmax of the model's logits, before penalties, bias,
  temperature and contrastive re-ranking (vLLM's default, ``raw_logprobs``);
- ``processed``: log_softmax of the logits the choice was made from: after
  logit_bias, the penalties and min_tokens' masking, divided by the temperature
  for decoding="sample" (top-k and top-p restrict the draw, not the logprobs).

Under contrastive search the chosen token is the best *score*, not the most
likely token: its logprob can be below the top alternatives'. That is what was
chosen, shown as it is.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprob:
    """One token's logprob and the n most likely alternatives at its position, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(tokens: list[int], chosen: list[float], top_ids: list[list[int]], top_values: list[list[float]],
                   n: int) -> list[TokenLogprob]:
    """Host lists (one entry per token) -> TokenLogprobs with the first `n` alternatives."""
    return [TokenLogprob(t, lp, tuple(zip(ids[:n], values[:n])))
            for t, lp, ids, values in zip(tokens, chosen, top_ids, top_values)]
