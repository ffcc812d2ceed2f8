"""The engine's fast path: the decode step compiled with `torch.compile(fullgraph=True)`, replayed from CUDA graphs.

The step (`handler.engine.step.decode_one_token`) is a function of tensors over
the persistent slot pool: views of buffers allocated once (fixed addresses),
mutated in place, nothing returned, no host synchronisation, its shape fixed
per (slots, candidates, sampling). `FastStep` compiles it once per shape with
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
shapes are few (`fast_shapes`): at most MAX_SHAPES, every one at the pool's
largest candidate bucket with the sampler on (a shape serves every step it
covers: a slot's tokens do not depend on the shape it runs in), the full pool
first (it covers every step), then 1 slot (the latency of a lone request), then
the pool's slots divided by 4, 16, ... A shape after the first is compiled only
if, at the first one's pace, it ends within the compile budget (COMPILE_BUDGET_S
on a GPU; on the CPU, where the compiled step is only checked, none after the
first): start-up spends about the larger of one compile and the budget on it,
whatever the pool.

Safety: `enable_fast_path` builds the fast step, then decodes a fixed set of
requests (every mode, joins and departures) both ways, eager and fast, at the
fast path's shapes; on any token mismatch or any error it logs why and the
engine stays eager. A fast step that fails later, while serving, is dropped by
the engine (`Engine._drop_step`).
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from handler.engine.params import GenerationParams
from handler.engine.pool import PoolShape, SlotPool
from handler.engine.scheduler import Engine, Request, Shape
from handler.engine.step import decode_one_token

logger = logging.getLogger(__name__)

MAX_SHAPES = 4
COMPILE_BUDGET_S = 60.0  # on a GPU: a shape after the first is compiled only if, at the first one's pace, it ends
# within this many seconds of the start
SETTINGS = ("auto", "on", "off")  # handler.compile (handler.serving.settings)
GRAPH_MODES = ("manual", "trees", "none")
SELF_CHECK_NEW_TOKENS = 16


def fast_shapes(shape: PoolShape, max_shapes: int = MAX_SHAPES) -> list[Shape]:
    """The shapes the fast step is built for, in the order they are compiled (see the module docstring)."""
    if max_shapes < 1:
        raise ValueError("max_shapes must be >= 1")
    S, K = shape.max_slots, shape.candidates
    rows, r = [S], S // 4
    while r > 1:
        rows.append(r)
        r //= 4
    if S > 1:
        rows.append(1)
    if len(rows) > max_shapes:  # keep the full pool and 1 slot, drop the smallest of the others
        rows = rows[: max_shapes - 1] + [1] if max_shapes > 1 else rows[:1]
    order = rows[:1] + rows[-1:] + rows[1:-1] if len(rows) > 1 else rows
    return [(r, K, True) for r in order]


_counter = itertools.count()


def _step(model, view, K: int, sampling: bool) -> None:
    decode_one_token(model, view, K, sampling)


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


class FastStep:
    """The decode step of one engine, compiled per shape; on CUDA replayed from CUDA graphs.

    Call `prepare()` once on an idle pool (it runs the step on it: free slots only change in ways nobody reads),
    then `step(rows, k, sampling)` for a shape it was built for.
    """

    def __init__(self, model, pool: SlotPool, shapes: list[Shape], *, graphs: str = "auto",
                 budget_s: float | None = None):
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
        self.views = {rows: pool.view(rows) for rows, _, _ in self.shapes}  # the same objects at every call
        if graphs == "trees":
            for view in self.views.values():
                for t in _view_tensors(view):
                    torch._dynamo.mark_static_address(t)
        self.ready: dict[Shape, Callable[[], None]] = {}
        self.report: PrepareReport | None = None
        # manual capture: warm-up and capture on one side stream (each stream gets its own cuBLAS workspace)
        self._stream = torch.cuda.Stream(self.device) if graphs == "manual" else None

    @property
    def path(self) -> str:
        return {"manual": "cuda-graphs", "trees": "cuda-graph-trees", "none": "compiled"}[self.graphs]

    def prepare(self) -> PrepareReport:
        """Compile every shape (the first always, the others while the budget lasts), then capture the graphs."""
        start = time.perf_counter()
        at_start = _allocator(self.device) if self.device.type == "cuda" else (0, 0)
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
                before = _allocator(self.device)
                t = time.perf_counter()
                mempool = torch.cuda.graph_pool_handle()
                for shape in built:
                    self.ready[shape] = self._capture(shape, mempool)
                self._sync()
                capture_s = time.perf_counter() - t
                after = _allocator(self.device)
                reserved, allocated = after[0] - before[0], after[1] - before[1]
            else:
                for shape in built:
                    self.ready[shape] = self._direct(shape)
                if self.graphs == "trees":  # the trees' pool came with the warm-up and recording calls (an upper
                    # bound: the warm-up's cached activations are in it too)
                    now = _allocator(self.device)
                    reserved, allocated = now[0] - at_start[0], now[1] - at_start[1]
        self.report = PrepareReport(self.graphs, built, skipped, compile_s, capture_s, reserved, allocated)
        logger.info("decode step %s: %d shape(s) %s in %.1f s compile + %.2f s capture%s", self.path, len(built),
                    built, compile_s, capture_s, f"; skipped past the budget: {skipped}" if skipped else "")
        return self.report

    def step(self, rows: int, k: int, sampling: bool) -> None:
        self.ready[(rows, k, sampling)]()

    __call__ = step

    # ---- inside ----

    def _direct(self, shape: Shape) -> Callable[[], None]:
        rows, k, sampling = shape
        view, compiled, model = self.views[rows], self.compiled, self.model
        return lambda: compiled(model, view, k, sampling)

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
    for group in (view.state, view.params):
        out += [getattr(group, f) for f in group.__dataclass_fields__]
    return out


def _allocator(device: torch.device) -> tuple[int, int]:
    return torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)


# ---- the self-check ----


def self_check_requests(engine: Engine, new_tokens: int = SELF_CHECK_NEW_TOKENS) -> list[Request]:
    """A fixed set: one more request than slots (one waits, then joins), every mode, lengths that end apart."""
    S, L, top_k = engine.shape.max_slots, engine.shape.max_len, engine.shape.max_top_k
    vocab = engine.model.vocab_size
    modes = [GenerationParams(penalty_alpha=0.6, top_k=min(4, top_k)),
             GenerationParams(decoding="greedy"),
             GenerationParams(decoding="sample", do_sample=True, top_k=50, top_p=0.9, temperature=0.8),
             GenerationParams(penalty_alpha=0.6, top_k=min(4, top_k), do_sample=True, temperature=0.7),
             GenerationParams(penalty_alpha=0.3, top_k=top_k)]
    if top_k < 2:  # no contrastive request fits this pool
        modes = [m for m in modes if m.decoding != "contrastive"]
    out = []
    for i in range(S + 1):
        prompt_len = max(1, min(1 + (5 * i) % 12, L - 2))
        new = max(1, min(new_tokens - 4 * (i % 3), L - prompt_len))
        mode = modes[i % len(modes)]
        params = GenerationParams(**{**mode.__dict__, "max_new_tokens": new})
        prompt = [1 + (7 * i + 13 * j) % (vocab - 1) for j in range(prompt_len)]
        out.append(Request(f"self-check-{i}", prompt, params, (), seed=1000 + i))
    return out


@dataclass
class SelfCheck:
    """Eager against fast on the fixed set: tokens compared one by one."""

    passed: bool
    requests: int
    tokens: int  # compared positions (the eager side's)
    differing_tokens: int
    first_mismatch: dict | None  # request, mode, position, eager and fast tokens there
    eager_s: float
    fast_s: float

    @property
    def agreement(self) -> float:
        return 1.0 - self.differing_tokens / self.tokens if self.tokens else 1.0


def compare_tokens(requests: list[Request], eager: list[list[int]], fast: list[list[int]]) -> tuple[int, int, dict | None]:
    """(compared positions, differing positions, the first mismatch); a missing or extra token differs."""
    total = differing = 0
    first = None
    for req, a, b in zip(requests, eager, fast):
        n = max(len(a), len(b))
        total += len(a)
        for pos in range(n):
            x = a[pos] if pos < len(a) else None
            y = b[pos] if pos < len(b) else None
            if x != y:
                differing += 1
                if first is None:
                    first = {"request": req.request_id, "mode": req.params.decoding,
                             "do_sample": req.params.do_sample, "position": pos, "eager": x, "fast": y}
    return total, differing, first


def run_self_check(engine: Engine, fast: Callable[[int, int, bool], None], shapes: list[Shape], path: str,
                   new_tokens: int = SELF_CHECK_NEW_TOKENS) -> SelfCheck:
    """Decode the fixed set eager then fast, both at `shapes`; the engine is left eager (all buckets)."""
    requests = self_check_requests(engine, new_tokens)
    try:
        engine.set_step(None, shapes)
        t = time.perf_counter()
        eager_gens = engine.generate(requests)
        eager_s = time.perf_counter() - t
        _raise_failed("eager", eager_gens)
        engine.set_step(fast, shapes, path)
        t = time.perf_counter()
        fast_gens = engine.generate(requests)
        fast_s = time.perf_counter() - t
        if engine.step_error is not None:
            raise RuntimeError(f"the fast step failed: {engine.step_error}")
        _raise_failed("fast", fast_gens)
    finally:
        engine.step_error = None
        if not engine.busy:
            engine.set_step(None)
    tokens, differing, first = compare_tokens(requests, [g.tokens for g in eager_gens], [g.tokens for g in fast_gens])
    return SelfCheck(differing == 0 and tokens > 0, len(requests), tokens, differing, first, eager_s, fast_s)


def _raise_failed(way: str, gens) -> None:
    failed = [g for g in gens if g.error is not None]
    if failed:
        raise RuntimeError(f"self-check request {failed[0].request_id} failed {way}: {failed[0].error!r}") \
            from failed[0].error


# ---- the switch ----


@dataclass
class FastPathReport:
    """Which decode step serves, and why (describe_handle's `decode_step`)."""

    setting: str
    device: str
    path: str = "eager"  # eager | compiled | cuda-graphs | cuda-graph-trees
    reason: str = ""
    graphs: str = "none"
    shapes: list[Shape] = field(default_factory=list)
    skipped_shapes: list[Shape] = field(default_factory=list)
    compile_s: float | None = None
    capture_s: float | None = None
    graph_pool_reserved: int = 0
    graph_pool_allocated: int = 0
    self_check: dict | None = None
    error: str | None = None
    fast_step: FastStep | None = field(default=None, repr=False)  # alive while it serves

    @property
    def graph_pool(self) -> tuple[int, int]:
        return self.graph_pool_reserved, self.graph_pool_allocated

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "fast_step"}
        out["shapes"] = [list(s) for s in self.shapes]
        out["skipped_shapes"] = [list(s) for s in self.skipped_shapes]
        out["graph_mib"] = round(self.graph_pool_reserved / 2**20, 1)
        for key in ("compile_s", "capture_s"):
            if out[key] is not None:
                out[key] = round(out[key], 3)
        return out


def enable_fast_path(engine: Engine, setting: str = "auto", *, graphs: str = "auto", max_shapes: int = MAX_SHAPES,
                     budget_s: float | None = None, build: Callable[..., FastStep] | None = None) -> FastPathReport:
    """Build the fast step for `engine`, self-check it, and install it when it passes; never raises for it.

    setting: auto (compiled and CUDA graphs on a GPU; eager on the CPU, where the compiled step measured slower),
    on (compiled on any device: on the CPU, Inductor's C++ step, no graphs), off (eager).
    """
    device = engine.pool.kv.device
    report = FastPathReport(setting, str(device))
    if setting not in SETTINGS:
        raise ValueError(f"compile must be one of {SETTINGS}, got {setting!r}")
    if setting == "off":
        report.reason = "compile: off"
        return report
    if setting == "auto" and device.type != "cuda":
        report.reason = ("compile: auto on the CPU serves eager (the compiled step measured slower than eager "
                         "on the CPU; compile: on forces it)")
        return report
    shapes = fast_shapes(engine.shape, max_shapes)
    fast = None
    try:
        fast = (build or FastStep)(engine.model, engine.pool, shapes, graphs=graphs, budget_s=budget_s)
        prep = fast.prepare()
        report.graphs, report.shapes, report.skipped_shapes = prep.graphs, prep.shapes, prep.skipped_shapes
        report.compile_s, report.capture_s = prep.compile_s, prep.capture_s
        report.graph_pool_reserved, report.graph_pool_allocated = prep.graph_pool_reserved, prep.graph_pool_allocated
        check = run_self_check(engine, fast, prep.shapes, fast.path)
        report.self_check = {**asdict(check), "agreement": round(check.agreement, 6)}
        if not check.passed:
            report.reason = (f"self-check: {check.differing_tokens} of {check.tokens} tokens differ from eager "
                             f"(first: {check.first_mismatch}); serving eager")
            logger.warning("fast decode step (%s) rejected: %s", fast.path, report.reason)
        else:
            engine.set_step(fast, prep.shapes, fast.path)
            report.path = fast.path
            report.reason = f"self-check passed: {check.tokens} tokens of {check.requests} requests as eager"
            report.fast_step = fast
            logger.info("decode step: %s (%s)", fast.path, report.reason)
    except Exception as err:  # noqa: BLE001 - whatever went wrong, the eager step serves
        logger.exception("fast decode step unavailable; serving eager")
        report.error = f"{type(err).__name__}: {err}"
        report.reason = f"building or checking the fast step failed ({report.error}); serving eager"
        engine.set_step(None)
    if report.fast_step is None:
        report.path = "eager"
        del fast
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            report.graph_pool_reserved = report.graph_pool_allocated = 0  # released with the graphs
    elif device.type == "cuda":
        torch.cuda.empty_cache()  # the eager self-check's cached activations; the graphs' pool stays
    return report
