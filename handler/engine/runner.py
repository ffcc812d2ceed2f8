"""The runner: the model, the slot pool and the decode step, driven by the scheduler's plain outputs.

It owns everything with tensors in it (`handler.engine.scheduler` owns none):

- the pool (`SlotPool`, allocated once) and the model;
- `prefill(output)`: the released slots stopped on the device, then each admitted
  request prefilled into its slot alone (`handler.engine.step.prefill_slot`); a
  request whose prefill (or its `on_admit` hook) raises fails alone;
- `decode(batch)`: `sync_every` steps over the live slots, in the smallest shape
  that holds them (`step_shapes`), then one look: the new tokens (and their
  logprobs, for the requests that ask), and the slots the device ended
  (end-of-text, `max_new_tokens`), brought to the host as a `StepOutput` for the
  scheduler to decide on;
- the decode step itself: the eager `decode_one_token` over every bucket, or the
  one `set_step` installed (`handler.engine.compiled`: compiled, replayed from CUDA
  graphs) at the shapes it runs (a step no installed shape covers runs eager);
  a step that fails while serving is dropped for the eager one, for good
  (`step_error` says why);
- `run_every_shape()`: the first half of warm-up (each shape's first-call cost paid
  before any request), and `sync_device()` for timing the second.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import torch

from handler.engine.logprobs import token_logprobs
from handler.engine.pool import CANDIDATE_BUCKETS, PoolShape, SlotPool, candidate_bucket, slot_buckets
from handler.engine.scheduler import DecodeBatch, SchedulerOutput, Shape, StepOutput
from handler.engine.step import decode_one_token, prefill_slot
from handler.engine.stopping import FinishReason

logger = logging.getLogger(__name__)


class Runner:
    """The device half of the engine (module docstring)."""

    def __init__(self, model, shape: PoolShape, *, sync_every: int = 4, fixed_shapes: bool = False):
        if shape.max_len > model.n_positions:
            raise ValueError(f"max_len {shape.max_len} exceeds the model's {model.n_positions} positions")
        self.model = model
        self.shape = shape
        self.sync_every = sync_every
        self.fixed_shapes = fixed_shapes  # every step at the full pool shape, extras on (one shape, any device)
        self.pool = SlotPool.allocate(model, shape)
        self.buckets = slot_buckets(shape.max_slots)
        self._step: Callable[[int, int, bool, bool], None] | None = None
        self._shapes: tuple[Shape, ...] | None = None
        self.step_path = "eager"
        self.step_error: str | None = None  # why the installed step was dropped while serving, if it was

    # ---- the decode step ----

    def set_step(self, step: Callable[[int, int, bool, bool], None] | None = None,
                 shapes: Iterable[Shape] | None = None, path: str = "eager") -> None:
        """Decode through `step(rows, k, sampling, extras)` (None: the eager `decode_one_token`) at `shapes` only.

        `shapes` (None: every bucket) is a covering set: each step runs in the smallest shape of the set with at
        least the live slots, at least their largest candidate bucket, the sampler when a slot samples, and the
        extras when a slot asks for logits processing or logprobs. A slot's tokens do not depend on the shape it
        runs in (handler.engine.step), so a set of a few shapes serves every mix of requests; it must hold the
        full pool's plain shape (max_slots, candidates, sampling on, extras off). A step that needs the extras
        and finds no shape of the set with them runs eager, in the shape it needs.
        """
        if shapes is not None:
            shapes = tuple(sorted(set(shapes)))
            full = (self.shape.max_slots, self.shape.candidates, True, False)
            if not any(covers(s, full) for s in shapes):
                raise ValueError(f"shapes {shapes} do not cover the full pool {full}")
        self._step = step
        self._shapes = shapes
        self.step_path = path if step is not None else "eager"

    def step_shapes(self) -> list[Shape]:
        """Every (slots, candidates, sampling, extras) a decode step of this engine may run with."""
        if self._shapes is not None:
            return list(self._shapes)
        if self.fixed_shapes:
            return [(self.shape.max_slots, self.shape.candidates, True, True)]
        ks = [k for k in CANDIDATE_BUCKETS if k <= self.shape.candidates]
        return [(rows, k, sampling, extras) for rows in self.buckets for k in ks for sampling in (False, True)
                for extras in (False, True)]

    def shape_for(self, batch: DecodeBatch) -> Shape:
        """(slots, candidates, sampling, extras) of the next steps: the smallest shape that holds the live slots
        (the one they need when no shape of the installed set covers it: eager runs it)."""
        if self.fixed_shapes:  # one shape, the extras on: the same bits whatever the neighbours ask for
            need = (self.shape.max_slots, self.shape.candidates, True, True)
        else:
            rows = next(b for b in self.buckets if b >= batch.rows)
            need = (rows, candidate_bucket(batch.candidates), batch.sampling, batch.extras)
        if self._shapes is None:
            return need
        return min((s for s in self._shapes if covers(s, need)), default=need)

    def _installed(self, shape: Shape) -> bool:
        """Whether the installed step runs `shape` (else the eager one does)."""
        return self._step is not None and (self._shapes is None or shape in self._shapes)

    def _run_step(self, shape: Shape, view=None) -> None:
        if not self._installed(shape):
            rows, k, sampling, extras = shape
            decode_one_token(self.model, view if view is not None else self.pool.view(rows), k, sampling, extras)
        else:
            self._step(*shape)

    def _drop_step(self, err: BaseException) -> None:
        """The installed step failed while serving: back to the eager step for good (and say why)."""
        logger.error("the %s decode step failed (%r): serving with the eager step from now on", self.step_path, err)
        self.step_error = f"{self.step_path}: {type(err).__name__}: {err}"
        self._step, self._shapes, self.step_path = None, None, "eager"

    # ---- what the scheduler decided ----

    def prefill(self, output: SchedulerOutput) -> dict[int, BaseException]:
        """Stop the released slots, then prefill each admitted request into its slot; returns the slots whose
        prefill failed, with the error (those requests fail alone; their slots stay stopped)."""
        self.release(output.released)
        failed = {}
        for slot, gen in output.admitted:
            req = gen.request
            try:
                if req.on_admit is not None:
                    req.on_admit()
                with torch.inference_mode():
                    gen.prompt_logprobs = prefill_slot(self.model, self.pool, slot, list(req.prompt_ids), req.params,
                                                       req.eos_ids, req.seed)
            except Exception as err:  # noqa: BLE001 - this request fails alone; the slot stays free
                self.pool.state.finished[slot] = True
                failed[slot] = err
        return failed

    def release(self, slots: Iterable[int]) -> None:
        """The device stops changing these slots (their requests ended)."""
        slots = list(slots)
        if slots:
            self.pool.state.finished[torch.tensor(slots, device=self.pool.state.finished.device)] = True

    def decode(self, batch: DecodeBatch) -> StepOutput:
        """`sync_every` steps over the live slots, then one look at what they produced."""
        self.release(batch.released)
        shape = self.shape_for(batch)
        rows = shape[0]
        view = None if self._installed(shape) else self.pool.view(rows)
        try:
            with torch.inference_mode():
                for _ in range(self.sync_every):
                    self._run_step(shape, view)
                return self._look(rows, batch)
        except Exception as err:  # noqa: BLE001 - the step is shared: every live request fails with it
            logger.exception("decode step failed with %d live requests", len(batch.slots))
            if self._step is not None:
                self._drop_step(err)
            return StepOutput({}, {}, time.monotonic(), steps=0, error=err)

    def _look(self, rows: int, batch: DecodeBatch) -> StepOutput:
        """Bring the live slots' new tokens and the device's finish flags to the host."""
        st = self.pool.state
        generated = st.generated[:rows].tolist()
        finished = st.finished[:rows].tolist()
        hit_eos = st.hit_eos[:rows].tolist()
        lo = min(batch.known.values())
        hi = max(generated[slot] for slot in batch.slots)
        block = self.pool.tokens[:rows, lo:hi].tolist()
        new = {slot: block[slot][batch.known[slot] - lo: generated[slot] - lo] for slot in batch.slots}
        device = {slot: FinishReason.EOS if hit_eos[slot] else FinishReason.LENGTH
                  for slot in batch.slots if finished[slot]}
        new_logprobs = {}
        if batch.logprobs:
            width = max(batch.logprobs.values())
            chosen = self.pool.lp_token[:rows, lo:hi].tolist()
            top_ids = self.pool.lp_top_ids[:rows, lo:hi, :width].tolist()
            top_values = self.pool.lp_top_values[:rows, lo:hi, :width].tolist()
            for slot, n in batch.logprobs.items():
                a, b = batch.known[slot] - lo, generated[slot] - lo
                new_logprobs[slot] = token_logprobs(new[slot], chosen[slot][a:b], top_ids[slot][a:b],
                                                    top_values[slot][a:b], n)
        return StepOutput(new, device, time.monotonic(), self.sync_every, new_logprobs=new_logprobs)

    # ---- warm-up ----

    def run_every_shape(self) -> None:
        """One step of every shape on the idle pool, so that no request pays a shape's first-call cost (kernel
        selection; compilation or graph capture where enabled)."""
        with torch.inference_mode():
            for shape in self.step_shapes():
                self._run_step(shape)

    def sync_device(self) -> None:
        if self.pool.kv.device.type == "cuda":
            torch.cuda.synchronize(self.pool.kv.device)


def covers(shape: Shape, need: Shape) -> bool:
    """Whether a step of `shape` serves what `need` asks for: as many slots and candidates or more, the sampler,
    the extras."""
    return shape[0] >= need[0] and shape[1] >= need[1] and (shape[2] or not need[2]) and (shape[3] or not need[3])
