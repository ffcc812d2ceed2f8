"""Shutting down without losing a request: the worker's half of scripts/serve.sh's drain.

On SIGTERM (`docker stop`, the pod's termination) scripts/serve.sh writes a drain file, whose path the
worker gets in the environment (`GPT2_DRAIN_FILE`), holding the wall-clock deadline (seconds since the
epoch) by which every open request must be answered. From then on:

- new generation requests are refused with 503 ("shutting down; retry"), a clean answer a client or a
  load balancer retries elsewhere; the report route still answers (serve.sh watches the open jobs there);
- open requests keep generating and finish as usual;
- past the deadline, each request still open is ended: a stream with a final error chunk (its status line
  went out with the first chunk), any other with a 503.

After each call of the frontend that left no job open and brought no new generation request (which would
mean the frontend still queues some), the worker writes `<drain file>.idle`: serve.sh stops TorchServe once
it appears (it pokes an idle worker with a report request to get such a call), or shortly after the deadline.
The file is looked at no more than every CHECK_EVERY_S.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from handler.serving.errors import RequestError

DRAIN_FILE_ENV = "GPT2_DRAIN_FILE"
CHECK_EVERY_S = 0.1
IDLE_SUFFIX = ".idle"  # written by the worker once it holds nothing while draining
REFUSED = RequestError("body", "the server is shutting down and takes no new requests; retry (another replica "
                       "will answer)", status=503)
ENDED = RequestError("body", "the server shut down before this request finished; retry it", status=503)


class Drain:
    """Whether the worker is draining, and until when (see the module docstring)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.deadline: float | None = None  # seconds since the epoch; None: not draining
        self.checked_at = float("-inf")

    @classmethod
    def from_env(cls) -> "Drain":
        return cls(os.environ.get(DRAIN_FILE_ENV) or None)

    def _read_file(self, now: float) -> None:
        if self.path is None or self.deadline is not None or now - self.checked_at < CHECK_EVERY_S:
            return
        self.checked_at = now
        try:
            text = self.path.read_text().strip()
        except OSError:
            return
        try:
            self.deadline = float(text)
        except ValueError:
            self.deadline = time.time()  # an unreadable deadline: end at once rather than never

    def draining(self, now: float | None = None) -> bool:
        """New generation requests are refused."""
        self._read_file(time.monotonic() if now is None else now)
        return self.deadline is not None

    def past_deadline(self) -> bool:
        """Open requests are ended now."""
        return self.draining() and time.time() >= self.deadline

    def after_call(self, open_jobs: int, refused: bool) -> None:
        """Tell serve.sh the worker is done once draining, with no job open and none refused in this call."""
        if not self.draining() or open_jobs or refused:  # a call of report requests only may be the first look
            return
        try:
            self.path.with_name(self.path.name + IDLE_SUFFIX).write_text(f"{time.time():.3f}\n")
        except OSError:
            pass  # serve.sh stops at its deadline instead
