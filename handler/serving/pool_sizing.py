"""The slot pool this worker allocates: `handler.pool` of model-config.yaml against the memory it has.

- `max_slots`: `batchSize` unless set (the requests TorchServe keeps open at once);
- `max_len`: `max_prompt_tokens + max_new_tokens` (at most the model's positions) unless set;
- the budget: `pool.budget_mib`, else on a GPU what the device has free after the weights, less a
  reserve for activations and other processes; no cap on the CPU.

With `max_len: auto` a pool over the budget gets shorter slots (requests that then do not fit get
507 at admission); a `max_len` that was set and does not fit stops the worker with what would fit.
"""

from __future__ import annotations

import torch

from handler.engine.pool import PoolShape
from handler.memory.plan import MIB, ModelShape, activation_bytes, size_pool
from handler.serving.settings import HandlerSettings

GPU_FREE_FRACTION = 0.9  # of the device's free memory; the rest for other processes and fragmentation


def plan_pool(settings: HandlerSettings, shape: ModelShape, dtype_bytes: int, device: torch.device) -> PoolShape:
    limits, pool = settings.limits, settings.pool
    auto = pool.max_len == "auto"
    max_len = min(limits.max_prompt_tokens + limits.max_new_tokens, shape.n_positions) if auto else pool.max_len
    wanted = PoolShape(settings.max_slots, max_len, limits.max_top_k)
    return size_pool(shape, wanted, dtype_bytes, budget_bytes(settings, shape, wanted, dtype_bytes, device),
                     shrink=auto)


def budget_bytes(settings: HandlerSettings, shape: ModelShape, wanted: PoolShape, dtype_bytes: int,
                 device: torch.device) -> float | None:
    if settings.pool.budget_mib is not None:
        return settings.pool.budget_mib * MIB
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    reserve = activation_bytes(shape, wanted, dtype_bytes, settings.limits.max_prompt_tokens)
    return max(0.0, GPU_FREE_FRACTION * free - reserve)
