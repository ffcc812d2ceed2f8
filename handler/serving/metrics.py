"""What the worker publishes on TorchServe's metrics port, in Prometheus's names and units (docs/metrics.md).

How a figure gets there. The worker writes each update as one log line on its stdout,
``[METRICS]name.unit:value|#Label:value,...|#type:COUNTER|#hostname:h,time`` (TorchServe's own
`ts.metrics.caching_metric.CachingMetric`); the frontend parses it, creates a Prometheus collector of that
name and type at its first line (`model_metrics_auto_detect=true`), adds the `Hostname` label and serves it on
the metrics port. A counter line adds its value, a gauge line sets it.

Histograms. TorchServe 0.12.0's frontend has a histogram type, but its collector is simpleclient 0.9.0's with
the default buckets (5 ms to 10 s, not configurable), and every observation is one line through the worker's
stdout. So the histograms here are made the way Prometheus's own client libraries make them, in the worker:
cumulative bucket counts `<name>_bucket{le="..."}`, `<name>_sum` and `<name>_count`, published as counters
(each line adds what is new since the last publication). `histogram_quantile` and `rate` read them exactly as
they read a native histogram; only the `# TYPE` line says counter. Buckets fit each figure (BUCKETS).

Off the critical path. The serving loop only appends what ended to a queue (`ServingMetrics.finished`,
`rejected`: a tuple per request); a daemon thread, every PUBLISH_EVERY_S, turns the queue into bucket counts,
reads the engine's gauges and writes the lines whose values changed. benchmarks/metrics_cost.py measures
what that costs a decode step.

What is published (every series also has TorchServe's `ModelName`, `Level` and `Hostname` labels):

- histograms, one observation per generation (an OpenAI request with n choices has n): `gpt2_time_to_first_token_seconds`,
  `gpt2_time_per_output_token_seconds`, `gpt2_e2e_request_latency_seconds`, `gpt2_request_queue_time_seconds`
  (waiting for a slot), `gpt2_request_prompt_tokens`, `gpt2_request_generation_tokens`;
- counters: `gpt2_prompt_tokens_total`, `gpt2_generation_tokens_total`,
  `gpt2_requests_finished_total{api, finish_reason}`, `gpt2_requests_rejected_total{api, code}`;
- gauges: `gpt2_slots`, `gpt2_slots_in_use`, `gpt2_requests_waiting`, `gpt2_kv_positions`,
  `gpt2_kv_positions_in_use`, `gpt2_decode_step_path{path}` (1 for the step that serves, 0 for the others),
  and once at start `gpt2_decode_step_info{setting, fell_back, cause}` and `gpt2_worker_memory_bytes{device, part}`.

Every label takes values from a fixed set (APIS, FINISH_REASONS, CODES, STEP_PATHS, the memory parts); the
counters' series exist, at 0, from the first publication, so that `increase()` sees the first request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import weakref
from bisect import bisect_left
from collections import deque
from typing import Callable, Iterable, Protocol

from handler.engine.scheduler import Generation
from handler.serving.openai.protocol import PREFIX as OPENAI_PREFIX

logger = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0
PREFIX = "gpt2_"

APIS = ("native", "openai")
FINISH_REASONS = ("eos", "length", "stop", "timeout", "cancelled", "error")
CODES = (400, 404, 413, 500, 503, 507)  # what the handler answers a request it does not generate for
STEP_PATHS = ("eager", "compiled", "cuda-graphs", "cuda-graph-trees")  # handler.engine.fast_path

_TOKENS = tuple(float(2 ** i) for i in range(0, 13))  # 1 .. 4096 tokens
BUCKETS: dict[str, tuple[float, ...]] = {
    # (after vLLM's buckets; seconds)
    "time_to_first_token_seconds": (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                                    5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
    "time_per_output_token_seconds": (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                                      0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5),
    "e2e_request_latency_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                                    40.0, 50.0, 60.0, 120.0),
    "request_queue_time_seconds": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                   60.0, 120.0),
    "request_prompt_tokens": _TOKENS,
    "request_generation_tokens": _TOKENS,
}


def api_of(url_path: str | None) -> str:
    """The API a request's suffix (TorchServe's `url_path` header) belongs to: "openai" under its prefix, else
    "native"."""
    return "openai" if (url_path or "").strip("/").startswith(OPENAI_PREFIX + "/") else "native"


# ---- where the lines go ----


class Sink(Protocol):
    def emit(self, name: str, value: float, unit: str, kind: str, labels: dict[str, str]) -> None: ...

    def commit(self) -> None: ...  # write what was emitted since the last commit


class TorchServeSink:
    """Writes updates as TorchServe's worker writes its metrics, one `[METRICS]` line each (the format of
    `ts.metrics.caching_metric.CachingMetric.emit_metrics`, which the frontend's parser reads; `kind`: COUNTER or
    GAUGE), with the `ModelName` and `Level` labels TorchServe's own backend metrics carry. Lines are written
    together at `commit`, as one log record: the worker logs bare messages to its stdout
    (`ts/model_service_worker.py`: format "%(message)s") and the frontend matches each line that starts with
    `[METRICS]`, so a record of many lines costs one logging call instead of one per line.
    A name keeps the label names (and their order) of its first line: the frontend's collector has them."""

    LOGGER = logging.getLogger("ts.metrics.caching_metric")  # where TorchServe's own metric lines come from

    def __init__(self, model_name: str):
        import socket

        self.tail = f"ModelName:{model_name},Level:Model"
        self.hostname = socket.gethostname()
        self.pending: list[str] = []

    def emit(self, name: str, value: float, unit: str, kind: str, labels: dict[str, str]) -> None:
        dims = ",".join([*(f"{k}:{v}" for k, v in labels.items()), self.tail])
        self.pending.append(f"[METRICS]{name}.{unit}:{value}|#{dims}|#type:{kind}|#hostname:{self.hostname},"
                            f"{int(time.time())}")

    def commit(self) -> None:
        if self.pending:
            lines, self.pending = self.pending, []
            self.LOGGER.info("\n".join(lines))


def _number(value: float) -> float | int:
    """A value the frontend's line parser takes (digits, '-', '.', 'e'): ints stay ints, floats are rounded."""
    if isinstance(value, int) or float(value).is_integer():
        return int(value)
    return round(float(value), 9)


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(float(bound))


# ---- histograms made in the worker ----


class Histogram:
    """Cumulative bucket counts since the last publication (what each bucket, the sum and the count gained)."""

    def __init__(self, name: str, bounds: Iterable[float], unit: str):
        self.name, self.unit = name, unit
        self.bounds = tuple(bounds) + (math.inf,)
        self.pending = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if value is None or not math.isfinite(value):
            return
        value = max(0.0, value)
        for j in range(bisect_left(self.bounds, value), len(self.bounds)):  # le: value <= bound
            self.pending[j] += 1
        self.sum += value
        self.count += 1

    def drain(self, everything: bool = False) -> list[tuple[str, float, dict[str, str]]]:
        """(series name, increment, labels) for every series that gained (all of them when `everything`)."""
        out = [(f"{self.name}_bucket", n, {"le": _le(b)}) for b, n in zip(self.bounds, self.pending)
               if n or everything]
        if self.count or everything:
            out += [(f"{self.name}_sum", self.sum, {}), (f"{self.name}_count", self.count, {})]
        self.pending = [0] * len(self.bounds)
        self.sum, self.count = 0.0, 0
        return out


# ---- the serving metrics ----


class ServingMetrics:
    """What the serving loop records (cheap: one tuple per request that ended) and what a daemon thread makes of
    it, every `interval` seconds: histograms, counters and the engine's gauges, written to `sink` (module docstring).

    `engine`: anything with `stats()` (slots, slots_in_use, waiting, generated_tokens), `running` (slot ->
    Generation), `shape.max_slots`/`shape.max_len` and `step_path`."""

    def __init__(self, engine, sink: Sink, *, interval: float = PUBLISH_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.engine, self.sink, self.interval, self.clock = engine, sink, interval, clock
        self._ended: deque = deque(maxlen=100_000)  # (api, ((generation, reason), ...)) or (api, code)
        self.histograms = {key: Histogram(PREFIX + key, bounds, "tokens" if key.endswith("tokens") else "seconds")
                           for key, bounds in BUCKETS.items()}
        self.finished_counts = {(api, reason): 0 for api in APIS for reason in FINISH_REASONS}
        self.rejected_counts = {(api, str(code)): 0 for api in APIS for code in CODES}
        self.prompt_tokens = 0
        self.tokens_seen = engine.stats().generated_tokens  # the warm-up's tokens are not served tokens
        self.gauges: dict[tuple[str, tuple], float] = {}  # the values last written
        self.started = False  # the zero series are written with the first publication
        self.lines = 0  # lines written since start
        self.flush_cpu_s = 0.0  # CPU time of this process's thread spent publishing
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- the serving loop's side: append and return ----

    def finished(self, api: str, generations: Iterable[Generation], reason: str | None = None) -> None:
        """A request's generations ended (answered, failed or cancelled). `reason`: the finish reason of those not
        done yet (the loop is about to end them: cancelled, or error), read now, before the loop drops them."""
        self._ended.append((api, tuple((g, str(g.finish_reason) if g.done else (reason or "error"))
                                       for g in generations)))

    def rejected(self, api: str, code: int) -> None:
        """A request answered with an error status without generating (bad input, unknown route, no room)."""
        self._ended.append((api, code))

    # ---- the publishing thread's side ----

    def start(self) -> None:
        """Publish every `interval` from a daemon thread, until `stop` or until nothing else holds this object
        (the thread keeps only a weak reference: a handler that is dropped takes its metrics and thread along)."""
        self._thread = threading.Thread(target=_publish_while_alive, args=(weakref.ref(self), self._stop,
                                                                           self.interval),
                                        name="serving-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after its current publication); `start` may start it again."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._thread = None
        self._stop.clear()

    def flush(self) -> int:
        """Publish what changed since the last call; returns the number of lines written."""
        with self._lock:
            cpu = time.thread_time()
            written = self._flush()
            self.flush_cpu_s += time.thread_time() - cpu
            self.lines += written
            return written

    def _flush(self) -> int:
        while self._ended:
            self._take(self._ended.popleft())
        first, self.started = not self.started, True
        written = 0
        for histogram in self.histograms.values():
            for name, increment, labels in histogram.drain(everything=first):
                self._emit(name, increment, histogram.unit, "COUNTER", labels)
                written += 1
        for (api, reason), n in self.finished_counts.items():
            if n or first:
                self._emit(PREFIX + "requests_finished_total", n, "requests", "COUNTER",
                           {"api": api, "finish_reason": reason})
                written += 1
        for (api, code), n in self.rejected_counts.items():
            if n or first:
                self._emit(PREFIX + "requests_rejected_total", n, "requests", "COUNTER", {"api": api, "code": code})
                written += 1
        self.finished_counts = dict.fromkeys(self.finished_counts, 0)
        self.rejected_counts = dict.fromkeys(self.rejected_counts, 0)
        stats = self.engine.stats()
        new_tokens, self.tokens_seen = stats.generated_tokens - self.tokens_seen, stats.generated_tokens
        for name, value in ((PREFIX + "prompt_tokens_total", self.prompt_tokens),
                            (PREFIX + "generation_tokens_total", max(0, new_tokens))):
            if value or first:
                self._emit(name, value, "tokens", "COUNTER", {})
                written += 1
        self.prompt_tokens = 0
        for name, value, labels in self._gauges(stats):
            key = (name, tuple(labels.items()))
            if self.gauges.get(key) != value:
                self.gauges[key] = value
                self._emit(name, value, "count", "GAUGE", labels)
                written += 1
        self.sink.commit()
        return written

    def _take(self, ended) -> None:
        api, what = ended
        if isinstance(what, int):
            code = str(what)
            self.rejected_counts[(api, code)] = self.rejected_counts.get((api, code), 0) + 1
            return
        h = self.histograms
        for gen, reason in what:
            self.finished_counts[(api, reason)] = self.finished_counts.get((api, reason), 0) + 1
            prompt, tokens = len(gen.request.prompt_ids), len(gen.tokens)
            self.prompt_tokens += prompt
            h["request_prompt_tokens"].observe(prompt)
            h["request_generation_tokens"].observe(tokens)
            end = gen.finished_at if gen.finished_at is not None else self.clock()
            h["e2e_request_latency_seconds"].observe(end - gen.submitted_at)
            if gen.admitted_at is not None:
                h["request_queue_time_seconds"].observe(gen.admitted_at - gen.submitted_at)
            if gen.first_token_at is not None:
                h["time_to_first_token_seconds"].observe(gen.first_token_at - gen.submitted_at)
                if tokens >= 2 and reason not in ("cancelled", "error"):
                    h["time_per_output_token_seconds"].observe((end - gen.first_token_at) / (tokens - 1))

    def _gauges(self, stats) -> list[tuple[str, float, dict[str, str]]]:
        shape = self.engine.shape
        running = list(self.engine.running.values())  # a copy made under the GIL: the loop may change the dict
        in_use = sum(len(g.request.prompt_ids) + len(g.tokens) for g in running)
        path = self.engine.step_path
        return [
            (PREFIX + "slots", stats.slots, {}),
            (PREFIX + "slots_in_use", stats.slots_in_use, {}),
            (PREFIX + "requests_waiting", stats.waiting, {}),
            (PREFIX + "kv_positions", shape.max_slots * shape.max_len, {}),
            (PREFIX + "kv_positions_in_use", in_use, {}),
            *((PREFIX + "decode_step_path", int(p == path), {"path": p}) for p in STEP_PATHS),
        ]

    def _emit(self, name: str, value: float, unit: str, kind: str, labels: dict[str, str]) -> None:
        self.sink.emit(name, _number(value), unit, kind, labels)


def _publish_while_alive(ref, stop: threading.Event, interval: float) -> None:
    failures = 0
    while not stop.wait(interval):
        metrics = ref()
        if metrics is None:
            return
        try:
            metrics.flush()
        except Exception:  # noqa: BLE001 - metrics must never end the worker; said a few times, not each second
            failures += 1
            if failures <= 3 or failures % 600 == 0:
                logger.exception("publishing the serving metrics failed (%d times)", failures)
        del metrics


# ---- once at start ----


def publish_memory(sink: Sink, device, report: dict) -> None:
    """One log line and one `gpt2_worker_memory_bytes{device, part}` gauge per part of the memory breakdown."""
    if report["gpu"]:
        parts = report["parts_mib"]
        logger.info(
            "GPU memory of this worker on %s (%s): %.0f MiB = %s (driver figure: %s)",
            device, report["gpu_name"], report["total_mib"],
            " + ".join(f"{k} {v:.0f}" for k, v in parts.items()), report["driver_figure"],
        )
        parts = {**parts, "total": report["total_mib"]}
    else:
        logger.info("memory: %s (weights %.1f MiB, slot pool %.1f MiB)", report["note"], report["weights_mib"],
                    report["slot_pool_mib"])
        parts = {"weights": report["weights_mib"], "slot_pool": report["slot_pool_mib"]}
    for part, value in parts.items():
        if value is not None:
            sink.emit(PREFIX + "worker_memory_bytes", _number(round(value * 2 ** 20)), "bytes", "GAUGE",
                      {"device": str(device), "part": part})
    sink.commit()


def decode_step_outcome(report) -> dict:
    """Whether the decode step serves eager because the fast step it tried failed, and the short cause.
    `report`: handler.engine.fast_path.FastPathReport (path, setting, fallback, error)."""
    fell_back = report.fallback is not None
    if report.error is not None:
        cause = report.error.split(":", 1)[0]  # the exception's type
    elif fell_back:
        cause = report.fallback  # "self-check" or "fault"
    elif report.path == "eager":
        cause = "off" if report.setting == "off" else "auto-cpu"
    else:
        cause = "ok"
    return {"fell_back": fell_back, "cause": cause}


def publish_decode_step(sink: Sink, report) -> dict:
    """A WARNING with the cause when the fast step fell back to eager, and the `gpt2_decode_step_info` gauge
    (the step that serves now is `gpt2_decode_step_path`, kept current by ServingMetrics)."""
    outcome = decode_step_outcome(report)
    if outcome["fell_back"]:
        logger.warning("decode step: serving EAGER although compile: %s asked for the fast step: %s",
                       report.setting, report.reason)
    sink.emit(PREFIX + "decode_step_info", 1, "count", "GAUGE",
              {"path": report.path, "setting": report.setting, "fell_back": str(outcome["fell_back"]).lower(),
               "cause": outcome["cause"]})
    sink.commit()
    return outcome
