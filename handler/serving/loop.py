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

Every API's requests go through the same loop without it asking which API
they came from: the route (`handler.serving.routes`) hands the request to its
API (the native one, `handler.serving.native`, or the OpenAI-compatible
`v1/completions`, `handler.serving.openai`), whose `start` returns a call
(`handler.serving.call.Call`): its generations (one per choice), its chunks,
answer and errors. A job stays open until its call is done.

(A little over 300 lines: the three phases of a call and the guards where a request enters and its
answer leaves are one loop, read together.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from http import HTTPStatus

from ts.handler_utils.utils import send_intermediate_predict_response

from handler.engine.core import Engine
from handler.engine.scheduler import Generation
from handler.serving import drain, responses
from handler.serving.body import header
from handler.serving.call import Call
from handler.serving.describe_jobs import DescribeJobs, is_describe_job
from handler.serving.errors import RequestError, is_out_of_memory
from handler.serving.metrics import api_of
from handler.serving.orphans import OpenJobs
from handler.serving.openai.protocol import DONE_EVENT, SSE_CONTENT_TYPE, error_json
from handler.serving.routes import URL_PATH_HEADER, ReadyAnswer, Routes

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One TorchServe request on its way through the handler."""

    request_id: str
    call: Call | None = None  # a generation request's call (handler.serving.call), whatever its API
    error: RequestError | None = None  # what its client gets instead of an answer
    immediate: ReadyAnswer | None = None  # an answer that needs no generation (handler.serving.routes)
    opened: bool = False  # a chunk went out: the status line is sent, the job stays open across calls
    api: str = "native"  # the API its route belongs to (native | openai), for the metrics
    counted: bool = False  # its end went to the metrics (ServingLoop._count)

    @property
    def stream(self) -> bool:
        return self.call is not None and self.call.stream

    @property
    def done(self) -> bool:
        return self.call is None or self.call.done

    @property
    def generations(self) -> list[Generation]:
        return [] if self.call is None else self.call.generations

    @property
    def content_type(self) -> str:
        if self.immediate is not None:
            return self.immediate.content_type
        return self.call.content_type if self.call is not None else responses.JSON_CONTENT_TYPE

    @property
    def status(self) -> int:
        """The status of a job answered without generating (200 for a generation: its status is its own)."""
        if self.error is not None:
            return self.error.status
        return self.immediate.status if self.immediate is not None else 200

    def error_body(self, error: RequestError) -> str:
        """The body that reports `error` to this job's client: in its call's shape, else the native one."""
        return self.call.error(error, self.opened) if self.call is not None else error.to_json()


# A job the frontend had open in a worker that died between two iterations (handler.serving.orphans): its
# client has the status line already, so its answer is an error line that ends the body.
ORPHANED = RequestError("body", "the worker serving this request died; the request was lost: retry it", status=500)


def orphan_answer(url_path: str) -> ReadyAnswer:
    """The last line of an orphaned job: an OpenAI error event and the stream's end under `v1/`, else the
    native error line (its body, streamed or not, is unknown: the frontend no longer sends it)."""
    if api_of(url_path) == "openai":
        return ReadyAnswer(f"data: {error_json(ORPHANED)}\n\n{DONE_EVENT}", SSE_CONTENT_TYPE, ORPHANED.status)
    return ReadyAnswer(ORPHANED.to_json() + "\n", responses.STREAM_CONTENT_TYPE, ORPHANED.status)


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


class NoMetrics:
    """What the loop tells the metrics when there are none (handler.serving.metrics.ServingMetrics)."""

    def finished(self, api: str, generations, reason: str | None = None) -> None:
        pass

    def rejected(self, api: str, code: int) -> None:
        pass


class ServingLoop:
    """The job table and the loop of one worker (see the module docstring)."""

    def __init__(self, engine: Engine, routes: Routes, *, continuous: bool, iteration_s: float,
                 describe_jobs: DescribeJobs | None = None, open_jobs: OpenJobs | None = None, metrics=None):
        self.engine = engine
        self.metrics = metrics or NoMetrics()  # told of each request's end (handler.serving.metrics)
        self.describe_jobs = describe_jobs  # TorchServe's describe jobs (handler.serving.describe_jobs)
        self.open_jobs = open_jobs  # continuous batching: open job ids on disk (handler.serving.orphans)
        self.routes = routes
        self.continuous = continuous
        self.iteration_s = iteration_s
        self.jobs: dict[str, Job] = {}  # continuous batching: jobs open across calls
        self.drain = drain.Drain.from_env()  # shutting down: refuse new generations, end open ones at the deadline
        self.refused_for_drain = False  # this call brought a generation request while draining

    # ---- 1. the jobs of this call ----

    def receive(self, data: list, context) -> list[Job]:
        ids = [context.request_ids[i] for i in range(len(data))]
        self.refused_for_drain = False
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
        if self.describe_jobs is not None and is_describe_job(headers, entry):  # the management API's
            return Job(request_id, immediate=ReadyAnswer(self.describe_jobs.answer(request_id, context)))
        if self.open_jobs is not None and self.open_jobs.is_orphan(request_id):  # handler.serving.orphans
            logger.error("request %s was open in a worker that died: answered with an error", request_id)
            return Job(request_id, immediate=orphan_answer(header(headers, URL_PATH_HEADER)), opened=True)
        url_path = header(headers, URL_PATH_HEADER)
        api = api_of(url_path)
        routed = self.routes.answer(url_path)
        if isinstance(routed, RequestError):
            return Job(request_id, error=routed, api=api)
        if isinstance(routed, ReadyAnswer):
            return Job(request_id, immediate=routed, api=api)
        if self.drain.draining():  # a generation: refused while shutting down
            self.refused_for_drain = True
            return Job(request_id, error=drain.REFUSED, api=api)
        started = routed.start(request_id, entry, headers)  # its API reads, maps, admits and submits it
        if isinstance(started, RequestError):
            return Job(request_id, error=started, api=api)
        if isinstance(started, ReadyAnswer):
            return Job(request_id, immediate=started, api=api)
        job = Job(request_id, call=started, api=api)
        if self.continuous:
            self.jobs[request_id] = job
        return job

    def _cancel(self, request_id: str) -> None:
        job = self.jobs[request_id]
        self._count(job, "cancelled")
        self._drop(request_id)
        logger.info("request %s: the client went away after %d tokens; its slot is free", request_id,
                    sum(len(gen.tokens) for gen in job.generations))

    def _drop(self, request_id: str, job: Job | None = None) -> None:
        """End this request's generations, if it has any, and forget them: their slots and records are free.
        `job`: the request's job when it may not be (or no longer be) in the table. A job that knows no
        generation (its call failed before it did) may still have one under its own id: that one ends."""
        job = self.jobs.pop(request_id, None) or job
        gen_ids = [gen.request_id for gen in job.generations] if job is not None and job.generations \
            else [request_id]
        for gen_id in gen_ids:
            for step in (self.engine.cancel, self.engine.forget):
                try:
                    step(gen_id)
                except Exception:  # noqa: BLE001 - a fault here must not fail the requests beside this one
                    logger.exception("dropping request %s: %s failed", gen_id, step.__name__)

    # ---- 2. decoding ----

    def run(self, jobs: list[Job], context) -> None:
        if self.continuous:
            if self.engine.busy:
                self.engine.iterate(until=time.monotonic() + self.iteration_s)
            return
        while not all(j.done for j in jobs):
            self.engine.iterate(until=time.monotonic() + self.iteration_s)
            self._send_chunks([(i, j) for i, j in enumerate(jobs) if j.generations and j.stream], context)

    def _send_chunks(self, indexed: list[tuple[int, Job]], context) -> None:
        """Run to completion: streamed text so far as intermediate responses."""
        chunks = {i: j.call.chunk() for i, j in indexed if not j.done}
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
                if self.continuous and not job.done and self.drain.past_deadline():
                    answer, flag = self._fail(index, job, drain.ENDED, context)  # shutting down: ends it now
                else:
                    answer, flag = self._answer(index, job, context)
                answer.encode("utf-8")
            except Exception as err:  # noqa: BLE001 - this request fails alone, never the call
                logger.exception("answering request %s failed", job.request_id)
                answer, flag = self._fail(index, job, internal_error(err, "while answering this request"), context)
            out.append(answer)
            stop_flags.append(flag)
        self._end_call(context, stop_flags)
        self.drain.after_call(len(self.jobs), self.refused_for_drain)
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
        self._end_call(context, stop_flags)
        return out

    def _end_call(self, context, stop_flags: list[bool | None]) -> None:
        """Continuous batching: tell the frontend which jobs of this call stay open (False) and which end, and
        record the open ones on disk (handler.serving.orphans)."""
        if self.continuous:
            context.stopping_criteria = [lambda _answer, flag=flag: flag for flag in stop_flags]
        if self.open_jobs is not None:
            self.open_jobs.record(self.jobs)

    def _answer(self, index: int, job: Job, context) -> tuple[str, bool | None]:
        """A job's answer and its stop flag (False: the job stays open; True: a stream ends; None: plain)."""
        if not job.done:  # continuous batching: a chunk, and the job stays open
            context.set_response_content_type(index, job.content_type)
            answer = job.call.chunk()
            job.opened = True
            return answer, False
        answer = self._final(index, job, context)
        context.set_response_content_type(index, job.content_type)  # after _final: an error may change it
        self._count(job)
        if job.generations:
            self._drop(job.request_id, job)  # done: cancelling changes nothing, and its records are forgotten
        # a job that got chunks ends its stream ("false"); one answered at once gets a plain response
        return answer, True if job.opened else None

    def _fail(self, index: int, job: Job, error: RequestError, context) -> tuple[str, bool | None]:
        """Answer `job` with `error` and close it; its generations, if any, end."""
        self._count(job, "error", error.status)
        self._drop(job.request_id, job)
        body = job.error_body(error)
        if job.opened:  # the status line went out with the first chunk: the error ends the body
            return body, True
        context.set_response_content_type(index, responses.JSON_CONTENT_TYPE)
        _set_status(context, index, error.status, error.reason)
        return body, None

    def _count(self, job: Job, reason: str | None = None, status: int | None = None) -> None:
        """Tell the metrics how `job` ended, once: its generations with their finish reasons (`reason` for those
        still running, which the caller is about to end), or, without any, its error status."""
        if job.counted or job.immediate is not None and job.immediate.status < 400:
            return
        job.counted = True
        try:
            if job.generations:
                self.metrics.finished(job.api, job.generations, reason)
            elif (status or job.status) >= 400:
                self.metrics.rejected(job.api, status or job.status)
        except Exception:  # noqa: BLE001 - metrics must never cost a request its answer
            logger.exception("recording request %s for the metrics failed", job.request_id)

    def _final(self, index: int, job: Job, context) -> str:
        if job.immediate is not None:
            if job.immediate.status != 200:
                _set_status(context, index, job.immediate.status, HTTPStatus(job.immediate.status).phrase)
            return job.immediate.body
        error = job.error
        if error is None:
            failed = job.call.failure()
            if failed is not None:
                error = generation_error(failed)
                logger.error("request %s failed during generation: %r", job.request_id, failed.error)
        if error is not None:
            _set_status(context, index, error.status, error.reason)
            return job.error_body(error)
        return job.call.final()


def _headers(context, index: int) -> dict:
    try:
        return context.get_all_request_header(index) or {}
    except (TypeError, IndexError, AttributeError, KeyError):
        return {}


def _set_status(context, index: int, code: int, phrase: str) -> None:
    if getattr(context, "request_processor", None):
        context.set_response_status(code, phrase, index)
