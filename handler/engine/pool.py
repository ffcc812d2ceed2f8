"""The persistent slot pool: every buffer decoding needs, allocated once when the worker starts.

A *slot* is one row of the pool; a request holds one slot from its prefill to
its last token, and the next request reuses it. Nothing here is allocated per
request or per batch, and no buffer ever moves: the decode step works on views
of these tensors, so its inputs keep their addresses (what CUDA graphs need).

Layout, for S slots of `max_len` positions and K_max candidate positions:

- `kv`       [2, L, S, H, P, Dh]  keys and values of every layer, P = max_len + K_max.
  Positions [0, max_len) hold a slot's sequence (prompt, then one position per
  generated token); the last K_max positions are the candidates' scratch:
  candidate j of the current step sits at position max_len + j until the
  winner is copied to the slot's next position. The cache is *not* replicated
  k times per row as transformers' contrastive search does: candidates share
  their row's context.
- `hidden`   [S, max_len, d]  float32, unit-normalised last-layer hidden states of
  the context, for the degeneration penalty (kept in float32 whatever the model
  dtype: the cosine similarities of contrastive search are computed in float32).
- `valid`    [S, P]  bool, which positions a slot's candidates may attend to.
- `tokens`   [S, max_len]  long, the generated tokens of each slot, in order.
- per-slot state [S]: `next_pos` (position of the next token, which is also its
  position id: prompts are never padded), `generated`, `finished`, `hit_eos`,
  and `logits` [S, V] float32 for the next token.
- per-slot parameters [S] (see `SlotParams`): what each request asked for, as
  tensors, so that one step serves every mode with its own alpha, k,
  temperature, seed, eos and length, penalties, logit_bias (BIAS_WIDTH pairs)
  and min_tokens.
- logits processing state: `seen` [S, V] bool, tokens of the prompt or generated
  (repetition_penalty), and `counts` [S, V] float32, how often each token was
  generated (presence and frequency penalties); kept by steps with `extras` on.
- logprobs, per generated position: `lp_token` [S, max_len] float32, the chosen
  token's logprob, and the LOGPROBS_WIDTH most likely alternatives (`lp_top_ids`
  [S, max_len, W] long, `lp_top_values` [S, max_len, W] float32); written by
  steps with `extras` on.

`pool_bytes` gives the size of all of it from the model's shape alone: the
memory plan (`handler.memory.plan`), the admission check and the worker's
memory report all use it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from handler.engine.model import MATMUL_ROW_MULTIPLE
from handler.engine.params import MAX_LOGIT_BIAS, MAX_LOGPROBS

EOS_WIDTH = 8  # end-of-text ids a request may name (params: 1 to 8)
BIAS_WIDTH = MAX_LOGIT_BIAS  # (token id, bias) pairs per slot
LOGPROBS_WIDTH = MAX_LOGPROBS  # alternatives kept per generated token
# Candidate counts a step runs with: the smallest bucket >= the largest k among its slots. Multiples of
# MATMUL_ROW_MULTIPLE (handler.engine.model), so that a greedy slot's bits beside a contrastive one are its
# bits alone: every matmul row count of the step is then a multiple of it.
CANDIDATE_BUCKETS = tuple(MATMUL_ROW_MULTIPLE * n for n in (1, 2, 4, 8, 16))


def candidate_bucket(k: int) -> int:
    """The number of candidates a step scores when its largest k is `k`."""
    for bucket in CANDIDATE_BUCKETS:
        if k <= bucket:
            return bucket
    raise ValueError(f"top_k {k} exceeds the largest candidate bucket {CANDIDATE_BUCKETS[-1]}")


def slot_buckets(max_slots: int) -> tuple[int, ...]:
    """Slot counts a step may run over: powers of two below `max_slots`, and `max_slots` itself."""
    out, n = [], 1
    while n < max_slots:
        out.append(n)
        n *= 2
    return tuple(out) + (max_slots,)


@dataclass(frozen=True)
class PoolShape:
    """What the pool holds: `max_slots` requests of up to `max_len` positions, k up to `max_top_k`."""

    max_slots: int
    max_len: int  # prompt + generated tokens of one request
    max_top_k: int  # largest k a request may ask for (limits.max_top_k)

    def __post_init__(self):
        for name in ("max_slots", "max_len", "max_top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def candidates(self) -> int:
        """K_max: scratch positions for candidates, the largest bucket a step may use."""
        return candidate_bucket(max(self.max_top_k, 1))

    @property
    def positions(self) -> int:
        """P: positions of each slot's cache, sequence plus candidate scratch."""
        return self.max_len + self.candidates


def pool_bytes(*, n_layer: int, n_embd: int, vocab_size: int, shape: PoolShape, dtype_bytes: int) -> dict[str, int]:
    """Bytes of each part of the pool (see the module docstring); the one formula everyone uses."""
    S, P, L, d = shape.max_slots, shape.positions, shape.max_len, n_embd
    return {
        "kv_cache": 2 * n_layer * S * P * d * dtype_bytes,
        "context_hidden": S * L * d * 4,
        "slot_state": S * (P + L * 8 + vocab_size * 4) + S * SlotState.bytes_per_slot()
        + S * SlotParams.bytes_per_slot()
        + S * vocab_size * (1 + 4)  # seen, counts
        + S * L * (4 + LOGPROBS_WIDTH * (8 + 4)),  # lp_token, lp_top_ids, lp_top_values
    }


@dataclass
class SlotParams:
    """Per-slot request parameters as device tensors [S] (eos: [S, EOS_WIDTH], -1 padded; bias_ids and
    bias_values: [S, BIAS_WIDTH], padded with id 0 and bias 0.0, which adds nothing)."""

    alpha: torch.Tensor  # float32, 0 outside contrastive decoding
    num_candidates: torch.Tensor  # long, 1 for greedy and sampling slots
    contrastive_sample: torch.Tensor  # bool
    sample: torch.Tensor  # bool, decoding == "sample"
    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # long, sampling slots (0: off)
    top_p: torch.Tensor  # float32
    seed: torch.Tensor  # long
    max_new: torch.Tensor  # long
    eos: torch.Tensor  # [S, EOS_WIDTH] long
    repetition: torch.Tensor  # float32, 1: off
    presence: torch.Tensor  # float32
    frequency: torch.Tensor  # float32
    min_tokens: torch.Tensor  # long
    bias_ids: torch.Tensor  # [S, BIAS_WIDTH] long
    bias_values: torch.Tensor  # [S, BIAS_WIDTH] float32
    lp_processed: torch.Tensor  # bool: logprobs from the processed logits (else raw)

    DTYPES = {"alpha": torch.float32, "num_candidates": torch.long, "contrastive_sample": torch.bool,
              "sample": torch.bool, "temperature": torch.float32, "top_k": torch.long, "top_p": torch.float32,
              "seed": torch.long, "max_new": torch.long, "eos": torch.long, "repetition": torch.float32,
              "presence": torch.float32, "frequency": torch.float32, "min_tokens": torch.long,
              "bias_ids": torch.long, "bias_values": torch.float32, "lp_processed": torch.bool}
    WIDTHS = {"eos": EOS_WIDTH, "bias_ids": BIAS_WIDTH, "bias_values": BIAS_WIDTH}

    @classmethod
    def allocate(cls, slots: int, device) -> "SlotParams":
        values = {}
        for name, dtype in cls.DTYPES.items():
            shape = (slots, cls.WIDTHS[name]) if name in cls.WIDTHS else (slots,)
            values[name] = torch.zeros(shape, dtype=dtype, device=device)
        values["eos"].fill_(-1)
        values["temperature"].fill_(1.0)
        values["top_p"].fill_(1.0)
        values["repetition"].fill_(1.0)
        return cls(**values)

    @classmethod
    def bytes_per_slot(cls) -> int:
        return sum(torch.empty((), dtype=dt).element_size() * cls.WIDTHS.get(n, 1) for n, dt in cls.DTYPES.items())

    def view(self, rows: int) -> "SlotParams":
        """The first `rows` slots."""
        return SlotParams(**{f.name: getattr(self, f.name)[:rows] for f in fields(self)})


@dataclass
class SlotState:
    """What changes from step to step, per slot [S]."""

    next_pos: torch.Tensor  # long: position (and position id) of the next token
    generated: torch.Tensor  # long: tokens generated so far
    finished: torch.Tensor  # bool: True for finished and free slots (they stop changing)
    hit_eos: torch.Tensor  # bool

    DTYPES = {"next_pos": torch.long, "generated": torch.long, "finished": torch.bool, "hit_eos": torch.bool}

    @classmethod
    def allocate(cls, slots: int, device) -> "SlotState":
        state = cls(**{n: torch.zeros(slots, dtype=dt, device=device) for n, dt in cls.DTYPES.items()})
        state.finished.fill_(True)  # every slot starts free
        return state

    @classmethod
    def bytes_per_slot(cls) -> int:
        return sum(torch.empty((), dtype=dt).element_size() for dt in cls.DTYPES.values())

    def view(self, rows: int) -> "SlotState":
        return SlotState(**{f.name: getattr(self, f.name)[:rows] for f in fields(self)})


@dataclass
class SlotPool:
    """The buffers of the module docstring; `view(rows)` is what one decode step works on."""

    shape: PoolShape
    kv: torch.Tensor  # [2, L, S, H, P, Dh]
    hidden: torch.Tensor  # [S, max_len, d] float32
    valid: torch.Tensor  # [S, P] bool
    tokens: torch.Tensor  # [S, max_len] long
    logits: torch.Tensor  # [S, V] float32
    state: SlotState
    params: SlotParams
    seen: torch.Tensor  # [S, V] bool
    counts: torch.Tensor  # [S, V] float32
    lp_token: torch.Tensor  # [S, max_len] float32
    lp_top_ids: torch.Tensor  # [S, max_len, LOGPROBS_WIDTH] long
    lp_top_values: torch.Tensor  # [S, max_len, LOGPROBS_WIDTH] float32

    EXTRA = ("seen", "counts", "lp_token", "lp_top_ids", "lp_top_values")

    @classmethod
    def allocate(cls, model, shape: PoolShape) -> "SlotPool":
        dev, S, P = model.device, shape.max_slots, shape.positions
        # zeros, not empty: masked positions are still multiplied by 0 in attention, and 0 * NaN is NaN
        kv = torch.zeros(2, model.n_layer, S, model.n_head, P, model.head_dim, device=dev, dtype=model.dtype)
        return cls(
            shape=shape,
            kv=kv,
            hidden=torch.zeros(S, shape.max_len, model.d_model, device=dev, dtype=torch.float32),
            valid=torch.zeros(S, P, device=dev, dtype=torch.bool),
            tokens=torch.zeros(S, shape.max_len, device=dev, dtype=torch.long),
            logits=torch.zeros(S, model.vocab_size, device=dev, dtype=torch.float32),
            state=SlotState.allocate(S, dev),
            params=SlotParams.allocate(S, dev),
            seen=torch.zeros(S, model.vocab_size, device=dev, dtype=torch.bool),
            counts=torch.zeros(S, model.vocab_size, device=dev, dtype=torch.float32),
            lp_token=torch.zeros(S, shape.max_len, device=dev, dtype=torch.float32),
            lp_top_ids=torch.zeros(S, shape.max_len, LOGPROBS_WIDTH, device=dev, dtype=torch.long),
            lp_top_values=torch.zeros(S, shape.max_len, LOGPROBS_WIDTH, device=dev, dtype=torch.float32),
        )

    def nbytes(self) -> int:
        tensors = [self.kv, self.hidden, self.valid, self.tokens, self.logits]
        tensors += [getattr(self, name) for name in self.EXTRA]
        tensors += [getattr(self.state, f.name) for f in fields(self.state)]
        tensors += [getattr(self.params, f.name) for f in fields(self.params)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def view(self, rows: int) -> "PoolView":
        """The first `rows` slots, as the decode step sees them (views: same storage, no copy)."""
        return PoolView(
            kv=self.kv[:, :, :rows],
            hidden=self.hidden[:rows],
            valid=self.valid[:rows],
            tokens=self.tokens[:rows],
            logits=self.logits[:rows],
            state=self.state.view(rows),
            params=self.params.view(rows),
            scratch=self.shape.max_len,
            **{name: getattr(self, name)[:rows] for name in self.EXTRA},
        )


@dataclass
class PoolView:
    """`rows` consecutive slots of the pool (tensors are views of the pool's)."""

    kv: torch.Tensor  # [2, L, R, H, P, Dh]
    hidden: torch.Tensor  # [R, max_len, d]
    valid: torch.Tensor  # [R, P]
    tokens: torch.Tensor  # [R, max_len]
    logits: torch.Tensor  # [R, V]
    state: SlotState
    params: SlotParams
    scratch: int  # first candidate scratch position (= max_len)
    seen: torch.Tensor  # [R, V] bool
    counts: torch.Tensor  # [R, V] float32
    lp_token: torch.Tensor  # [R, max_len]
    lp_top_ids: torch.Tensor  # [R, max_len, W]
    lp_top_values: torch.Tensor  # [R, max_len, W]
