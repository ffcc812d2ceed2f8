"""TorchServe's worker and frontend around an in-process handler, for the tests.

The context itself is the package's (`gpt2ops.worker_context.make_context`, re-exported here); per batch the
worker sets `request_ids`, `request_processor` (one per request, with its
headers) and `cl_socket` (where intermediate, streamed responses are written).
"""

from __future__ import annotations

import json
import re

from ts.context import Context, RequestProcessor
from ts.protocol.otf_message_handler import create_predict_response

from gpt2ops.worker_context import make_context

__all__ = ["Frontend", "RecordingSocket", "make_context", "start_batch", "statuses"]


class RecordingSocket:
    """Stands in for the worker's socket to the frontend: keeps what streaming sends."""

    def __init__(self):
        self.sent: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def chunks(self) -> list[dict]:
        """The JSON lines of every intermediate message, in order."""
        text = b"".join(self.sent).decode("utf-8", errors="replace")
        return [json.loads(m) for m in re.findall(r'(\{"text": .*?\})\n', text)]


def start_batch(context: Context, headers: list[dict]) -> RecordingSocket:
    """Prepare `context` for one batch of len(headers) requests, as the worker does."""
    context.request_ids = {i: f"request-{i}" for i in range(len(headers))}
    context.request_processor = [RequestProcessor(h) for h in headers]
    context.metrics.request_ids = context.request_ids
    context.cl_socket = RecordingSocket()
    return context.cl_socket


def statuses(context: Context) -> list[int]:
    return [context.get_response_status(i)[0] for i in range(len(context.request_processor))]


class Frontend:
    """TorchServe's frontend around an in-process handler, as its source (0.12.0) behaves.

    Run to completion (`continuousBatching: false`): one call per batch, every answer final, streamed
    chunks on the worker's socket. Continuous batching (`ContinuousBatching.java`): up to `batchSize` open
    jobs; every call carries the open jobs (headers only, no body: "cached in backend") and new ones; an
    answer whose `ts_stream_next` is "true" keeps its job open and is one chunk of its body, anything else
    closes it; a job whose client went away is simply not sent again.

    Every answer goes through TorchServe's own `create_predict_response`, as in the worker: it encodes the
    answers (UTF-8), content types, statuses and headers and applies the handler's stopping criteria; what
    raises there would kill a real worker, and raises here.
    """

    def __init__(self, handler, context: Context):
        self.handler, self.context = handler, context
        self.continuous = bool(context.model_yaml_config.get("continuousBatching"))
        self.batch_size = context.model_yaml_config.get("batchSize", 1)
        self.calls = 0
        self.served = 0  # requests sent so far: each gets a request id of its own, as TorchServe's are unique
        # each request's first answer: its status and its `ts_stream_next` header (None: not set), by request id;
        # "false" there is the shape TorchServe 0.12.0 cannot send (no status line: Netty's EncoderException)
        self.first_answers: dict[str, tuple[int, str | None]] = {}

    def serve(self, bodies: list, headers: list[dict] | None = None, *, drop: dict[int, int] | None = None,
              max_calls: int = 10_000, entries: bool = False) -> tuple[list[int], list[str], list[list[str]]]:
        """Send `bodies` (one request each); returns (statuses, full bodies, chunks per request).

        Run to completion: the chunks streamed as intermediate responses are on `context.cl_socket`.

        drop: {request index: after how many chunks its client goes away} (continuous batching only).
        entries: each body is the whole batch entry as the worker decoded it (`{"body": ...}` or form
        fields), rather than the value of "body".
        """
        headers = headers or [{"Content-Type": "application/json"}] * len(bodies)
        ids = [f"request-{self.served + i}" for i in range(len(bodies))]
        self.served += len(bodies)
        pending = list(range(len(bodies)))
        open_jobs: list[int] = []
        statuses: list[int | None] = [None] * len(bodies)
        chunks: list[list[str]] = [[] for _ in bodies]
        drop = drop or {}
        calls = 0
        while pending or open_jobs:
            self.calls += 1
            calls += 1
            assert calls <= max_calls, "the handler never finished these requests"
            room = self.batch_size - len(open_jobs) if self.continuous else self.batch_size
            new, pending = pending[:room], pending[room:]
            batch = open_jobs + new
            start_batch(self.context, [headers[i] for i in batch])
            self.context.request_ids = {n: ids[i] for n, i in enumerate(batch)}
            # context.stopping_criteria is not reset between calls: in the worker it lives as long as the context
            data = [{} if i in open_jobs else bodies[i] if entries else {"body": bodies[i]} for i in batch]
            out = self.handler.handle(data, self.context)
            assert isinstance(out, list) and len(out) == len(batch)
            create_predict_response(out, self.context.request_ids, "Prediction success", 200, context=self.context)
            open_jobs = []
            for n, i in enumerate(batch):
                text = out[n].decode() if isinstance(out[n], bytes) else out[n]
                stream_next = self.context.get_response_headers(n).get("ts_stream_next") if self.continuous else None
                if statuses[i] is None:
                    statuses[i] = self.context.get_response_status(n)[0] or 200
                    self.first_answers[ids[i]] = (statuses[i], stream_next)
                chunks[i].append(text)
                if stream_next == "true":
                    if i in drop and len(chunks[i]) >= drop[i]:
                        continue  # the client went away: the frontend drops the job
                    open_jobs.append(i)
        return statuses, ["".join(c) for c in chunks], chunks
