"""The engine: requests in, tokens out; the scheduler's decisions carried out by the runner, step by step.

Continuous batching (as vLLM and TGI schedule, here with contrastive search):

- a request waits in a FIFO queue until a slot is free, then is prefilled into
  it alone (`handler.engine.scheduler.Scheduler.schedule`, `handler.engine.runner.Runner.prefill`);
- each decode step runs every live slot at once (`decode_one_token`), in the
  smallest shape bucket that holds the live slots and their largest k;
- every `sync_every` steps the host looks at the new tokens: stop strings,
  deadlines, end-of-text and length end requests (`Scheduler.update`, through
  `handler.engine.stopping`), a finished request frees its slot at once, and
  waiting requests take the free slots before the next step. A cancelled
  request frees its slot at the next look.

A request never waits for another to finish while a slot is free, and its
tokens do not depend on when it joined, which slot it got, or who else was
running: each slot's row of every computation is independent of the others
(`handler.engine.step`). No TorchServe here: the handler drives `iterate`.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

from handler.engine.params import GenerationParams
from handler.engine.pool import PoolShape
from handler.engine.runner import Runner
from handler.engine.scheduler import EngineStats, Generation, Request, Scheduler, Shape
from handler.engine.stopping import FinishReason
from handler.engine.text import Detokenize


class Engine:
    """A `Scheduler` and a `Runner` over one `SlotPool`; see the module docstring."""

    def __init__(self, model, shape: PoolShape, *, detokenize: Detokenize | None = None, sync_every: int = 4,
                 fixed_shapes: bool = False):
        self.runner = Runner(model, shape, sync_every=sync_every, fixed_shapes=fixed_shapes)
        self.scheduler = Scheduler(shape.max_slots, shape.max_len, shape.max_top_k, detokenize=detokenize,
                                   vocab_size=model.vocab_size)
        self.model, self.shape, self.pool = model, shape, self.runner.pool
        self.sync_every = sync_every

    # ---- requests in and out (the scheduler's) ----

    def submit(self, request: Request) -> Generation:
        """Queue a request; it takes a slot at the next admission. ValueError when the pool cannot hold it;
        InvalidParameter("logit_bias") for a token id outside the model's vocabulary."""
        return self.scheduler.submit(request)

    def get(self, request_id: str) -> Generation | None:
        return self.scheduler.get(request_id)

    def cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Generation | None:
        """End a request now (the client went away); its slot is free for the next admission, and the device
        stops changing it now."""
        gen = self.scheduler.cancel(request_id, reason)
        self.runner.release(self.scheduler.take_released())
        return gen

    def forget(self, request_id: str) -> None:
        """Drop a finished request's record (its answer has gone out)."""
        self.scheduler.forget(request_id)

    @property
    def tracked(self) -> int:
        """Requests the engine holds a record of: waiting, running, or finished and not yet forgotten."""
        return self.scheduler.tracked

    @property
    def busy(self) -> bool:
        return self.scheduler.busy

    @property
    def running(self) -> dict[int, Generation]:
        return self.scheduler.running

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    # ---- the decode step (the runner's) ----

    def set_step(self, step: Callable[[int, int, bool], None] | None = None,
                 shapes: Iterable[Shape] | None = None, path: str = "eager") -> None:
        """Decode through `step` at `shapes` (`Runner.set_step`); the engine must be idle."""
        if self.busy:
            raise RuntimeError("set_step needs an idle engine")
        self.runner.set_step(step, shapes, path)

    def step_shapes(self) -> list[Shape]:
        return self.runner.step_shapes()

    @property
    def step_path(self) -> str:
        return self.runner.step_path

    @property
    def step_error(self) -> str | None:
        return self.runner.step_error

    @step_error.setter
    def step_error(self, value: str | None) -> None:
        self.runner.step_error = value

    # ---- the loop ----

    def iterate(self, until: float | None = None, *, return_on_events: bool = True) -> list[Generation]:
        """Admit, decode and look, until `until` (time.monotonic) or, with `return_on_events`, until a
        request finished or got its first tokens; returns the generations that changed (new tokens or done)."""
        changed: dict[str, Generation] = {}
        events = self._admit(changed)
        while self.scheduler.running and not (return_on_events and events):
            events = self._decode_and_look(changed)
            events = self._admit(changed) or events
            if until is not None and time.monotonic() >= until:
                break
        return list(changed.values())

    def run_to_completion(self, requests: Iterable[Request]) -> list[Generation]:
        """Submit `requests` and run until every one of them is done; in order."""
        gens = [self.submit(r) for r in requests]
        while not all(g.done for g in gens):
            self.iterate(return_on_events=False)
        for g in gens:
            self.forget(g.request_id)
        return gens

    def warm_up(self, prompt_len: int, steps: int = 32) -> float:
        """Run every step shape once, then time the slowest step; returns its ms (the fastest look's).

        First every (slots, candidates, sampling) bucket runs one step on the idle pool (`Runner.run_every_shape`),
        so that no request pays a shape's first-call cost. Then every slot takes a prompt of `prompt_len` tokens,
        one sampling and the others contrastive with the pool's largest k, and `steps` steps run after one untimed
        look: the full pool, the largest candidate bucket, with the sampler, the slowest step this worker takes.
        Of the looks (each `sync_every` steps) the fastest counts: what a step takes at full load when nothing
        else competes for the machine. It sizes the requests refused up front as unable to finish before their
        deadline, which should refuse only what cannot finish; a stall of the machine must not refuse what could.
        """
        if self.busy:
            raise RuntimeError("warm_up needs an idle engine")
        self.runner.run_every_shape()
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
        while self.scheduler.running:
            self.runner.sync_device()
            start = time.perf_counter()
            self._decode_and_look({})
            self.runner.sync_device()
            looks.append(1000 * (time.perf_counter() - start) / self.sync_every)
        failed = [g for g in gens if g.finish_reason is FinishReason.ERROR]
        for g in gens:
            self.forget(g.request_id)
        if failed:
            raise RuntimeError(f"warm-up failed: {failed[0].error!r}") from failed[0].error
        return min(looks)

    # ---- inside ----

    def _admit(self, changed: dict[str, Generation]) -> bool:
        """Waiting requests into free slots, in arrival order, each prefilled alone; a slot whose request ended at
        its prefill (failed, or max_new_tokens=0) takes the next waiting request at once. True when one ended."""
        ended_any = False
        while True:
            output = self.scheduler.schedule()
            failed = self.runner.prefill(output)
            ended = self.scheduler.prefilled(output, failed)
            for gen in ended:
                changed[gen.request_id] = gen
            ended_any = ended_any or bool(ended)
            if not ended or not (self.scheduler.waiting and self.scheduler.free):
                return ended_any

    def _decode_and_look(self, changed: dict[str, Generation]) -> bool:
        """`sync_every` steps, then one look at the tokens; True when a request finished or got its first tokens."""
        batch = self.scheduler.decode_batch()
        gens, events = self.scheduler.update(self.runner.decode(batch))
        for gen in gens:
            changed[gen.request_id] = gen
        return events


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
    return Engine(model, shape, detokenize=detokenize, sync_every=sync_every).run_to_completion(requests)
