"""Whether the fast decode step serves: its self-check against eager, the switch, and what happens after a fault.

The self-check compares the fast step with eager **one step at a time, from the
same pool state** (`check_steps`), the way a kernel is tested against its
reference: the pool is prefilled with the fixed set of requests, then at each
step the state is saved, the fast step runs, its result is kept, the state is
restored, and the eager step runs from it. Both results are then compared slot
by slot, and the next step starts from eager's state, so one rounding flip
never turns the rest of a request into "differences".

- the chosen token must be equal, unless eager's own decision was a near tie:
  its best and second-best choice values (the contrastive score, Gumbel-
  perturbed when sampling; the logits for one-candidate slots) are within the
  tolerance. Near ties are counted and reported, never failed on; the slot's
  other parts are then not compared at that step;
- everything else the step writes must agree: the counters and flags exactly,
  and, within the dtype's tolerance (relative to the row's largest
  magnitude), the next logits, the winner's context state, the candidates'
  keys and values (scratch) and the winner's keys and values at the slot's
  position (a stale cache row shows here).

TOLERANCE, relative to each row's largest magnitude: eager half precision
rounds every op's result to the format (relative error up to eps/2, eps =
2**-10 for float16, 2**-7 for bfloat16), while Inductor fuses layer norms, GELU
and bias adds and keeps float32 between them. The two differ by about eager's
own rounding error against float32, which the CPU measured at about 1.4 eps on
the tiny model (tests/engine/test_half_precision.py) and which grows with depth
roughly as the square root of the layers (48 layers: about 5 times). 16 eps
leaves room for that and is still far below what a wrong step does (a dropped
bias, a wrong position: differences of order 1; tests/engine/test_fast_path.py).
float32: Inductor reorders reductions (a few eps of 2**-23) and TF32 is off
(`handler.engine.precision`); 1e-4 is far above the one, far below a bug.

The end-to-end run (every request eager, then fast, tokens compared) is kept
as a figure, reported and never gating: after one near-tie flip the rest of a
request differs, so it measures rounding on near ties, not correctness.

After a fault while serving (`FastPathReport.after_fault`): the engine has
dropped the fast step for eager; a fault on the device (an illegal address in a
replay, a device-side assert) is sticky, so the context is probed: healthy, the
worker serves eager from then on; unhealthy, the report says so and its
`on_unhealthy` callback runs (the handler exits so that TorchServe restarts the
worker), so that no request keeps failing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from handler.engine.compiled import MAX_SHAPES, FastStep, fast_shapes
from handler.engine.params import GenerationParams
from handler.engine.pool import SlotPool
from handler.engine.core import Engine
from handler.engine.scheduler import Request, Shape
from handler.engine.step import decode_one_token, prefill_slot, processed_logits

logger = logging.getLogger(__name__)

SETTINGS = ("auto", "on", "off")  # handler.compile (handler.serving.settings)
SELF_CHECK_NEW_TOKENS = 16
CHECK_STEPS = 12  # steps compared one at a time
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
TOLERANCE = {torch.float16: 16 * EPS[torch.float16], torch.bfloat16: 16 * EPS[torch.bfloat16], torch.float32: 1e-4}


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of one fast step against eager in `dtype` (module docstring)."""
    return TOLERANCE.get(dtype, TOLERANCE[torch.float32])


# ---- the requests ----


def self_check_requests(engine: Engine, new_tokens: int = SELF_CHECK_NEW_TOKENS) -> list[Request]:
    """A fixed set: one more request than slots (one waits, then joins), every mode, lengths that end apart."""
    S, L, top_k = engine.shape.max_slots, engine.shape.max_len, engine.shape.max_top_k
    vocab = engine.model.vocab_size
    modes = [GenerationParams(penalty_alpha=0.6, top_k=min(4, top_k)),
             GenerationParams(decoding="greedy"),
             GenerationParams(decoding="sample", do_sample=True, top_k=50, top_p=0.9, temperature=0.8),
             GenerationParams(penalty_alpha=0.6, top_k=min(4, top_k), do_sample=True, temperature=0.7),
             GenerationParams(penalty_alpha=0.3, top_k=top_k),
             GenerationParams(penalty_alpha=0.6, top_k=min(4, top_k), repetition_penalty=1.3, presence_penalty=0.4,
                              frequency_penalty=0.2, logit_bias=((1, 1.5), (2, -3.0)), min_tokens=1, logprobs=5,
                              logprobs_source="processed")]
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


# ---- one step at a time ----


@dataclass
class StepCheck:
    """The fast step against eager, one step at a time from the same state (module docstring)."""

    passed: bool
    dtype: str
    tolerance: float
    steps: int
    compared: int  # (slot, step) pairs compared
    near_ties: int  # token differences at eager's own near ties: counted, not failed
    failures: int
    worst: dict[str, float]  # largest relative difference of each part (compared slots only)
    first_failure: dict | None


def _written(pool: SlotPool, rows: int, pos: torch.Tensor, at: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copies of what one step over `rows` may write, each with the slot axis first. pos [R]: next positions;
    at [R]: generated positions (where the logprobs go)."""
    ar = torch.arange(rows, device=pool.kv.device)
    st = pool.state
    return {
        "counts": pool.counts[:rows].clone(),
        "seen": pool.seen[:rows].clone(),
        "lp_token": pool.lp_token[ar, at].clone(),
        "lp_top_values": pool.lp_top_values[ar, at].clone(),
        "lp_top_ids": pool.lp_top_ids[ar, at].clone(),
        "logits": pool.logits[:rows].clone(),
        "hidden_at_pos": pool.hidden[ar, pos].clone(),  # [R, d]
        "kv_at_pos": pool.kv[:, :, ar, :, pos].clone(),  # [R, 2, L, H, Dh]
        "kv_scratch": pool.kv[:, :, :rows, :, pool.shape.max_len:].movedim(2, 0).clone(),  # [R, 2, L, H, K, Dh]
        "valid": pool.valid[:rows].clone(),
        "tokens": pool.tokens[:rows].clone(),
        **{f"state.{n}": getattr(st, n)[:rows].clone() for n in ("next_pos", "generated", "finished", "hit_eos")},
    }


def _restore(pool: SlotPool, rows: int, pos: torch.Tensor, at: torch.Tensor, saved: dict[str, torch.Tensor]) -> None:
    """Put `saved` (from `_written`) back in place: same buffers, same addresses."""
    ar = torch.arange(rows, device=pool.kv.device)
    pool.counts[:rows] = saved["counts"]
    pool.seen[:rows] = saved["seen"]
    pool.lp_token[ar, at] = saved["lp_token"]
    pool.lp_top_values[ar, at] = saved["lp_top_values"]
    pool.lp_top_ids[ar, at] = saved["lp_top_ids"]
    pool.logits[:rows] = saved["logits"]
    pool.hidden[ar, pos] = saved["hidden_at_pos"]
    pool.kv[:, :, ar, :, pos] = saved["kv_at_pos"]
    pool.kv[:, :, :rows, :, pool.shape.max_len:] = saved["kv_scratch"].movedim(0, 2)
    pool.valid[:rows] = saved["valid"]
    pool.tokens[:rows] = saved["tokens"]
    for n in ("next_pos", "generated", "finished", "hit_eos"):
        getattr(pool.state, n)[:rows] = saved[f"state.{n}"]


def _relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row (axis 0): max |a - b| / max |b|, in float32 ([R])."""
    a, b = a.float().reshape(len(a), -1), b.float().reshape(len(b), -1)
    scale = b.abs().amax(dim=1).clamp(min=1e-6)
    return (a - b).abs().amax(dim=1) / scale


def _margins(values: torch.Tensor, logits: torch.Tensor, num_candidates: torch.Tensor) -> torch.Tensor:
    """[R]: eager's best minus second-best choice, relative to the best's magnitude (at least 1). Slots with one
    candidate chose from the step's input logits (greedy; sampling draws from them), the others from `values`."""
    two_logits = logits.topk(2, dim=1).values  # [R, 2]
    two_values = values.topk(2, dim=1).values if values.shape[1] > 1 else two_logits
    two = torch.where((num_candidates > 1)[:, None], two_values, two_logits).float()
    return (two[:, 0] - two[:, 1]) / two[:, 0].abs().clamp(min=1.0)


def check_steps(engine: Engine, fast: Callable[[int, int, bool, bool], None], shapes: list[Shape],
                steps: int = CHECK_STEPS) -> StepCheck:
    """The fast step against eager, step by step from the same pool state, at each of `shapes` in turn."""
    model, pool = engine.model, engine.pool
    requests = self_check_requests(engine, new_tokens=steps + 4)[: engine.shape.max_slots]
    tol = tolerance(model.dtype)
    worst: dict[str, float] = {}
    compared = near_ties = failures = 0
    first = None
    with torch.inference_mode():
        for slot, req in enumerate(requests):
            prefill_slot(model, pool, slot, list(req.prompt_ids), req.params, req.eos_ids, req.seed)
        try:
            for n in range(steps):
                rows, k, sampling, extras = shapes[n % len(shapes)]
                st = pool.state
                pos = st.next_pos[:rows].clamp(max=pool.shape.max_len - 1).clone()
                running = (~st.finished[:rows]).tolist()
                chosen_at = st.generated[:rows].clone()
                at = chosen_at.clamp(max=pool.shape.max_len - 1)
                before = _written(pool, rows, pos, at)
                fast(rows, k, sampling, extras)
                got = _written(pool, rows, pos, at)
                _restore(pool, rows, pos, at, before)
                view = pool.view(rows)
                logits_in = (processed_logits(view) if extras else pool.logits[:rows]).clone()
                values = decode_one_token(model, view, k, sampling, extras)
                want = _written(pool, rows, pos, at)
                margins = _margins(values, logits_in, pool.params.num_candidates[:rows]).tolist()
                idx = chosen_at.clamp(max=pool.shape.max_len - 1)[:, None]
                fast_tok = got["tokens"].gather(1, idx)[:, 0].tolist()
                eager_tok = want["tokens"].gather(1, idx)[:, 0].tolist()
                errors = {name: _relative(got[name], want[name]).tolist() for name in
                          ("logits", "hidden_at_pos", "kv_at_pos", "kv_scratch")
                          + (("lp_token", "lp_top_values") if extras else ())}
                exact = {name: (got[name] != want[name]).reshape(rows, -1).any(dim=1).tolist() for name in
                         ("valid", "tokens", "state.next_pos", "state.generated", "state.finished", "state.hit_eos",
                          "counts", "seen")}
                for r in range(rows):
                    if not running[r]:
                        continue
                    if fast_tok[r] != eager_tok[r] and margins[r] <= tol:
                        near_ties += 1
                        continue
                    compared += 1
                    bad = [f"token {fast_tok[r]} != eager {eager_tok[r]} (margin {margins[r]:.3g})"] \
                        if fast_tok[r] != eager_tok[r] else []
                    for name, errs in errors.items():
                        worst[name] = max(worst.get(name, 0.0), errs[r])
                        if not errs[r] <= tol:
                            bad.append(f"{name} differs by {errs[r]:.3g} (relative)")
                    bad += [f"{name} differs" for name, diff in exact.items() if diff[r]]
                    if bad:
                        failures += 1
                        if first is None:
                            first = {"step": n, "shape": [rows, k, sampling, extras], "slot": r,
                                     "mode": requests[r].params.decoding, "why": bad}
        finally:
            pool.state.finished.fill_(True)  # every slot free again
    return StepCheck(failures == 0 and compared > 0, str(model.dtype).replace("torch.", ""), tol, steps, compared,
                     near_ties, failures, {k: round(v, 8) for k, v in worst.items()}, first)


# ---- end to end: a figure, not a gate ----


@dataclass
class Agreement:
    """Every request of the fixed set decoded eager then fast: how many tokens came out the same."""

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
        total += len(a)
        for pos in range(max(len(a), len(b))):
            x = a[pos] if pos < len(a) else None
            y = b[pos] if pos < len(b) else None
            if x != y:
                differing += 1
                if first is None:
                    first = {"request": req.request_id, "mode": req.params.decoding,
                             "do_sample": req.params.do_sample, "position": pos, "eager": x, "fast": y}
    return total, differing, first


def run_agreement(engine: Engine, fast: Callable[[int, int, bool, bool], None], shapes: list[Shape], path: str,
                  new_tokens: int = SELF_CHECK_NEW_TOKENS) -> Agreement:
    """Decode the fixed set eager then fast, both at `shapes`; the engine is left eager (all buckets). A request
    that fails either way raises."""
    requests = self_check_requests(engine, new_tokens)
    try:
        engine.set_step(None, shapes)
        t = time.perf_counter()
        eager_gens = engine.run_to_completion(requests)
        eager_s = time.perf_counter() - t
        _raise_failed("eager", eager_gens)
        engine.set_step(fast, shapes, path)
        t = time.perf_counter()
        fast_gens = engine.run_to_completion(requests)
        fast_s = time.perf_counter() - t
        if engine.step_error is not None:
            raise RuntimeError(f"the fast step failed: {engine.step_error}")
        _raise_failed("fast", fast_gens)
    finally:
        engine.step_error = None
        if not engine.busy:
            engine.set_step(None)
    tokens, differing, first = compare_tokens(requests, [g.tokens for g in eager_gens], [g.tokens for g in fast_gens])
    return Agreement(len(requests), tokens, differing, first, eager_s, fast_s)


def _raise_failed(way: str, gens) -> None:
    failed = [g for g in gens if g.error is not None]
    if failed:
        raise RuntimeError(f"self-check request {failed[0].request_id} failed {way}: {failed[0].error!r}") \
            from failed[0].error


# ---- the switch ----


@dataclass
class FastPathReport:
    """Which decode step serves and why, as data (describe_handle's `decode_step`; the serving layer reports it).

    path: eager | compiled | cuda-graphs | cuda-graph-trees. fallback: None while the fast step serves or was never
    wanted; else why eager serves ("self-check", "error", "fault"). healthy: False once a fault left the device
    unusable (the worker must be restarted).
    """

    setting: str
    device: str
    path: str = "eager"
    reason: str = ""
    fallback: str | None = None
    graphs: str = "none"
    shapes: list[Shape] = field(default_factory=list)
    skipped_shapes: list[Shape] = field(default_factory=list)
    compile_s: float | None = None
    capture_s: float | None = None
    graph_pool_reserved: int = 0  # bytes; after a fallback, what release() could not give back
    graph_pool_allocated: int = 0
    step_check: dict | None = None
    agreement: dict | None = None
    error: str | None = None
    fault: str | None = None
    healthy: bool = True
    fast_step: FastStep | None = field(default=None, repr=False)  # alive while it serves
    on_unhealthy: Callable[[str], None] | None = field(default=None, repr=False)

    @property
    def graph_pool(self) -> tuple[int, int]:
        return self.graph_pool_reserved, self.graph_pool_allocated

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("fast_step", "on_unhealthy")}
        out["shapes"] = [list(s) for s in self.shapes]
        out["skipped_shapes"] = [list(s) for s in self.skipped_shapes]
        out["graph_mib"] = round(self.graph_pool_reserved / 2**20, 1)
        for key in ("compile_s", "capture_s"):
            if out[key] is not None:
                out[key] = round(out[key], 3)
        return out

    def after_fault(self, engine: Engine, probe: Callable[[], bool] | None = None) -> bool:
        """Called after each call of the engine: when the engine dropped the fast step (engine.step_error) and this
        report has not seen it yet, probe the device. Returns whether the worker is healthy."""
        if engine.step_error is None or self.fault is not None:
            return self.healthy
        self.fault = engine.step_error
        self.fallback = "fault"
        self.path = "eager"
        self.healthy = (probe or (lambda: device_healthy(engine.pool.kv.device)))()
        if self.healthy:
            self.reason = f"the fast step failed while serving ({self.fault}); the device is healthy: serving eager"
            logger.error("decode step: %s", self.reason)
        else:
            self.reason = (f"the fast step failed while serving ({self.fault}) and the device is unusable (a sticky "
                           "fault): the worker must be restarted")
            logger.critical("decode step: %s", self.reason)
            if self.on_unhealthy is not None:
                self.on_unhealthy(self.reason)
        return self.healthy


def device_healthy(device: torch.device) -> bool:
    """Whether the device still runs work: a sticky fault fails every later call on its context."""
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            x = torch.ones(4, device=device)
            ok = float((x + x).sum().item()) == 8.0
            torch.cuda.synchronize(device)
            return ok
        return True
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        logger.exception("the device failed its health probe")
        return False


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
    shapes = fast_shapes(engine.shape, max_shapes, fixed=engine.runner.fixed_shapes)
    fast = None
    try:
        fast = (build or FastStep)(engine.model, engine.pool, shapes, graphs=graphs, budget_s=budget_s)
        prep = fast.prepare()
        report.graphs, report.shapes, report.skipped_shapes = prep.graphs, prep.shapes, prep.skipped_shapes
        report.compile_s, report.capture_s = prep.compile_s, prep.capture_s
        report.graph_pool_reserved, report.graph_pool_allocated = prep.graph_pool_reserved, prep.graph_pool_allocated
        check = check_steps(engine, fast, prep.shapes)
        report.step_check = asdict(check)
        agreement = run_agreement(engine, fast, prep.shapes, fast.path)
        report.agreement = {**asdict(agreement), "agreement": round(agreement.agreement, 6)}
        if not check.passed:
            report.fallback = "self-check"
            report.reason = (f"self-check: {check.failures} of {check.compared} slot steps differ from eager beyond "
                             f"{check.tolerance:.3g} (first: {check.first_failure}); serving eager")
            logger.warning("fast decode step (%s) rejected: %s", fast.path, report.reason)
        else:
            engine.set_step(fast, prep.shapes, fast.path)
            report.path = fast.path
            report.reason = (f"self-check passed: {check.compared} slot steps as eager within {check.tolerance:.3g}, "
                             f"{check.near_ties} near ties; end to end {agreement.tokens - agreement.differing_tokens}"
                             f" of {agreement.tokens} tokens as eager (reported, not gating)")
            report.fast_step = fast
            logger.info("decode step: %s (%s)", fast.path, report.reason)
    except Exception as err:  # noqa: BLE001 - whatever went wrong, the eager step serves
        logger.exception("fast decode step unavailable; serving eager")
        report.error = f"{type(err).__name__}: {err}"
        report.fallback = "error"
        report.reason = f"building or checking the fast step failed ({report.error}); serving eager"
        engine.set_step(None)
    if report.fast_step is None:
        report.path = "eager"
        kept = fast.release() if fast is not None and hasattr(fast, "release") else 0
        report.graph_pool_reserved, report.graph_pool_allocated = kept, 0  # booked, not assumed released
        del fast
    elif device.type == "cuda":
        torch.cuda.empty_cache()  # the eager self-check's cached activations; the graphs' pool stays
    return report
