"""Predicted GPU memory of a worker, part by part, from the model's shape alone.

    per worker = CUDA context + weights + peak of one generation (decode buffers + activations)
                 + cuBLAS workspace + allocator slack
    per GPU    = workers x per worker

The same arithmetic sizes batches at run time (`handler.serving.batch`) and answers
`scripts/plan_memory.py` before anything is deployed. The CUDA context is a
measured figure (`scripts/measure_cuda_context.py`): about 520 MiB on an H100
with PyTorch 2.11 and lazy module loading.
"""

from __future__ import annotations

from dataclasses import dataclass

from handler.engine.kv_cache import buffer_bytes, slots_needed

MIB = 2**20
DEFAULT_CONTEXT_MIB = 520.0  # H100, PyTorch 2.11, CUDA_MODULE_LOADING=LAZY (see the README's table)
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


def generation_bytes(shape: ModelShape, *, batch: int, prompt_len: int, max_new: int, k: int,
                     dtype_bytes: int, sampling: bool = False) -> dict[str, int]:
    """Peak bytes of one generation call: static buffers plus the larger of prefill and step activations."""
    B, T, d, H, V = batch, prompt_len, shape.n_embd, shape.n_head, shape.vocab_size
    slots = slots_needed(T, max_new, k)
    buffers = buffer_bytes(n_layer=shape.n_layer, n_embd=d, batch=B, slots=slots, dtype_bytes=dtype_bytes,
                           contrastive=k > 1)
    # prefill: residual, qkv, attention output, MLP in and out, and the [B, H, T, T] scores of a math SDPA
    prefill = B * T * (d * 6 + shape.inner * 2) * dtype_bytes + B * H * T * T * dtype_bytes + B * V * 4
    # a step: the same per candidate, scores over all slots, logits and probabilities in float32
    rows = B * k
    step = rows * (d * 6 + shape.inner * 2) * dtype_bytes + rows * H * slots * 4 + B * V * 4 * 3
    if sampling:
        step += B * V * (4 + 8) * 2  # sorted logits and their order, noise
    activations = max(prefill, step)
    return {**buffers, "activations": activations, "total": sum(buffers.values()) + activations}


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    dtype_bytes: int
    workers_per_gpu: int
    batch: int
    top_k: int
    max_len: int  # prompt + new tokens
    context_mib: float
    workspace_mib: float = WORKSPACE_MIB_HOPPER

    def per_worker(self) -> dict[str, float]:
        weights = self.shape.parameter_count() * self.dtype_bytes
        prompt = max(1, self.max_len // 2)
        gen = generation_bytes(self.shape, batch=self.batch, prompt_len=prompt, max_new=self.max_len - prompt,
                               k=self.top_k, dtype_bytes=self.dtype_bytes)
        parts = {
            "cuda_context": self.context_mib,
            "weights": weights / MIB,
            "kv_cache": gen["kv_cache"] / MIB,
            "context_hidden_and_slots": (gen["context_hidden"] + gen["slot_state"]) / MIB,
            "activations": gen["activations"] / MIB,
        }
        parts["allocator_slack"] = ALLOCATOR_SLACK * (sum(parts.values()) - self.context_mib)
        parts["workspaces"] = self.workspace_mib  # one fixed allocation: no slack on it
        parts["total"] = sum(parts.values())
        return {k: round(v, 1) for k, v in parts.items()}

    def per_gpu_mib(self) -> float:
        return round(self.workers_per_gpu * self.per_worker()["total"], 1)
