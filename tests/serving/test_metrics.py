"""The engine's gauges: throttled while busy, always published when the engine goes idle with news."""

from __future__ import annotations

import pytest

from handler.engine.scheduler import EngineStats
from handler.serving.metrics import PUBLISH_EVERY_S, EngineMetrics


class Recorder:
    """A TorchServe context's `metrics` as the handler uses it: add_metric(name, value, unit, ...)."""

    def __init__(self):
        self.metrics = self
        self.calls: list[tuple[str, float]] = []

    def add_metric(self, name, value, unit, metric_type=None, dimensions=None):
        self.calls.append((name, value))

    def last(self, name: str) -> float | None:
        values = [v for n, v in self.calls if n == name]
        return values[-1] if values else None

    def total(self, name: str) -> float:
        return sum(v for n, v in self.calls if n == name)


def stats(in_use: int, waiting: int = 0, tokens: int = 0, ttft: float | None = 5.0) -> EngineStats:
    return EngineStats(slots=8, slots_in_use=in_use, waiting=waiting, generated_tokens=tokens, steps=tokens,
                       last_time_to_first_token_ms=ttft)


@pytest.mark.parametrize("timeline,published", [
    # (seconds, slots in use, tokens) -> which calls publish
    ([(0.0, 3, 10), (0.2, 3, 20), (0.4, 2, 30), (1.1, 1, 40)], [True, False, False, True]),  # throttled while busy
    ([(0.0, 0, 0), (0.1, 0, 0), (0.2, 0, 0)], [True, False, False]),  # idle with nothing new: once
    ([(0.0, 2, 10), (0.3, 0, 20)], [True, True]),  # going idle: at once, whatever the throttle
    # a burst that began and ended within the throttle's second, the engine idle at both of its calls
    ([(0.0, 0, 0), (0.2, 0, 7)], [True, True]),
    ([(0.0, 0, 5), (0.2, 1, 6), (0.4, 0, 9), (0.5, 0, 9)], [True, False, True, False]),
])
def test_what_gets_published_when(timeline, published):
    context, metrics = Recorder(), EngineMetrics()
    got = [metrics.publish(context, stats(in_use, tokens=tokens), now=t) for t, in_use, tokens in timeline]
    assert got == published
    assert context.last("EngineSlotsInUse") == [in_use for (_, in_use, _), p in zip(timeline, got) if p][-1]


def test_the_token_counter_adds_what_is_new_and_sums_to_the_total():
    context, metrics = Recorder(), EngineMetrics()
    for i, tokens in enumerate([4, 9, 9, 30]):
        metrics.publish(context, stats(1 if i < 3 else 0, tokens=tokens), now=i * (PUBLISH_EVERY_S + 0.1))
    assert context.total("EngineGeneratedTokens") == 30
    assert context.last("EngineSlots") == 8 and context.last("EngineRequestsWaiting") == 0


# ---- which decode step serves, and why: a WARNING and the DecodeStep gauge when it fell back to eager ----


from handler.engine.fast_path import FastPathReport  # noqa: E402
from handler.serving.metrics import publish_decode_step  # noqa: E402


class DimensionRecorder(Recorder):
    def add_metric(self, name, value, unit, metric_type=None, dimensions=None):
        self.calls.append((name, value))
        self.dimensions = {d.name: d.value for d in dimensions or []}


@pytest.mark.parametrize("report, fell_back, cause, warned", [
    (FastPathReport("on", "cpu", path="compiled", step_check={"passed": True}), False, "ok", False),
    (FastPathReport("off", "cpu"), False, "off", False),
    (FastPathReport("auto", "cpu"), False, "auto-cpu", False),
    # the pod's read-only root: Inductor cannot write its cache
    (FastPathReport("on", "cpu", fallback="error",
                    error="OSError: [Errno 30] Read-only file system: '/home/ts/.cache/compile'",
                    reason="building or checking the fast step failed (OSError: ...); serving eager"),
     True, "OSError", True),
    (FastPathReport("auto", "cuda:0", fallback="self-check", step_check={"passed": False},
                    reason="self-check: 3 of 96 tokens differ"),
     True, "self-check", True),
    # a fault in a replay while serving: eager from then on (or a restart when the device is not healthy)
    (FastPathReport("auto", "cuda:0", fallback="fault", fault="RuntimeError: CUDA error: an illegal memory access",
                    reason="the fast step failed while serving; eager serves"),
     True, "fault", True),
])
def test_decode_step_metric_and_warning(report, fell_back, cause, warned, caplog):
    context = DimensionRecorder()
    with caplog.at_level("WARNING", logger="handler.serving.metrics"):
        outcome = publish_decode_step(context, report)
    assert outcome == {"fell_back": fell_back, "cause": cause}
    assert context.last("DecodeStep") == 1
    assert context.dimensions == {"Path": report.path, "Setting": report.setting,
                                  "FellBack": str(fell_back).lower(), "Cause": cause}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warnings) == warned
    if warned:
        assert report.reason in warnings[0].getMessage() and "EAGER" in warnings[0].getMessage()
