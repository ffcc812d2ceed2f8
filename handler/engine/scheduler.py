"""The engine: requests in, tokens out, scheduled per step over the persistent slot pool.

Continuous batching (as vLLM and TGI schedule, here with contrastive search):

- a request waits in a FIFO queue until a slot is free, then is prefilled into
  it alone (`handler.engine.step.prefill_slot`);
- each decode step runs every live slot at once (`decode_one_token`), in the
  smallest shape bucket that holds the live slots and their largest k;
- every `sync_every` steps the host looks at the new tokens: stop strings,
  deadlines, end-of-text and length end requests (`handler.engine.stopping`),
  a finished request frees its slot at once, and waiting requests take the
  free slots before the next step. A cancelled request frees its slot at the
  next look.

A request never waits for another to finish while a slot is free, and its
tokens do not depend on when it joined, which slot it got, or who else was
running: each slot's row of every computation is independent of the others
(`handler.engine.step`). No TorchServe here: the handler drives `iterate`.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from handler.engine.params import GenerationParams
from handler.engine.pool import CANDIDATE_BUCKETS, PoolShape, SlotPool, candidate_bucket, slot_buckets
from handler.engine.step import decode_one_token, prefill_slot
from handler.engine.stopping import FinishReason, StoppingCriteria
from handler.engine.text import Detokenize, IncrementalText

logger = logging.getLogger(__name__)

Shape = tuple[int, int, bool]  # (slots, candidates, sampling) of one decode step


@dataclass
class Request:
    """One prompt to continue."""

    request_id: str
    prompt_ids: Sequence[int]
    params: GenerationParams
    eos_ids: tuple[int, ...] = ()  # end-of-text ids (may be empty)
    seed: int = 0  # the sampler's seed, resolved by the caller when params.seed is None
    deadline: float | None = None  # time.monotonic() past which the request ends as TIMEOUT
    on_admit: Callable[[], None] | None = None  # called just before the prefill; an exception fails this request
    on_tokens: Callable[[int], None] | None = None  # called with its token count at each look that brings it new
    # tokens; an exception fails this request alone (the tests' fault injection: handler.serving.preparation)


@dataclass
class Generation:
    """A request's progress: its tokens and text so far, its slot, and how it ended."""

    request: Request
    text: IncrementalText
    stopping: StoppingCriteria
    slot: int | None = None
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tokens(self) -> list[int]:
        """The tokens kept so far (cut at a stop string)."""
        return self.text.tokens

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """The engine's load, for metrics."""

    slots: int
    slots_in_use: int
    waiting: int
    generated_tokens: int  # since start
    steps: int  # decode steps since start
    last_time_to_first_token_ms: float | None


class Engine:
    """Continuous batching over a `SlotPool`; see the module docstring."""

    def __init__(self, model, shape: PoolShape, *, detokenize: Detokenize | None = None, sync_every: int = 4,
                 fixed_shapes: bool = False):
        if shape.max_len > model.n_positions:
            raise ValueError(f"max_len {shape.max_len} exceeds the model's {model.n_positions} positions")
        self.model = model
        self.shape = shape
        self.detokenize = detokenize
        self.sync_every = sync_every
        self.fixed_shapes = fixed_shapes  # every step at the full pool shape (one shape, any device)
        self.pool = SlotPool.allocate(model, shape)
        self.buckets = slot_buckets(shape.max_slots)
        self.waiting: deque[Generation] = deque()
        self.running: dict[int, Generation] = {}  # slot -> generation
        self._free = list(range(shape.max_slots))  # a heap: the lowest free slot first keeps the live rows low
        self._by_id: dict[str, Generation] = {}
        self.generated_tokens = 0
        self.steps = 0
        self.last_ttft_ms: float | None = None
        # The decode step: the eager `decode_one_token` over every bucket, unless `set_step` installed another
        # (handler.engine.compiled: compiled, replayed from CUDA graphs) with the shapes it runs.
        self._step: Callable[[int, int, bool], None] | None = None
        self._shapes: tuple[Shape, ...] | None = None
        self.step_path = "eager"
        self.step_error: str | None = None  # why the installed step was dropped while serving, if it was

    # ---- the decode step ----

    def set_step(self, step: Callable[[int, int, bool], None] | None = None,
                 shapes: Iterable[Shape] | None = None, path: str = "eager") -> None:
        """Decode through `step(rows, k, sampling)` (None: the eager `decode_one_token`) at `shapes` only.

        `shapes` (None: every bucket) is a covering set: each step runs in the smallest shape of the set with at
        least the live slots, at least their largest candidate bucket, and the sampler when a slot samples. A
        slot's tokens do not depend on the shape it runs in (handler.engine.step), so a set of a few shapes serves
        every mix of requests; it must hold the full pool's shape (max_slots, candidates, sampling on).
        """
        if self.busy:
            raise RuntimeError("set_step needs an idle engine")
        if shapes is not None:
            shapes = tuple(sorted(set(shapes)))
            full = (self.shape.max_slots, self.shape.candidates, True)
            if not any(_covers(s, full) for s in shapes):
                raise ValueError(f"shapes {shapes} do not cover the full pool {full}")
        self._step = step
        self._shapes = shapes
        self.step_path = path if step is not None else "eager"

    def _run_step(self, rows: int, k: int, sampling: bool, view=None) -> None:
        if self._step is None:
            decode_one_token(self.model, view if view is not None else self.pool.view(rows), k, sampling)
        else:
            self._step(rows, k, sampling)

    def _drop_step(self, err: BaseException) -> None:
        """The installed step failed while serving: back to the eager step for good (and say why)."""
        logger.error("the %s decode step failed (%r): serving with the eager step from now on", self.step_path, err)
        self.step_error = f"{self.step_path}: {type(err).__name__}: {err}"
        self._step, self._shapes, self.step_path = None, None, "eager"

    # ---- requests in ----

    def check(self, request: Request) -> None:
        """Raise ValueError when the pool cannot hold this request (the serving layer checks first)."""
        n, p = len(request.prompt_ids), request.params
        if n < 1:
            raise ValueError("the prompt has no tokens")
        if n + p.max_new_tokens > self.shape.max_len:
            raise ValueError(f"prompt ({n}) + max_new_tokens ({p.max_new_tokens}) exceeds the slots' "
                             f"{self.shape.max_len} positions")
        if p.num_candidates > self.shape.max_top_k:
            raise ValueError(f"top_k {p.num_candidates} exceeds the pool's {self.shape.max_top_k}")
        if p.stop and self.detokenize is None:
            raise ValueError("stop strings need an engine with a detokenizer")

    def submit(self, request: Request) -> Generation:
        """Queue a request; it takes a slot at the next admission."""
        self.check(request)
        if request.request_id in self._by_id:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        text = IncrementalText(self.detokenize, request.params.stop)
        gen = Generation(request, text, StoppingCriteria(text, request.deadline))
        self.waiting.append(gen)
        self._by_id[request.request_id] = gen
        return gen

    def get(self, request_id: str) -> Generation | None:
        return self._by_id.get(request_id)

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Generation | None:
        """End a request now (the client went away); its slot is free for the next admission."""
        gen = self._by_id.get(request_id)
        if gen is None or gen.done:
            return gen
        if gen.slot is None:
            self.waiting.remove(gen)
            self._finish(gen, reason)
        else:
            self._retire([gen], reason)
        return gen

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (its answer has gone out)."""
        gen = self._by_id.get(request_id)
        if gen is not None and gen.done:
            del self._by_id[request_id]

    @property
    def tracked(self) -> int:
        """Requests the engine holds a record of: waiting, running, or finished and not yet forgotten."""
        return len(self._by_id)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> EngineStats:
        return EngineStats(self.shape.max_slots, len(self.running), len(self.waiting), self.generated_tokens,
                           self.steps, self.last_ttft_ms)

    # ---- the loop ----

    def iterate(self, until: float | None = None, *, return_on_events: bool = True) -> list[Generation]:
        """Admit, decode and look, until `until` (time.monotonic) or, with `return_on_events`, until a
        request finished or got its first tokens; returns the generations that changed (new tokens or done)."""
        changed: dict[str, Generation] = {}
        self._admit(changed)
        while self.running:
            events = self._decode_and_look(changed)
            self._admit(changed)
            if (return_on_events and events) or (until is not None and time.monotonic() >= until):
                break
        return list(changed.values())

    def generate(self, requests: Iterable[Request]) -> list[Generation]:
        """Submit `requests` and run until every one of them is done; in order."""
        gens = [self.submit(r) for r in requests]
        while not all(g.done for g in gens):
            self.iterate(return_on_events=False)
        for g in gens:
            self.forget(g.request_id)
        return gens

    def warm_up(self, prompt_len: int, steps: int = 32) -> float:
        """Run every step shape once, then time the slowest step; returns its ms (the fastest look's).

        First every (slots, candidates, sampling) bucket runs one step on the idle pool, so that no request
        pays a shape's first-call cost (kernel selection; compilation or graph capture where enabled). Then
        every slot takes a prompt of `prompt_len` tokens, one sampling and the others contrastive with the
        pool's largest k, and `steps` steps run after one untimed look: the full pool, the largest candidate
        bucket, with the sampler, the slowest step this worker takes. Of the looks (each `sync_every`
        steps) the fastest counts: what a step takes at full load when nothing else competes for the
        machine. It sizes the requests refused up front as unable to finish before their deadline, which
        should refuse only what cannot finish; a stall of the machine must not refuse what could.
        """
        if self.busy:
            raise RuntimeError("warm_up needs an idle engine")
        with torch.inference_mode():
            for rows, k, sampling in self.step_shapes():
                self._run_step(rows, k, sampling)
        untimed = self.sync_every
        steps = max(self.sync_every, min(steps, self.shape.max_len - 1 - untimed))
        prompt_len = max(1, min(prompt_len, self.shape.max_len - steps - untimed))
        k = self.shape.max_top_k
        new = steps + untimed
        contrastive = GenerationParams(max_new_tokens=new, top_k=k, penalty_alpha=0.6) if k >= 2 \
            else GenerationParams(decoding="greedy", max_new_tokens=new)
        sampled = GenerationParams(decoding="sample", do_sample=True, max_new_tokens=new)
        vocab = self.model.vocab_size
        gens = [self.submit(Request(f"warm-up-{i}", [1 + (i + j) % (vocab - 1) for j in range(prompt_len)],
                                    sampled if i == 0 else contrastive, seed=i))
                for i in range(self.shape.max_slots)]
        self._admit({})
        self._decode_and_look({})
        looks = []
        while self.running:
            self._sync_device()
            start = time.perf_counter()
            self._decode_and_look({})
            self._sync_device()
            looks.append(1000 * (time.perf_counter() - start) / self.sync_every)
        failed = [g for g in gens if g.finish_reason is FinishReason.ERROR]
        for g in gens:
            self.forget(g.request_id)
        if failed:
            raise RuntimeError(f"warm-up failed: {failed[0].error!r}") from failed[0].error
        return min(looks)

    def step_shapes(self) -> list[tuple[int, int, bool]]:
        """Every (slots, candidates, sampling) a decode step of this engine may run with."""
        if self._shapes is not None:
            return list(self._shapes)
        if self.fixed_shapes:
            return [(self.shape.max_slots, self.shape.candidates, True)]
        ks = [k for k in CANDIDATE_BUCKETS if k <= self.shape.candidates]
        return [(rows, k, sampling) for rows in self.buckets for k in ks for sampling in (False, True)]

    def _sync_device(self) -> None:
        if self.pool.kv.device.type == "cuda":
            torch.cuda.synchronize(self.pool.kv.device)

    # ---- inside ----

    def _admit(self, changed: dict[str, Generation]) -> None:
        """Waiting requests into free slots, in arrival order, each prefilled alone."""
        while self.waiting and self._free:
            gen = self.waiting.popleft()
            slot = heapq.heappop(self._free)
            req = gen.request
            try:
                if req.on_admit is not None:
                    req.on_admit()
                with torch.inference_mode():
                    prefill_slot(self.model, self.pool, slot, list(req.prompt_ids), req.params, req.eos_ids, req.seed)
            except Exception as err:  # noqa: BLE001 - this request fails alone; the slot stays free
                self.pool.state.finished[slot] = True
                heapq.heappush(self._free, slot)
                gen.error = err
                self._finish(gen, FinishReason.ERROR)
                changed[gen.request_id] = gen
                continue
            gen.slot = slot
            gen.admitted_at = time.monotonic()
            self.running[slot] = gen

    def _shape(self) -> tuple[int, int, bool]:
        """(slots, candidates, sampling) of the next steps: the smallest shape that holds the live slots."""
        if self.fixed_shapes:
            need = (self.shape.max_slots, self.shape.candidates, True)
        else:
            top = max(self.running) + 1
            rows = next(b for b in self.buckets if b >= top)
            params = [g.request.params for g in self.running.values()]
            k = candidate_bucket(max(p.num_candidates for p in params))
            need = (rows, k, any(p.decoding == "sample" for p in params))
        if self._shapes is None:
            return need
        return min(s for s in self._shapes if _covers(s, need))

    def _decode_and_look(self, changed: dict[str, Generation]) -> bool:
        """`sync_every` steps, then one look at the tokens; True when a request finished or got its first tokens."""
        rows, k, sampling = self._shape()
        view = self.pool.view(rows) if self._step is None else None
        try:
            with torch.inference_mode():
                for _ in range(self.sync_every):
                    self._run_step(rows, k, sampling, view)
                self.steps += self.sync_every
                return self._look(rows, changed)
        except Exception as err:  # noqa: BLE001 - the step is shared: every live request fails with it
            logger.exception("decode step failed with %d live requests", len(self.running))
            if self._step is not None:
                self._drop_step(err)
            gens = list(self.running.values())
            for gen in gens:
                gen.error = err
                changed[gen.request_id] = gen
            self._retire(gens, FinishReason.ERROR)
            return True

    def _look(self, rows: int, changed: dict[str, Generation]) -> bool:
        """Bring the new tokens to the host, apply the stopping criteria, retire what finished."""
        st = self.pool.state
        generated = st.generated[:rows].tolist()
        finished = st.finished[:rows].tolist()
        hit_eos = st.hit_eos[:rows].tolist()
        have = {slot: len(g.tokens) for slot, g in self.running.items()}
        lo = min(have.values())
        hi = max(generated[slot] for slot in self.running)
        block = self.pool.tokens[:rows, lo:hi].tolist()
        now = time.monotonic()
        ended: dict[FinishReason, list[Generation]] = {}
        events = False
        for slot, gen in list(self.running.items()):
            new = block[slot][have[slot] - lo: generated[slot] - lo]
            if new:
                changed[gen.request_id] = gen
                self.generated_tokens += len(new)
                if gen.first_token_at is None:
                    gen.first_token_at = now
                    self.last_ttft_ms = 1000 * (now - gen.submitted_at)
                    events = True
            device_reason = None
            if finished[slot]:
                device_reason = FinishReason.EOS if hit_eos[slot] else FinishReason.LENGTH
            reason, keep = gen.stopping.check(new, device_reason, now)
            if reason is None and new and gen.request.on_tokens is not None:
                try:
                    gen.request.on_tokens(len(gen.tokens))
                except Exception as err:  # noqa: BLE001 - this request fails alone, its neighbours go on
                    gen.error, reason = err, FinishReason.ERROR
            if reason is not None:
                ended.setdefault(reason, []).append(gen)
                changed[gen.request_id] = gen
        for reason, gens in ended.items():
            self._retire(gens, reason)
            events = True
        return events

    def _retire(self, gens: list[Generation], reason: FinishReason) -> None:
        """End these running generations and free their slots (the device stops changing them)."""
        slots = [g.slot for g in gens]
        if slots:
            self.pool.state.finished[torch.tensor(slots, device=self.pool.state.finished.device)] = True
        for gen in gens:
            del self.running[gen.slot]
            heapq.heappush(self._free, gen.slot)
            self._finish(gen, reason)

    def _finish(self, gen: Generation, reason: FinishReason) -> None:
        gen.finish_reason = reason
        gen.finished_at = time.monotonic()


def _covers(shape: Shape, need: Shape) -> bool:
    """Whether a step of `shape` serves what `need` asks for: as many slots and candidates or more, the sampler."""
    return shape[0] >= need[0] and shape[1] >= need[1] and (shape[2] or not need[2])


def generate(model, requests: Sequence[Request], *, detokenize: Detokenize | None = None, sync_every: int = 4,
             max_slots: int | None = None) -> list[Generation]:
    """Run `requests` to completion on a pool sized for them (tests, benchmarks, warm-up): in order."""
    if not requests:
        return []
    shape = PoolShape(
        max_slots=max_slots or len(requests),
        max_len=max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests),
        max_top_k=max(r.params.num_candidates for r in requests),
    )
    return Engine(model, shape, detokenize=detokenize, sync_every=sync_every).generate(requests)
