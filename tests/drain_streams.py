"""Streams in flight while a server stops (tests/e2e/test_stop_drain.py, tests/image): what each client got."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import requests

LONG_STREAM = {"prompt": "你是谁?", "max_new_tokens": 256, "ignore_eos": True, "stream": True}


@dataclass
class StreamOutcome:
    status: int | None = None
    lines: int = 0
    last: dict | None = None
    error: str | None = None  # a reset or a cut stream

    @property
    def kind(self) -> str:
        if self.error:
            return "reset"
        if self.status == 200 and self.last and "finish_reason" in self.last:
            return "finished"
        if self.status == 200 and self.last and self.last.get("code") == 503:
            return "ended with an error chunk"
        if self.status == 503 and self.last and self.last.get("code") == 503:
            return "refused (503)"
        return "cut"


def _stream(url: str, key: str | None, payload: dict, out: StreamOutcome, started: threading.Event) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with requests.post(url, json=payload, headers=headers, stream=True, timeout=60) as r:
            out.status = r.status_code
            buffer = b""
            for chunk in r.iter_content(chunk_size=None):
                started.set()
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for line in filter(None, (c.strip() for c in complete)):
                    out.lines += 1
                    out.last = json.loads(line)
            if buffer.strip():
                out.lines += 1
                out.last = json.loads(buffer)
    except (requests.RequestException, ValueError) as err:
        out.error = f"{type(err).__name__}: {err}"
    finally:
        started.set()


def long_stream(report: dict) -> dict:
    """LONG_STREAM, with no more tokens than the worker admits within its timeout (its report says how many:
    on a busy machine the warm-up's step time lowers it)."""
    return {**LONG_STREAM, "max_new_tokens": min(LONG_STREAM["max_new_tokens"], report["max_new_tokens_within_timeout"])}


def start_streams(url: str, key: str | None, count: int, payload: dict = LONG_STREAM):
    """`count` streamed generations in threads; returns (outcomes, started events, threads)."""
    outcomes = [StreamOutcome() for _ in range(count)]
    events = [threading.Event() for _ in range(count)]
    threads = [threading.Thread(target=_stream, args=(url, key, payload, o, e), daemon=True)
               for o, e in zip(outcomes, events)]
    for thread in threads:
        thread.start()
    return outcomes, events, threads


def summary(outcomes: list[StreamOutcome]) -> dict[str, int]:
    kinds = [o.kind for o in outcomes]
    return {k: kinds.count(k) for k in sorted(set(kinds))}


def lost(outcomes: list[StreamOutcome]) -> list[tuple]:
    """The clients that were reset or cut off: none may be."""
    return [(o.kind, o.status, o.lines, o.error or o.last) for o in outcomes if o.kind in ("reset", "cut")]
