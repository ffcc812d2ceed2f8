"""The engine's fast path: the decode step compiled with `torch.compile(fullgraph=True)`, replayed from CUDA graphs.

The step (`handler.engine.step.decode_one_token`) is a function of tensors over
the persistent slot pool: views of buffers allocated once (fixed addresses),
mutated in place, nothing returned, no host synchronisation, its shape fixed
per (slots, candidates, sampling, extras). `FastStep` compiles it once per shape with
`fullgraph=True` (a graph break or a host sync inside the step is an error, not
a silent slow path) and, on CUDA, captures each compiled shape in a CUDA graph:
a step is then one `graph.replay()`, with no Python, no guard evaluation and no
kernel launches from the host beyond that one call.

Graphs: manual capture (default) or cudagraph trees (`graphs="trees"`, i.e.
`mode="reduce-overhead"`). Both are built so that the GPU report
(`gpt2ops.gpu_report`) measures both; manual capture is the default because:

- the step's inputs already live at fixed addresses (the pool, the weights) and
  its outputs are the pool itself: a raw graph replays it as is, with no copy
  of inputs into static buffers and no output to clone before the next replay;
- a replay costs one launch; cudagraph trees evaluate Dynamo's guards (one per
  weight and pool tensor, a few hundred) and run the tree's bookkeeping in
  Python at every step, the overhead graphs are there to remove;
- trees give a graph up when an input it mutates is not static ("skipping
  cudagraphs due to mutated inputs"); with trees the pool's views are therefore
  marked with `torch._dynamo.mark_static_address` (the weights are parameters,
  static already), and the GPU report checks that no graph was skipped;
- one memory pool is shared by every captured shape: the graphs never run at
  the same time and keep no output, so the pool holds about one step's
  activations (the largest shape's), not one set per shape.

Start-up time: each shape is one Inductor compile (tens of seconds cold for the
110M shape; seconds with the on-disk cache warm: keep TORCHINDUCTOR_CACHE_DIR
and TRITON_CACHE_DIR across restarts), and a capture (milliseconds). So the
shapes are few (`fast_shapes`): at most MAX_SHAPES plain ones (extras off), every
one at the pool's largest candidate bucket with the sampler on (a shape serves
every step it covers: a slot's tokens do not depend on the shape it runs in),
the full pool first (it covers every plain step), then 1 slot (the latency of a
lone request), then the pool's slots divided by 4, 16, ...; and last the full
pool with the extras on (logits processing and logprobs: it covers every step).
A shape after the first is compiled only if, at the first one's pace, it ends
within the compile budget (COMPILE_BUDGET_S on a GPU; on the CPU, where the
compiled step is only checked, none after the first): start-up spends about the
larger of one compile and the budget on it, whatever the pool. A step no
compiled shape covers (the extras shape skipped) runs eager
(`handler.engine.runner`).

Memory: `torch.cuda.graph` empties the allocator's cache when it begins, so the
cache is emptied *before* the "before" reading (`measure_capture`): the graphs'
pool is then what capture added, not that minus the warm-up's cache. `release()`
gives back what the fast step holds when it does not serve: the graphs and their
pool, the cudagraph trees' pool (owned by the trees' manager until it is reset)
and the capture stream's cuBLAS workspace; what the allocator still reserves
beyond its start is returned, to be booked, not assumed 0.

The self-check, the switch and the fault handling are in `handler.engine.fast_path`.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
import types
from dataclasses import dataclass
from typing import Callable

import torch

from handler.engine.pool import PoolShape, SlotPool
from handler.engine.scheduler import Shape
from handler.engine.step import decode_one_token

logger = logging.getLogger(__name__)

MAX_SHAPES = 4
COMPILE_BUDGET_S = 60.0  # on a GPU: a shape after the first is compiled only if, at the first one's pace, it ends
# within this many seconds of the start
GRAPH_MODES = ("manual", "trees", "none")


def fast_shapes(shape: PoolShape, max_shapes: int = MAX_SHAPES, *, fixed: bool = False) -> list[Shape]:
    """The shapes the fast step is built for, in the order they are compiled (see the module docstring); with
    `fixed` (decode_shapes: fixed, every step at the full pool with the extras on) that one shape."""
    if max_shapes < 1:
        raise ValueError("max_shapes must be >= 1")
    S, K = shape.max_slots, shape.candidates
    if fixed:
        return [(S, K, True, True)]
    rows, r = [S], S // 4
    while r > 1:
        rows.append(r)
        r //= 4
    if S > 1:
        rows.append(1)
    if len(rows) > max_shapes:  # keep the full pool and 1 slot, drop the smallest of the others
        rows = rows[: max_shapes - 1] + [1] if max_shapes > 1 else rows[:1]
    order = rows[:1] + rows[-1:] + rows[1:-1] if len(rows) > 1 else rows
    return [(r, K, True, False) for r in order] + [(S, K, True, True)]


_counter = itertools.count()


def _step(model, view, K: int, sampling: bool, extras: bool) -> None:
    decode_one_token(model, view, K, sampling, extras)


def _fresh_step() -> Callable:
    """`_step` with a code object of its own: Dynamo keeps its compiled entries (and its recompile limit) per code
    object, so each FastStep's entries die with it and never count against another's."""
    n = next(_counter)
    names = {"co_name": f"decode_step_{n}"}
    if hasattr(_step.__code__, "co_qualname"):  # Python 3.11+
        names["co_qualname"] = names["co_name"]
    code = _step.__code__.replace(**names)
    return types.FunctionType(code, _step.__globals__, f"decode_step_{n}")


@dataclass
class PrepareReport:
    """What building the fast step took."""

    graphs: str  # manual | trees | none
    shapes: list[Shape]  # built, in order
    skipped_shapes: list[Shape]  # not built: past the compile budget
    compile_s: float  # compiling (and, on CUDA, the warm-up runs)
    capture_s: float  # capturing the CUDA graphs (manual), 0 otherwise
    graph_pool_reserved: int  # bytes the graphs' memory pool reserves (0 without graphs)
    graph_pool_allocated: int  # of which held by live tensors after capture


class CudaAllocator:
    """PyTorch's CUDA caching allocator, as the fast step measures and releases it (tests use a fake)."""

    def __init__(self, device: torch.device):
        self.device = device

    def read(self) -> tuple[int, int]:
        """(reserved, allocated) bytes."""
        return torch.cuda.memory_reserved(self.device), torch.cuda.memory_allocated(self.device)

    def empty_cache(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def clear_workspaces(self) -> None:
        """cuBLAS keeps one workspace per (handle, stream): the capture stream's stays unless cleared."""
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()

    def reset_trees(self) -> None:
        """cudagraph trees keep their pool in the trees' manager until it is reset."""
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()


def measure_capture(allocator, capture: Callable[[], None]) -> tuple[int, int]:
    """(reserved, allocated) bytes that `capture` adds: the cache is emptied first, as `torch.cuda.graph` does
    when it begins, so that "before" holds only what stays."""
    allocator.empty_cache()
    before = allocator.read()
    capture()
    after = allocator.read()
    return after[0] - before[0], after[1] - before[1]


class FastStep:
    """The decode step of one engine, compiled per shape; on CUDA replayed from CUDA graphs.

    Call `prepare()` once on an idle pool (it runs the step on it: free slots only change in ways nobody reads),
    then `step(rows, k, sampling, extras)` for a shape it was built for.
    """

    def __init__(self, model, pool: SlotPool, shapes: list[Shape], *, graphs: str = "auto",
                 budget_s: float | None = None, allocator=None):
        self.model = model
        self.pool = pool
        self.device = pool.kv.device
        cuda = self.device.type == "cuda"
        if graphs == "auto":
            graphs = "manual" if cuda else "none"
        if graphs not in GRAPH_MODES:
            raise ValueError(f"graphs must be one of {GRAPH_MODES} or 'auto', got {graphs!r}")
        if graphs != "none" and not cuda:
            raise ValueError(f"CUDA graphs ({graphs}) need a CUDA device, the pool is on {self.device}")
        self.graphs = graphs
        self.shapes = list(shapes)
        self.budget_s = budget_s if budget_s is not None else (COMPILE_BUDGET_S if cuda else 0.0)
        mode = "reduce-overhead" if graphs == "trees" else None
        self.compiled = torch.compile(_fresh_step(), fullgraph=True, dynamic=False, mode=mode)
        self.views = {shape[0]: pool.view(shape[0]) for shape in self.shapes}  # the same objects at every call
        if graphs == "trees":
            for view in self.views.values():
                for t in _view_tensors(view):
                    torch._dynamo.mark_static_address(t)
        self.ready: dict[Shape, Callable[[], None]] = {}
        self.report: PrepareReport | None = None
        self.at_start = (0, 0)
        self.allocator = allocator or (CudaAllocator(self.device) if cuda else None)
        # manual capture: warm-up and capture on one side stream (each stream gets its own cuBLAS workspace)
        self._stream = torch.cuda.Stream(self.device) if graphs == "manual" else None

    @property
    def path(self) -> str:
        return {"manual": "cuda-graphs", "trees": "cuda-graph-trees", "none": "compiled"}[self.graphs]

    def prepare(self) -> PrepareReport:
        """Compile every shape (the first always, the others while the budget lasts), then capture the graphs."""
        start = time.perf_counter()
        self.at_start = at_start = self.allocator.read() if self.allocator is not None else (0, 0)
        built, skipped = [], []
        with torch.inference_mode(), torch._dynamo.config.patch(**_dynamo_limits(len(self.shapes))):
            first_s = 0.0  # what the first shape took: the estimate for each further one
            for n, shape in enumerate(self.shapes):
                if n and time.perf_counter() - start + first_s > self.budget_s:
                    skipped.append(shape)
                    continue
                self._warm(shape, calls=3 if self.graphs == "trees" else (2 if self.graphs == "manual" else 1))
                built.append(shape)
                if n == 0:
                    first_s = time.perf_counter() - start
            self._sync()
            compile_s = time.perf_counter() - start
            reserved = allocated = 0
            capture_s = 0.0
            if self.graphs == "manual":
                t = time.perf_counter()
                reserved, allocated = measure_capture(self.allocator, lambda: self._capture_all(built))
                capture_s = time.perf_counter() - t
            else:
                for shape in built:
                    self.ready[shape] = self._direct(shape)
                if self.graphs == "trees":  # the trees' pool came with the warm-up and recording calls; the
                    # warm-up's cache is emptied first so that only what stays is counted
                    self.allocator.empty_cache()
                    now = self.allocator.read()
                    reserved, allocated = now[0] - at_start[0], now[1] - at_start[1]
        self.report = PrepareReport(self.graphs, built, skipped, compile_s, capture_s, reserved, allocated)
        logger.info("decode step %s: %d shape(s) %s in %.1f s compile + %.2f s capture%s", self.path, len(built),
                    built, compile_s, capture_s, f"; skipped past the budget: {skipped}" if skipped else "")
        return self.report

    def step(self, rows: int, k: int, sampling: bool, extras: bool) -> None:
        self.ready[(rows, k, sampling, extras)]()

    __call__ = step

    def release(self) -> int:
        """Give back what the fast step holds (it will not serve): graphs, their pool, the trees' pool, the capture
        stream's cuBLAS workspace. Returns the bytes the allocator still reserves beyond what it reserved when
        `prepare` began (to be booked, not assumed 0)."""
        self.ready.clear()
        self.compiled = None
        if self.allocator is None:
            return 0
        if self.graphs == "trees":
            self.allocator.reset_trees()
        self._stream = None
        gc.collect()
        self.allocator.clear_workspaces()
        self.allocator.empty_cache()
        return max(0, self.allocator.read()[0] - self.at_start[0])

    # ---- inside ----

    def _capture_all(self, shapes: list[Shape]) -> None:
        mempool = torch.cuda.graph_pool_handle()
        for shape in shapes:
            self.ready[shape] = self._capture(shape, mempool)
        self._sync()

    def _direct(self, shape: Shape) -> Callable[[], None]:
        rows, k, sampling, extras = shape
        view, compiled, model = self.views[rows], self.compiled, self.model
        return lambda: compiled(model, view, k, sampling, extras)

    def _warm(self, shape: Shape, calls: int) -> None:
        """The compile (first call) and warm-up runs; for manual capture on the side stream capture uses, as
        CUDA graphs want (cudagraph trees and the CPU: where the step runs)."""
        run = self._direct(shape)
        if self._stream is None:
            for _ in range(calls):
                run()
            return
        main = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(main)
        with torch.cuda.stream(self._stream):
            for _ in range(calls):
                run()
        main.wait_stream(self._stream)

    def _capture(self, shape: Shape, mempool) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=mempool, stream=self._stream):
            self._direct(shape)()
        return graph.replay

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _dynamo_limits(shapes: int) -> dict:
    """Room for every shape's compile, and an error (not a silent eager fallback) past it, where this PyTorch
    has the settings."""
    wanted = {"recompile_limit": max(8, 2 * shapes), "fail_on_recompile_limit_hit": True}
    return {k: v for k, v in wanted.items() if hasattr(torch._dynamo.config, k)}


def _view_tensors(view) -> list[torch.Tensor]:
    out = [view.kv, view.hidden, view.valid, view.tokens, view.logits]
    out += [getattr(view, name) for name in SlotPool.EXTRA]
    for group in (view.state, view.params):
        out += [getattr(group, f) for f in group.__dataclass_fields__]
    return out
