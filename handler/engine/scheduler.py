"""The scheduler: which requests take a slot, which slots step, and which requests finish. No model, no tensors.

In the shape of vLLM's v1 scheduler, with contrastive search's slot pool:

- `submit` queues a request (FIFO); `schedule()` puts waiting requests into free
  slots, lowest slot first (which keeps the live rows low), in arrival order, and
  says which slots the device must stop (`released`: requests that ended since);
- the runner (`handler.engine.runner`) prefills the admitted requests and reports
  the ones whose prefill failed (`prefilled`); `decode_batch()` is the live slots
  the next steps run over, with what they need (candidates, the sampler) and the
  tokens the host already has of each;
- after the runner's steps, `update(step_output)` takes the new tokens and the
  device's own reasons (end-of-text, `max_new_tokens`) and decides, in one place,
  which requests end and why (`handler.engine.stopping`: stop strings and
  deadlines too; a failed step fails every live request); a request that ends
  frees its slot at once for the next `schedule()`. `cancel` ends one from
  outside (the client went away).

Everything here is plain data and Python, so the scheduler is tested with
hand-made step outputs and no model (tests/engine/test_scheduler_pure.py).
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from handler.engine.logprobs import TokenLogprob
from handler.engine.params import PARAM, GenerationParams, InvalidParameter
from handler.engine.stopping import FinishReason, StoppingCriteria
from handler.engine.text import Detokenize, IncrementalText

Shape = tuple[int, int, bool, bool]  # (slots, candidates, sampling, extras) of one decode step


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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token of `tokens` (params.logprobs)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # one per prompt token, [0] None;
    # set at the prefill (params.prompt_logprobs)

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


@dataclass(frozen=True)
class SchedulerOutput:
    """What the runner does before the next steps: stop the released slots, then prefill the admitted."""

    released: tuple[int, ...]  # slots whose requests ended since the last output: the device stops them
    admitted: tuple[tuple[int, Generation], ...]  # (slot, generation) to prefill, in arrival order


@dataclass(frozen=True)
class DecodeBatch:
    """The live slots of the next steps and what they need."""

    slots: tuple[int, ...]  # ascending
    candidates: int  # the largest number of candidates a live request scores per step
    sampling: bool  # a live request samples (decoding="sample")
    known: dict[int, int]  # slot -> tokens the host already has of it
    released: tuple[int, ...] = ()  # slots whose requests ended since the last output: the device stops them
    extras: bool = False  # a live request asks for logits processing or logprobs (the step's `extras` flag)
    logprobs: dict[int, int] = field(default_factory=dict)  # slot -> alternatives asked, for slots with logprobs

    @property
    def rows(self) -> int:
        """Rows a step must cover: up to the highest live slot."""
        return self.slots[-1] + 1


@dataclass(frozen=True)
class StepOutput:
    """What the device did in some steps, as the host sees it (the runner's answer to a DecodeBatch)."""

    new_tokens: dict[int, list[int]]  # slot -> tokens generated since the host last looked
    device_finished: dict[int, FinishReason]  # slot -> EOS or LENGTH, for slots the device ended
    now: float  # time.monotonic() when the host looked
    steps: int = 0  # decode steps run
    error: BaseException | None = None  # the steps failed: every live request fails with this
    new_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)  # slot -> one per new token


class Scheduler:
    """Admission, slots and stopping over a pool of `max_slots` slots of `max_len` positions (module docstring)."""

    def __init__(self, max_slots: int, max_len: int, max_top_k: int, *, detokenize: Detokenize | None = None,
                 vocab_size: int | None = None):
        self.max_slots, self.max_len, self.max_top_k = max_slots, max_len, max_top_k
        self.vocab_size = vocab_size  # logit_bias ids are checked against it (None: not checked)
        self.detokenize = detokenize
        self.waiting: deque[Generation] = deque()
        self.running: dict[int, Generation] = {}  # slot -> generation
        self.free = list(range(max_slots))  # a heap: the lowest free slot first keeps the live rows low
        self._released: list[int] = []
        self._by_id: dict[str, Generation] = {}
        self.generated_tokens = 0
        self.steps = 0
        self.last_ttft_ms: float | None = None

    # ---- requests in and out ----

    def require_fits(self, request: Request) -> None:
        """ValueError when the pool cannot hold this request (the serving layer's admission refuses it first);
        InvalidParameter("logit_bias") for a token id outside the vocabulary."""
        n, p = len(request.prompt_ids), request.params
        if self.vocab_size is not None:
            outside = [token for token, _ in p.logit_bias if token >= self.vocab_size]
            if outside:
                raise InvalidParameter("logit_bias", PARAM, f" token id {outside[0]} is outside the vocabulary "
                                       f"(ids 0 to {self.vocab_size - 1}, size {self.vocab_size})")
        if n < 1:
            raise ValueError("the prompt has no tokens")
        if n + p.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({n}) + max_new_tokens ({p.max_new_tokens}) exceeds the slots' "
                             f"{self.max_len} positions")
        if p.num_candidates > self.max_top_k:
            raise ValueError(f"top_k {p.num_candidates} exceeds the pool's {self.max_top_k}")
        if p.stop and self.detokenize is None:
            raise ValueError("stop strings need an engine with a detokenizer")

    def submit(self, request: Request) -> Generation:
        """Queue a request; it takes a slot at the next `schedule()`."""
        self.require_fits(request)
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
        """Requests held on record: waiting, running, or finished and not yet forgotten."""
        return len(self._by_id)

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> EngineStats:
        return EngineStats(self.max_slots, len(self.running), len(self.waiting), self.generated_tokens,
                           self.steps, self.last_ttft_ms)

    # ---- scheduling ----

    def schedule(self) -> SchedulerOutput:
        """Waiting requests into free slots, in arrival order; and the slots released since the last output
        (a slot may be released and admitted again in one output: the runner stops it before the prefill)."""
        released = self.take_released()
        admitted = []
        while self.waiting and self.free:
            gen = self.waiting.popleft()
            slot = heapq.heappop(self.free)
            gen.slot = slot
            self.running[slot] = gen
            admitted.append((slot, gen))
        return SchedulerOutput(released, tuple(admitted))

    def prefilled(self, output: SchedulerOutput, failed: dict[int, BaseException],
                  now: float | None = None) -> list[Generation]:
        """The runner prefilled `output`'s admitted requests; those of `failed` (slot -> error) fail alone and
        their slots are free again (the runner stopped them); those with max_new_tokens=0 (scoring the prompt)
        end with LENGTH and free their slots. Returns the generations that ended."""
        now = time.monotonic() if now is None else now
        out = []
        for slot, gen in output.admitted:
            if slot in failed:
                del self.running[slot]
                heapq.heappush(self.free, slot)
                gen.slot, gen.error = None, failed[slot]
                self._finish(gen, FinishReason.ERROR)
                out.append(gen)
            else:
                gen.admitted_at = now
                if gen.request.params.max_new_tokens == 0:
                    self._retire([gen], FinishReason.LENGTH)
                    out.append(gen)
        return out

    def decode_batch(self) -> DecodeBatch | None:
        """The live slots of the next steps (None: nothing runs)."""
        if not self.running:
            return None
        params = [g.request.params for g in self.running.values()]
        return DecodeBatch(tuple(sorted(self.running)), max(p.num_candidates for p in params),
                           any(p.decoding == "sample" for p in params),
                           {slot: len(g.tokens) for slot, g in self.running.items()}, self.take_released(),
                           any(p.extras for p in params),
                           {slot: g.request.params.logprobs for slot, g in self.running.items()
                            if g.request.params.logprobs is not None})

    def update(self, step: StepOutput) -> tuple[list[Generation], bool]:
        """Take the device's new tokens and decide which requests end. Returns (the generations that changed:
        new tokens or done; whether an event happened: a request finished or got its first tokens)."""
        self.steps += step.steps
        if step.error is not None:  # the step is shared: every live request fails with it
            gens = list(self.running.values())
            for gen in gens:
                gen.error = step.error
            self._retire(gens, FinishReason.ERROR)
            return gens, True
        changed: dict[str, Generation] = {}
        ended: dict[FinishReason, list[Generation]] = {}
        events = False
        for slot, gen in list(self.running.items()):
            new = step.new_tokens.get(slot, [])
            if new:
                changed[gen.request_id] = gen
                self.generated_tokens += len(new)
                if gen.first_token_at is None:
                    gen.first_token_at = step.now
                    self.last_ttft_ms = 1000 * (step.now - gen.submitted_at)
                    events = True
            gen.logprobs.extend(step.new_logprobs.get(slot, ()))
            reason, _keep = gen.stopping.reason_to_stop(new, step.device_finished.get(slot), step.now)
            del gen.logprobs[len(gen.tokens):]  # cut at a stop string as the tokens are
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
        return list(changed.values()), events

    # ---- inside ----

    def take_released(self) -> tuple[int, ...]:
        """The slots released since the last output (each is handed out once)."""
        released, self._released = tuple(self._released), []
        return released

    def _retire(self, gens: list[Generation], reason: FinishReason) -> None:
        """End these running generations and free their slots (released: the device stops changing them)."""
        for gen in gens:
            del self.running[gen.slot]
            heapq.heappush(self.free, gen.slot)
            self._released.append(gen.slot)
            self._finish(gen, reason)

    def _finish(self, gen: Generation, reason: FinishReason) -> None:
        gen.finish_reason = reason
        gen.finished_at = time.monotonic()
