"""The static buffers of one generation call: KV cache, context hidden states, token slots.

Layout (one allocation each, fixed for the whole call, written in place):

- `kv`      [2, L, B, H, S, Dh]  keys and values of every layer. S = T + N + K:
  prompt slots [0, T), one slot per generated token, and K scratch slots where
  the candidates of the current step sit (candidate j of step t at slot t + j)
  until the winner is copied to slot t. The cache is *not* replicated k times
  per row as transformers' contrastive search does: candidates share their
  row's context.
- `hidden`  [B, S, d]  unit-normalised last-layer hidden states of the context,
  for the degeneration penalty (only allocated for contrastive decoding).
- `valid`   [B, S]  bool, which slots a row may attend to (False on left padding
  and beyond the current position).
- `tokens`  [B, S]  long, the token in every slot.

`buffer_bytes` gives the size of these from the config alone, for the memory
plan (`handler.memory.plan`) and for admission control before a batch runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def slots_needed(prompt_len: int, max_new_tokens: int, num_candidates: int) -> int:
    """Cache slots S for a batch padded to `prompt_len` generating up to `max_new_tokens`."""
    return prompt_len + max_new_tokens + num_candidates


def buffer_bytes(
    *,
    n_layer: int,
    n_embd: int,
    batch: int,
    slots: int,
    dtype_bytes: int,
    contrastive: bool = True,
) -> dict[str, int]:
    """Bytes of each static buffer for `batch` rows of `slots` slots (see module docstring)."""
    return {
        "kv_cache": 2 * n_layer * batch * slots * n_embd * dtype_bytes,
        "context_hidden": batch * slots * n_embd * dtype_bytes if contrastive else 0,
        "slot_state": batch * slots * (1 + 8),  # valid (bool) + tokens (int64)
    }


@dataclass
class DecodeBuffers:
    kv: torch.Tensor  # [2, L, B, H, S, Dh]
    hidden: torch.Tensor | None  # [B, S, d]
    valid: torch.Tensor  # [B, S] bool
    tokens: torch.Tensor  # [B, S] long

    @classmethod
    def allocate(cls, model, batch: int, slots: int, *, contrastive: bool) -> "DecodeBuffers":
        dev, dt = model.device, model.dtype
        # zeros, not empty: masked slots are still multiplied by 0 in attention, and 0 * NaN is NaN
        kv = torch.zeros(2, model.n_layer, batch, model.n_head, slots, model.head_dim, device=dev, dtype=dt)
        hidden = torch.zeros(batch, slots, model.d_model, device=dev, dtype=dt) if contrastive else None
        valid = torch.zeros(batch, slots, device=dev, dtype=torch.bool)
        tokens = torch.zeros(batch, slots, device=dev, dtype=torch.long)
        return cls(kv, hidden, valid, tokens)

    def nbytes(self) -> int:
        parts = [self.kv, self.valid, self.tokens] + ([self.hidden] if self.hidden is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)
