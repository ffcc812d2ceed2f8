"""Predicted GPU memory of a worker, part by part, from the model's shape alone.

    per worker = CUDA context + weights + slot pool (KV cache, context hidden states, slot state)
                 + activations of the largest prefill or step + cuBLAS workspace + allocator slack
                 (+ with CUDA graphs: the graphs' pool, which holds the full-pool step's activations and the
                  capture stream's cuBLAS workspace; the allocator's cache then holds the prefill's only)
    per GPU    = workers x per worker

The same arithmetic sizes the slot pool when a worker starts (`size_pool`), is
the pool's part of the worker's memory report, and answers `scripts/plan_memory.py`
before anything is deployed. The CUDA context is a
measured figure (`scripts/measure_cuda_context.py`): about 520 MiB on an H100
with PyTorch 2.11 and lazy module loading.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from handler.engine.pool import PoolShape, pool_bytes
from handler.engine.step import PROMPT_LOGPROBS_CHUNK

MIB = 2**20
DEFAULT_CONTEXT_MIB = 520.0  # H100, PyTorch 2.11, CUDA_MODULE_LOADING=LAZY (a prediction until a GPU report measures it: docs/memory.md)
ALLOCATOR_SLACK = 0.05  # the caching allocator rounds and fragments: a few percent over what is allocated
# The workspace PyTorch allocates for cuBLAS on the first matmul and keeps (one per stream; the ledger
# counts it in `other_allocated`): CUBLAS_WORKSPACE_CONFIG's default is 32 MiB on Hopper (sm90),
# 4 MiB x 2 + 16 KiB x 8 = 8.125 MiB before it.
WORKSPACE_MIB_HOPPER = 32.0
WORKSPACE_MIB_PRE_HOPPER = 8.125


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_embd: int
    n_head: int
    vocab_size: int
    n_positions: int
    n_inner: int | None = None
    tie_word_embeddings: bool = True  # GPT-2's lm_head is wte; an untied head is V x d more

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        tied = get("tie_word_embeddings")
        return cls(get("n_layer"), get("n_embd"), get("n_head"), get("vocab_size"), get("n_positions"),
                   get("n_inner"), True if tied is None else bool(tied))

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    def parameter_count(self) -> int:
        d, L = self.n_embd, self.n_layer
        per_layer = 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * self.inner + self.inner) + (self.inner * d + d)
        head = 0 if self.tie_word_embeddings else self.vocab_size * d  # tied: lm_head is wte, no extra
        return self.vocab_size * d + self.n_positions * d + L * per_layer + 2 * d + head


# The shapes of the reference models, for plans and benchmarks without their weights
REFERENCE_SHAPES = {
    # IDEA-CCNL/Wenzhong-GPT2-110M is GPT-2 small. vocab_size 50257 is GPT-2's own: not checked against the
    # checkpoint's config.json (its 274 MB fp16 file fits 50257 and 50304 alike).
    "110m": ModelShape(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    # IDEA-CCNL/Wenzhong2.0-GPT2-3.5B-chinese: shape as given in the issue (vocab_size 50304 included); the model
    # card confirms 30 layers and 3.5B parameters, and Wenzhong-GPT2-3.5B's 7.18 GB fp16 checkpoint fits n_embd 3072.
    "3.5b": ModelShape(n_layer=30, n_embd=3072, n_head=32, vocab_size=50304, n_positions=1024),
}


def config_kwargs(shape: ModelShape) -> dict:
    """`GPT2Config(**config_kwargs(shape))`: a model of this shape (random weights, for benchmarks)."""
    return dataclasses.asdict(shape)


def pool_parts(shape: ModelShape, pool: PoolShape, dtype_bytes: int) -> dict[str, int]:
    """Bytes of the slot pool, part by part (`handler.engine.pool.pool_bytes`, the one formula)."""
    return pool_bytes(n_layer=shape.n_layer, n_embd=shape.n_embd, vocab_size=shape.vocab_size, shape=pool,
                      dtype_bytes=dtype_bytes)


def prefill_activation_bytes(shape: ModelShape, pool: PoolShape, dtype_bytes: int, prompt_len: int | None = None) -> int:
    """One prompt's prefill alone: residual, qkv, attention output, MLP in and out, the [H, T, T] scores of a
    math attention, the last position's logits, and for prompt_logprobs one chunk of positions' logits and their
    log-softmax (handler.engine.step.PROMPT_LOGPROBS_CHUNK)."""
    d, H, V = shape.n_embd, shape.n_head, shape.vocab_size
    T = prompt_len if prompt_len is not None else pool.max_len
    return T * _per_token_bytes(shape, dtype_bytes) + H * T * T * dtype_bytes + V * 4 \
        + min(T, PROMPT_LOGPROBS_CHUNK) * V * 4 * 2


def step_activation_bytes(shape: ModelShape, pool: PoolShape, dtype_bytes: int) -> int:
    """One full-pool decode step: per candidate (S*K rows) as in the prefill, scores over every position,
    logits and probabilities in float32, the sampler's sorted logits, order and noise, and with the extras on
    (logits processing, logprobs) the processed logits, their log-softmax and two temporaries in float32."""
    V, H, S, K = shape.vocab_size, shape.n_head, pool.max_slots, pool.candidates
    rows = S * K
    return rows * _per_token_bytes(shape, dtype_bytes) + rows * H * pool.positions * 4 + S * V * 4 * 3 \
        + S * V * (4 + 8) * 2 + S * V * 4 * 4


def _per_token_bytes(shape: ModelShape, dtype_bytes: int) -> int:
    return (shape.n_embd * 6 + shape.inner * 2) * dtype_bytes


def activation_bytes(shape: ModelShape, pool: PoolShape, dtype_bytes: int, prompt_len: int | None = None) -> int:
    """Peak transient bytes beside the pool: the larger of one prompt's prefill and one full-pool decode step."""
    return max(prefill_activation_bytes(shape, pool, dtype_bytes, prompt_len),
               step_activation_bytes(shape, pool, dtype_bytes))


def size_pool(shape: ModelShape, wanted: PoolShape, dtype_bytes: int, budget_bytes: float | None,
              *, shrink: bool) -> PoolShape:
    """The pool to allocate: `wanted`, or with `shrink` the longest slots that fit `budget_bytes`.

    Raises PoolDoesNotFit with what would fit when even that is impossible (or `wanted` does not fit
    and may not shrink).
    """
    def total(pool: PoolShape) -> int:
        return sum(pool_parts(shape, pool, dtype_bytes).values())

    if wanted.max_len > shape.n_positions:
        raise PoolDoesNotFit(f"max_len {wanted.max_len} exceeds the model's {shape.n_positions} positions")
    if budget_bytes is None or total(wanted) <= budget_bytes:
        return wanted
    lo, hi = 1, wanted.max_len  # the longest slots that fit: total() grows with max_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if total(PoolShape(wanted.max_slots, mid, wanted.max_top_k)) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    fits = PoolShape(wanted.max_slots, lo, wanted.max_top_k)
    need = f"{wanted.max_slots} slots of {wanted.max_len} positions need {total(wanted) / MIB:,.1f} MiB"
    if total(fits) > budget_bytes:
        raise PoolDoesNotFit(f"{need}; the budget is {budget_bytes / MIB:,.1f} MiB, less than one position per slot: "
                             "lower max_slots or raise the budget")
    if not shrink:
        raise PoolDoesNotFit(f"{need}; the budget is {budget_bytes / MIB:,.1f} MiB: {wanted.max_slots} slots of "
                             f"{fits.max_len} positions fit (set max_len: auto, or lower max_slots)")
    return fits


class PoolDoesNotFit(ValueError):
    """The slot pool asked for does not fit in the memory the worker may use."""


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    dtype_bytes: int
    workers_per_gpu: int
    slots: int  # the pool's max_slots (batchSize)
    top_k: int  # limits.max_top_k
    max_len: int  # positions per slot: prompt + new tokens
    context_mib: float
    workspace_mib: float = WORKSPACE_MIB_HOPPER
    graphs: bool = False  # the decode step replays CUDA graphs (handler.compile auto on a GPU)

    @property
    def pool(self) -> PoolShape:
        return PoolShape(self.slots, self.max_len, self.top_k)

    def per_worker(self) -> dict[str, float]:
        weights = self.shape.parameter_count() * self.dtype_bytes
        pool = pool_parts(self.shape, self.pool, self.dtype_bytes)
        parts = {
            "cuda_context": self.context_mib,
            "weights": weights / MIB,
            "kv_cache": pool["kv_cache"] / MIB,
            "context_hidden_and_slots": (pool["context_hidden"] + pool["slot_state"]) / MIB,
        }
        prompt = self.max_len // 2
        if self.graphs:  # the step's activations live in the graphs' pool, with the capture stream's workspace
            parts["activations"] = prefill_activation_bytes(self.shape, self.pool, self.dtype_bytes, prompt) / MIB
            parts["graphs"] = step_activation_bytes(self.shape, self.pool, self.dtype_bytes) / MIB \
                + self.workspace_mib
        else:
            parts["activations"] = activation_bytes(self.shape, self.pool, self.dtype_bytes, prompt) / MIB
        parts["allocator_slack"] = ALLOCATOR_SLACK * (sum(parts.values()) - self.context_mib)
        parts["workspaces"] = self.workspace_mib  # one fixed allocation: no slack on it
        parts["total"] = sum(parts.values())
        return {k: round(v, 1) for k, v in parts.items()}

    def per_gpu_mib(self) -> float:
        return round(self.workers_per_gpu * self.per_worker()["total"], 1)
