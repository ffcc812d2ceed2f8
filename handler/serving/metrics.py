"""What the worker publishes on TorchServe's metrics endpoint (Prometheus on the metrics port).

- `WorkerMemoryMiB{Device, Part}`: the memory breakdown, once at start (`handler.memory.ledger`).
- `DecodeStep{Path, Setting, FellBack, Cause}` = 1: which decode step serves (eager | compiled | cuda-graphs |
  cuda-graph-trees), for which `compile` setting, and whether it is eager because the fast step it tried failed
  (Cause: `ok`, `off`, `auto-cpu`, `self-check`, `fault`, or the error's type), once at start (`publish_decode_step`).
- The engine's load, at most once a second while it serves: `EngineSlots` (the pool's slots),
  `EngineSlotsInUse`, `EngineRequestsWaiting` (gauges), `EngineTimeToFirstTokenMs` (gauge: the
  latest request's), `EngineGeneratedTokens` (counter). An autoscaler reads slots in use over slots.

Each value is one log line the frontend parses (TorchServe's backend metrics), hence the throttle.
"""

from __future__ import annotations

import logging
import time

from handler.engine.scheduler import EngineStats

logger = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0


def _add(context, name: str, value: float, unit: str, dimensions: dict[str, str], counter: bool = False) -> None:
    metrics = getattr(context, "metrics", None)
    if metrics is None:
        return
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes

    metrics.add_metric(name, value, unit, metric_type=MetricTypes.COUNTER if counter else MetricTypes.GAUGE,
                       dimensions=[Dimension(k, v) for k, v in dimensions.items()])


def publish_memory(context, device, report: dict) -> None:
    """One log line and one `WorkerMemoryMiB` gauge per part of the breakdown."""
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
            _add(context, "WorkerMemoryMiB", value, "MB", {"Device": str(device), "Part": part})


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


def publish_decode_step(context, report) -> dict:
    """A WARNING with the cause when the fast step fell back to eager, and the `DecodeStep` gauge."""
    outcome = decode_step_outcome(report)
    if outcome["fell_back"]:
        logger.warning("decode step: serving EAGER although compile: %s asked for the fast step: %s",
                       report.setting, report.reason)
    _add(context, "DecodeStep", 1, "count", {"Path": report.path, "Setting": report.setting,
                                             "FellBack": str(outcome["fell_back"]).lower(), "Cause": outcome["cause"]})
    return outcome


class EngineMetrics:
    """Publishes the engine's load, throttled to once every PUBLISH_EVERY_S, and always when it is idle with
    something new to say (the last answer of a burst must not leave a busy gauge or a stale token count
    behind for the autoscaler, even when the burst began and ended within the throttle's second)."""

    def __init__(self):
        self.last_at = float("-inf")
        self.tokens_published = 0
        self.published_idle = False  # the last values published were an idle engine's, and nothing ran since

    def publish(self, context, stats: EngineStats, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        idle = stats.slots_in_use == 0 and stats.waiting == 0
        if not idle or stats.generated_tokens != self.tokens_published:
            self.published_idle = False  # seen busy (published or not): the next idle state is news
        if now - self.last_at < PUBLISH_EVERY_S and not (idle and not self.published_idle):
            return False
        self.last_at, self.published_idle = now, idle
        _add(context, "EngineSlots", stats.slots, "count", {})
        _add(context, "EngineSlotsInUse", stats.slots_in_use, "count", {})
        _add(context, "EngineRequestsWaiting", stats.waiting, "count", {})
        if stats.last_time_to_first_token_ms is not None:
            _add(context, "EngineTimeToFirstTokenMs", round(stats.last_time_to_first_token_ms, 2), "ms", {})
        new_tokens = stats.generated_tokens - self.tokens_published
        if new_tokens > 0:
            _add(context, "EngineGeneratedTokens", new_tokens, "count", {}, counter=True)
            self.tokens_published = stats.generated_tokens
        return True
