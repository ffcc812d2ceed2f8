"""How TorchServe's calls drive the engine: continuous batching, or each batch run to completion.

Continuous batching (`continuousBatching: true` in model-config.yaml, the
default here). TorchServe's frontend keeps up to `batchSize` jobs open and
calls the worker again and again with all of them plus new arrivals; cached
jobs come back with their headers only. Each call:

1. new jobs are prepared and submitted; open jobs the frontend no longer sends
   are cancelled (their client went away: the frontend drops a job whose
   connection closed), which frees their slots;
2. the engine decodes for about `iteration_ms` (or less, as soon as a request
   finishes or gets its first tokens);
3. every job gets an answer: a finished one its final answer (the job closes);
   a running one a chunk (streamed: its new settled text; otherwise nothing)
   with `ts_stream_next: true`, which keeps it open. A job whose first answer is
   final gets a plain response with its own status; a job that already got a
   chunk has its status line sent, so its final answer ends the chunked body.

Run to completion (`continuousBatching: false`): each TorchServe batch is
submitted at once and decoded until every request of it has finished, with
streamed text sent as intermediate responses: the behaviour before continuous
batching, kept for comparison (`benchmarks/load.py`) and for frontends that
cannot keep jobs open.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ts.handler_utils.utils import send_intermediate_predict_response

from handler.engine.scheduler import Engine, Generation
from handler.engine.stopping import FinishReason
from handler.serving import responses
from handler.serving.errors import RequestError, is_out_of_memory
from handler.serving.preparation import Preparation
from handler.serving.request import header
from handler.serving.routes import URL_PATH_HEADER, Immediate, Routes

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One TorchServe request on its way through the handler."""

    request_id: str
    prompt: str = ""
    stream: bool = False
    generation: Generation | None = None
    error: RequestError | None = None  # what its client gets instead of an answer
    immediate: Immediate | None = None  # an answer that needs no generation (handler.serving.routes)
    opened: bool = False  # a chunk went out: the status line is sent, the job stays open across calls

    @property
    def done(self) -> bool:
        return self.generation is None or self.generation.done


def generation_error(gen: Generation) -> RequestError:
    """The error a client gets for a generation that failed in the engine."""
    return internal_error(gen.error, "during generation")


def internal_error(err: BaseException | None, where: str) -> RequestError:
    """The error a client gets for a fault of this worker (507 when it was out of memory, else 500)."""
    if is_out_of_memory(err):
        return RequestError("body", "the worker ran out of memory for this request; retry later, or ask for "
                            "fewer tokens or a smaller top_k", status=507)
    return RequestError("body", f"internal error {where} ({type(err).__name__}); see the worker log; "
                        "retrying may succeed", status=500)


class Batching:
    """The job table and the loop of one worker (see the module docstring)."""

    def __init__(self, engine: Engine, preparation: Preparation, routes: Routes, *, continuous: bool,
                 iteration_s: float):
        self.engine = engine
        self.preparation = preparation
        self.routes = routes
        self.continuous = continuous
        self.iteration_s = iteration_s
        self.jobs: dict[str, Job] = {}  # continuous batching: jobs open across calls

    # ---- 1. the jobs of this call ----

    def receive(self, data: list, context) -> list[Job]:
        ids = [context.request_ids[i] for i in range(len(data))]
        if self.continuous:
            for gone in set(self.jobs) - set(ids):
                self._cancel(gone)
        jobs, new = [], []
        for index, (request_id, entry) in enumerate(zip(ids, data)):
            job = self.jobs.get(request_id)
            if job is None:
                job = self._accept(index, request_id, entry, context)
                new.append(job)
            jobs.append(job)
        if new:
            logger.info("batch of %d requests (%d valid) joining %d running", len(new),
                        sum(1 for j in new if j.error is None), len(jobs) - len(new))
        return jobs

    def _accept(self, index: int, request_id: str, entry, context) -> Job:
        """The guard where a request enters: whatever it holds (headers, route, body) and whatever fails
        while it is read, routed or submitted, it becomes a job of its own, with its own error if need be."""
        try:
            return self._new_job(index, request_id, entry, context)
        except Exception as err:  # noqa: BLE001 - this request fails alone, never the call
            logger.exception("accepting request %s failed", request_id)
            self._drop(request_id)
            return Job(request_id, error=internal_error(err, "while accepting this request"))

    def _new_job(self, index: int, request_id: str, entry, context) -> Job:
        headers = _headers(context, index)
        routed = self.routes.answer(header(headers, URL_PATH_HEADER))
        if isinstance(routed, RequestError):
            return Job(request_id, error=routed)
        if routed is not None:
            return Job(request_id, immediate=routed)
        prepared = self.preparation.prepare(request_id, entry, headers)
        if isinstance(prepared, RequestError):
            return Job(request_id, error=prepared)
        gen = self.engine.submit(prepared.request)
        job = Job(request_id, prepared.prompt, prepared.request.params.stream, gen)
        if self.continuous:
            self.jobs[request_id] = job
        return job

    def _cancel(self, request_id: str) -> None:
        job = self.jobs.pop(request_id)
        self._drop(request_id)
        logger.info("request %s: the client went away after %d tokens; its slot is free", request_id,
                    len(job.generation.tokens))

    def _drop(self, request_id: str) -> None:
        """End this request's generation, if it has one, and forget it: its slot and record are free."""
        self.jobs.pop(request_id, None)
        for step in (self.engine.cancel, self.engine.forget):
            try:
                step(request_id)
            except Exception:  # noqa: BLE001 - a fault here must not fail the requests beside this one
                logger.exception("dropping request %s: %s failed", request_id, step.__name__)

    # ---- 2. decoding ----

    def run(self, jobs: list[Job], context) -> None:
        if self.continuous:
            if self.engine.busy:
                self.engine.iterate(until=time.monotonic() + self.iteration_s)
            return
        while not all(j.done for j in jobs):
            self.engine.iterate(until=time.monotonic() + self.iteration_s)
            self._send_chunks([(i, j) for i, j in enumerate(jobs) if j.generation is not None and j.stream], context)

    def _send_chunks(self, indexed: list[tuple[int, Job]], context) -> None:
        """Run to completion: streamed text so far as intermediate responses."""
        chunks = {i: responses.chunk(j.generation) for i, j in indexed if not j.generation.done}
        chunks = {i: c for i, c in chunks.items() if c}
        if chunks:
            ids = {i: context.request_ids[i] for i in chunks}
            send_intermediate_predict_response(chunks, ids, "Intermediate response", 200, context)

    # ---- 3. answers ----

    def respond(self, jobs: list[Job], context) -> list[str]:
        """One answer per job, in order; statuses, content types and (continuous) open/close flags set.

        The guard where an answer leaves: whatever fails while one job's answer is made (or an answer UTF-8
        cannot carry, which TorchServe would fail to encode after the handler returned, killing the worker),
        that job alone gets a 500 and its generation ends; the others get their answers."""
        out, stop_flags = [], []
        for index, job in enumerate(jobs):
            try:
                answer, flag = self._answer(index, job, context)
                answer.encode("utf-8")
            except Exception as err:  # noqa: BLE001 - this request fails alone, never the call
                logger.exception("answering request %s failed", job.request_id)
                answer, flag = self._fail(index, job, internal_error(err, "while answering this request"), context)
            out.append(answer)
            stop_flags.append(flag)
        if self.continuous:
            context.stopping_criteria = [lambda _answer, flag=flag: flag for flag in stop_flags]
        return out

    def fail_all(self, count: int, context, err: BaseException) -> list[str]:
        """The last resort when a call failed as a whole (the handler's guard): every request of it gets its
        own error answer, its generation ends, and the call itself succeeds, so that TorchServe does not turn
        it into an error for every job it has open."""
        out, stop_flags = [], []
        for index in range(count):
            request_id = context.request_ids.get(index) if isinstance(context.request_ids, dict) else None
            job = self.jobs.get(request_id) or Job(str(request_id))
            answer, flag = self._fail(index, job, internal_error(err, "in this worker"), context)
            out.append(answer)
            stop_flags.append(flag)
        if self.continuous:
            context.stopping_criteria = [lambda _answer, flag=flag: flag for flag in stop_flags]
        return out

    def _answer(self, index: int, job: Job, context) -> tuple[str, bool | None]:
        """A job's answer and its stop flag (False: the job stays open; True: a stream ends; None: plain)."""
        context.set_response_content_type(index, job.immediate.content_type if job.immediate else
                                          responses.STREAM_CONTENT_TYPE if job.stream else responses.JSON_CONTENT_TYPE)
        if not job.done:  # continuous batching: a chunk, and the job stays open
            answer = responses.chunk(job.generation) if job.stream else ""
            job.opened = True
            return answer, False
        answer = self._final(index, job, context)
        if job.generation is not None:
            self.jobs.pop(job.request_id, None)
            self.engine.forget(job.request_id)
        # a job that got chunks ends its stream ("false"); one answered at once gets a plain response
        return answer, True if job.opened else None

    def _fail(self, index: int, job: Job, error: RequestError, context) -> tuple[str, bool | None]:
        """Answer `job` with `error` and close it; its generation, if any, ends."""
        self._drop(job.request_id)
        if job.opened:  # the status line went out with the first chunk: the error ends the body
            return error.to_json() + ("\n" if job.stream else ""), True
        context.set_response_content_type(index, responses.JSON_CONTENT_TYPE)
        _set_status(context, index, error.status, error.reason)
        return error.to_json(), None

    def _final(self, index: int, job: Job, context) -> str:
        if job.immediate is not None:
            return job.immediate.body
        error = job.error
        if error is None and job.generation.finish_reason is FinishReason.ERROR:
            error = generation_error(job.generation)
            logger.error("request %s failed during generation: %r", job.request_id, job.generation.error)
        if error is not None:
            _set_status(context, index, error.status, error.reason)
            return error.to_json() + ("\n" if job.stream and job.opened else "")
        return responses.final(job.prompt, job.generation, job.stream)


def _headers(context, index: int) -> dict:
    try:
        return context.get_all_request_header(index) or {}
    except (TypeError, IndexError, AttributeError, KeyError):
        return {}


def _set_status(context, index: int, code: int, phrase: str) -> None:
    if getattr(context, "request_processor", None):
        context.set_response_status(code, phrase, index)
