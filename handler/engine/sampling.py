"""Random draws that depend only on (seed, step, token): reproducible and batch-invariant.

A request's seed must give the same text whatever else shares its batch, so no
draw may come from a generator shared by the batch. Each draw is instead a hash
of the row's seed, the decoding step and the token id (a counter-based
generator in the spirit of Philox, here the 32-bit "lowbias32" mixer with
31-bit multipliers so that int64 products never overflow). It runs as plain
tensor ops on the device, with no host synchronisation, so it can be captured
in a CUDA graph.

Sampling uses the Gumbel-max trick: argmax(logits / T + G) with G ~ Gumbel(0, 1)
is a draw from softmax(logits / T).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x61C88647  # 2**32 / golden ratio, odd, < 2**31

# stream salts: draws for different purposes never coincide
STREAM_SAMPLE = 0x1B873593
STREAM_CONTRASTIVE = 0x5BD1E995


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, step: torch.Tensor, index: torch.Tensor, stream: int) -> torch.Tensor:
    """U(0, 1) draws, float32, shaped like `index`.

    seed [B] long in [0, 2**32); step: long scalar tensor; index [B, N] long (token ids).
    """
    h = _mix32((seed ^ stream) & _MASK32)  # [B]
    h = _mix32((h + step * _GOLDEN) & _MASK32)  # [B]
    h = _mix32((h[:, None] + index * _GOLDEN) & _MASK32)  # [B, N]
    return to_unit_interval(_mix32(h))


def to_unit_interval(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2**32)) to float32 in (0, 1), never 0 or 1.

    The 23 high bits k give (k + 0.5) / 2**23, exact in float32. With 24 bits the largest value, 1 - 2**-25,
    rounds to 1.0 in float32; its Gumbel draw is +inf, and that token would win whatever its probability,
    about once in 2**24 draws.
    """
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / 2**23)


def gumbel(seed, step, index, stream: int) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped like `index` (see `uniform`)."""
    return -torch.log(-torch.log(uniform(seed, step, index, stream)))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
) -> torch.Tensor:
    """Draw one token per row from softmax(logits / T), restricted by top-k then top-p.

    logits [B, V] float32; temperature [B] > 0; top_k [B] (0: no restriction);
    top_p [B] in (0, 1]; seed [B]; step scalar. Returns token ids [B].
    The order of restrictions (temperature, top-k, top-p) is the one transformers uses.
    """
    scaled = logits / temperature[:, None]  # [B, V]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V]
    keep = allowed(sorted_logits, top_k, top_p)  # [B, V]
    noisy = sorted_logits + gumbel(seed, step, order, STREAM_SAMPLE)
    choice = noisy.masked_fill(~keep, float("-inf")).argmax(dim=-1, keepdim=True)  # [B, 1]
    return order.gather(1, choice).squeeze(1)


def allowed(sorted_logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool: which of the sorted tokens top-k, then top-p, leave to draw from (the first always)."""
    V = sorted_logits.shape[1]
    rank = torch.arange(V, device=sorted_logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)
    keep = rank < k[:, None]  # [B, V]
    probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    # top_p = 1 is off: in float32 the running sum reaches 1.0 before a long tail ends, which would drop its tokens
    return keep & ((mass_before < top_p[:, None]) | (rank == 0) | (top_p[:, None] >= 1.0))
