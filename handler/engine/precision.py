"""The float32 matmul precision the engine needs, owned here rather than left to whoever imported last.

TorchServe 0.12.0's `ts/torch_handler/base_handler.py` calls
`torch.set_float32_matmul_precision("high")` when it is imported on a GPU of
compute capability 8.0 or newer: every float32 matmul of the process then runs
in TF32 (10-bit mantissa, about 1e-3 relative error). The engine's float32
matmul is the contrastive ranking's cosine similarity (`handler.engine.ranking`),
kept in float32 so that it ranks as transformers and the CPU do; in TF32 it
drifts from both, silently. The model's own matmuls are float16 and unaffected.

So the handler calls `own_matmul_precision()` after TorchServe's import (in
`initialize`), and reports what it found and what it set.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

ENGINE_PRECISION = "highest"  # float32 matmuls in float32: no TF32


def own_matmul_precision() -> dict:
    """Set float32 matmuls to ENGINE_PRECISION; returns {"float32_matmul_precision", "found", "changed"}."""
    found = torch.get_float32_matmul_precision()
    if found != ENGINE_PRECISION:
        torch.set_float32_matmul_precision(ENGINE_PRECISION)
        logger.warning("float32 matmul precision was %r (TorchServe's base handler sets 'high', TF32, on compute "
                       "capability >= 8.0): set to %r for the float32 contrastive ranking", found, ENGINE_PRECISION)
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(), "found": found,
            "changed": found != ENGINE_PRECISION}
