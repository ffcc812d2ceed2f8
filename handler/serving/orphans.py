"""Jobs left open by a worker that died between two iterations (TorchServe 0.12.0, continuous batching).

When a worker dies while the frontend is between two calls, TorchServe 0.12.0 drops the jobs it had open
(`WorkerThread.run` answers only a call in flight, then `cleanJobs()`). The frontend that
`scripts/serve.sh` starts is corrected (gpt2ops/frontend_patch.py): `BatchAggregator.sendError(null, ...)`
puts those jobs back at the head of the model's queue, still marked as cached, and the restarted
worker gets them with their headers only, no body. Their clients already have a 200 status line (sent
with their first chunk), so they must get a last line that ends the body (`ts_stream_next: false`);
anything else leaves them waiting for a body that never ends.

A fresh request without parameters looks the same (an empty form POST), and answering *it* that way
would be the other trap (a first and only answer with `ts_stream_next: false`: the client gets
nothing). So each worker writes the ids of its open jobs to `.open-jobs.<pid>` in the model's folder
whenever they change, and a new worker reads the files of dead workers once at start: an id found there
is an orphan, nothing else is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable

logger = logging.getLogger(__name__)

PREFIX = ".open-jobs."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OpenJobs:
    """This worker's open job ids on disk, and the ids its dead predecessors left open."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.path = self.directory / f"{PREFIX}{os.getpid()}"
        self.written: frozenset[str] = frozenset()
        self.orphans = self._collect()

    def _collect(self) -> set[str]:
        ids: set[str] = set()
        for file in self.directory.glob(f"{PREFIX}*"):
            pid = file.name[len(PREFIX):]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            try:
                ids.update(file.read_text().split())
                file.unlink()
            except OSError:
                logger.exception("reading %s failed", file)
        if ids:
            logger.warning("%d job(s) were open in a worker that died; they are answered with an error", len(ids))
        return ids

    def is_orphan(self, request_id: str) -> bool:
        return request_id in self.orphans

    def record(self, ids: Iterable[str]) -> None:
        """Write the open ids when they changed (atomically: a reader never sees half a file)."""
        ids = frozenset(ids)
        if ids == self.written:
            return
        try:
            tmp = self.path.parent / f"{self.path.name}.tmp"
            tmp.write_text("\n".join(sorted(ids)))
            tmp.replace(self.path)
            self.written = ids
        except OSError:
            logger.exception("recording the open jobs in %s failed", self.path)
