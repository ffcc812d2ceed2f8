"""The requests of one TorchServe batch on their way through the handler, and their packing into sub-batches.

TorchServe forms a batch of up to `batchSize` requests; the handler runs the
valid ones together unless their decode buffers would not fit in the memory
this worker has, in which case it runs them as consecutive sub-batches, in
arrival order. A request that alone does not fit gets 507 and takes nobody
down with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from handler.engine.decoding import RowRequest, RowResult
from handler.serving.errors import RequestError
from handler.memory.plan import MIB
from handler.engine.text import RowText


@dataclass
class Row:
    """One valid request: where it sits in the batch, what to generate, and what came of it."""

    index: int  # position in TorchServe's batch
    prompt: str
    request: RowRequest
    text: RowText
    result: RowResult | None = None
    error: RequestError | None = None
    fault: str | None = None  # a fault to inject, from X-Fault-Injection (only with handler.fault_injection)


def pack(rows: list[Row], need: Callable[[list[Row]], int], budget: float) -> Iterator[list[Row]]:
    """Consecutive sub-batches whose `need` (bytes) stays within `budget`; a row too big alone gets 507."""
    batch: list[Row] = []
    for row in rows:
        alone = need([row])
        if alone > budget:
            row.error = RequestError(
                "max_new_tokens",
                f"this request needs about {alone / MIB:.0f} MiB for its generation; the worker has "
                f"{budget / MIB:.0f} MiB: use a shorter prompt, fewer new tokens or a smaller top_k",
                status=507,
            )
            continue
        if batch and need(batch + [row]) > budget:
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch
