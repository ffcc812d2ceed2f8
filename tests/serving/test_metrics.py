"""The serving metrics: histograms made in the worker, counters that start at zero, gauges written when they
change, lines the frontend parses, and the loop telling each request's end once (handler.serving.metrics)."""

from __future__ import annotations

import logging
import math
import re
from types import SimpleNamespace

import pytest

from handler.engine.fast_path import FastPathReport
from handler.engine.scheduler import EngineStats
from handler.engine.stopping import FinishReason
from handler.serving.metrics import (APIS, BUCKETS, FINISH_REASONS, Histogram, ServingMetrics, TorchServeSink,
                                     api_of, publish_decode_step, publish_memory)
from tests.serving.handlers import LIMITS, make_handler


class Sink:
    """Keeps every line: counters add up, gauges keep the last value."""

    def __init__(self):
        self.lines: list[tuple[str, float, str, str, dict]] = []

    def emit(self, name, value, unit, kind, labels):
        assert isinstance(value, (int, float)) and math.isfinite(value)
        self.lines.append((name, value, unit, kind, dict(labels)))

    def value(self, name: str, **labels) -> float | None:
        """A counter's total or a gauge's last value over the lines whose labels include `labels`."""
        total, last, seen = 0.0, None, False
        for n, v, _, kind, got in self.lines:
            if n == name and all(got.get(k) == str(w) for k, w in labels.items()):
                seen = True
                total += v
                last = v
        if not seen:
            return None
        return total if kind == "COUNTER" else last

    def commit(self):
        pass


def engine(tokens=0, in_use=0, waiting=0, running=(), path="eager"):
    return SimpleNamespace(
        stats=lambda: EngineStats(slots=4, slots_in_use=in_use, waiting=waiting, generated_tokens=tokens, steps=0,
                                  last_time_to_first_token_ms=None),
        running=dict(enumerate(running)), shape=SimpleNamespace(max_slots=4, max_len=100), step_path=path)


def gen(prompt=5, tokens=10, reason=FinishReason.LENGTH, submitted=0.0, admitted=0.01, first=0.03, finished=0.3):
    return SimpleNamespace(request=SimpleNamespace(prompt_ids=list(range(prompt))), tokens=list(range(tokens)),
                           finish_reason=reason, done=reason is not None, submitted_at=submitted,
                           admitted_at=admitted, first_token_at=first, finished_at=finished)


def test_a_histogram_publishes_cumulative_buckets_and_only_what_is_new():
    h = Histogram("x_seconds", (0.1, 1.0), "seconds")
    for v in (0.05, 0.1, 0.5, 3.0):  # le is inclusive: 0.1 falls in le="0.1"
        h.observe(v)
    got = {(n, tuple(labels.items())): v for n, v, labels in h.drain()}
    assert got == {("x_seconds_bucket", (("le", "0.1"),)): 2, ("x_seconds_bucket", (("le", "1.0"),)): 3,
                   ("x_seconds_bucket", (("le", "+Inf"),)): 4, ("x_seconds_sum", ()): pytest.approx(3.65),
                   ("x_seconds_count", ()): 4}
    assert h.drain() == []  # nothing new
    h.observe(0.7)
    assert [(n, labels.get("le"), v) for n, v, labels in h.drain()] == [
        ("x_seconds_bucket", "1.0", 1), ("x_seconds_bucket", "+Inf", 1), ("x_seconds_sum", None, 0.7),
        ("x_seconds_count", None, 1)]
    assert len(h.drain(everything=True)) == 3 + 2  # every series, at zero


def test_the_first_publication_writes_every_counter_series_at_zero():
    sink = Sink()
    ServingMetrics(engine(), sink).flush()
    for api in APIS:
        for reason in FINISH_REASONS:
            assert sink.value("gpt2_requests_finished_total", api=api, finish_reason=reason) == 0
        assert sink.value("gpt2_requests_rejected_total", api=api, code=400) == 0
    for key, bounds in BUCKETS.items():
        assert {labels["le"] for n, _, _, _, labels in sink.lines if n == f"gpt2_{key}_bucket"} == \
            {repr(float(b)) for b in bounds} | {"+Inf"}
    assert sink.value("gpt2_prompt_tokens_total") == 0 and sink.value("gpt2_generation_tokens_total") == 0


def test_finished_requests_fill_counters_and_histograms():
    sink, eng = Sink(), engine(tokens=100)  # 100 tokens of warm-up before serving: not counted
    metrics = ServingMetrics(eng, sink)
    metrics.flush()
    metrics.finished("native", [gen(prompt=5, tokens=10)])
    metrics.finished("openai", [gen(prompt=3, tokens=1, reason=FinishReason.EOS, first=0.2, finished=0.2),
                                gen(prompt=3, tokens=4, reason=None)], reason="cancelled")
    metrics.rejected("openai", 400)
    eng.stats = lambda: EngineStats(4, 0, 0, 100 + 15, 0, None)
    metrics.flush()
    assert sink.value("gpt2_requests_finished_total", api="native", finish_reason="length") == 1
    assert sink.value("gpt2_requests_finished_total", api="openai", finish_reason="eos") == 1
    assert sink.value("gpt2_requests_finished_total", api="openai", finish_reason="cancelled") == 1
    assert sink.value("gpt2_requests_rejected_total", api="openai", code=400) == 1
    assert sink.value("gpt2_prompt_tokens_total") == 11
    assert sink.value("gpt2_generation_tokens_total") == 15
    assert sink.value("gpt2_request_generation_tokens_sum") == 15
    assert sink.value("gpt2_time_to_first_token_seconds_count") == 3
    assert sink.value("gpt2_time_to_first_token_seconds_bucket", le="0.04") == 2  # 0.03, 0.03; 0.2 is above
    assert sink.value("gpt2_request_queue_time_seconds_sum") == pytest.approx(0.03)
    assert sink.value("gpt2_e2e_request_latency_seconds_bucket", le="0.25") == 1  # 0.2; the two 0.3 above
    # per output token: only the first (10 tokens in 0.27 s after the first); one token, or cancelled: none
    assert sink.value("gpt2_time_per_output_token_seconds_count") == 1
    assert sink.value("gpt2_time_per_output_token_seconds_sum") == pytest.approx(0.27 / 9)


def test_gauges_are_written_when_they_change():
    sink = Sink()
    eng = engine(in_use=1, waiting=2, running=[gen(prompt=5, tokens=7, reason=None)], path="compiled")
    metrics = ServingMetrics(eng, sink)
    metrics.flush()
    assert sink.value("gpt2_slots") == 4 and sink.value("gpt2_slots_in_use") == 1
    assert sink.value("gpt2_requests_waiting") == 2
    assert sink.value("gpt2_kv_positions") == 400 and sink.value("gpt2_kv_positions_in_use") == 12
    assert {p: sink.value("gpt2_decode_step_path", path=p) for p in ("eager", "compiled")} == \
        {"eager": 0, "compiled": 1}
    assert metrics.flush() == 0  # nothing changed: nothing written
    eng.running, eng.step_path = {}, "eager"  # the fast step was dropped while serving
    metrics.flush()
    assert sink.value("gpt2_kv_positions_in_use") == 0
    assert sink.value("gpt2_decode_step_path", path="eager") == 1
    assert sink.value("gpt2_decode_step_path", path="compiled") == 0


def test_the_thread_publishes_without_the_loop(monkeypatch):
    sink = Sink()
    metrics = ServingMetrics(engine(), sink, interval=0.01)
    metrics.start()
    try:
        metrics.finished("native", [gen()])
        for _ in range(500):
            if sink.value("gpt2_requests_finished_total", api="native", finish_reason="length"):
                break
            __import__("time").sleep(0.01)
    finally:
        metrics.stop()
    assert sink.value("gpt2_requests_finished_total", api="native", finish_reason="length") == 1


def test_the_thread_ends_with_its_metrics():
    """A dropped handler (a test module's, say) must not keep its engine alive through its publishing thread."""
    import gc

    metrics = ServingMetrics(engine(), Sink(), interval=0.01)
    metrics.start()
    thread = metrics._thread
    del metrics
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


# The frontend's parser (TorchServe 0.12.0, frontend/server/.../metrics/Metric.java): a line it does not match
# is dropped with an error in its log.
FRONTEND_PATTERN = re.compile(r"\s*([\w\s]+)\.([\w\s]+):([0-9\-,.e]+)\|#([^|]*)(\|#type:([^|,]+))?"
                              r"\|#hostname:([^,]+),([^,]+)(,(.*))?")


def test_torchserve_sink_writes_lines_the_frontend_parses(caplog):
    sink = TorchServeSink("tiny-gpt2")
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        sink.emit("gpt2_time_to_first_token_seconds_bucket", 3, "seconds", "COUNTER", {"le": "+Inf"})
        sink.emit("gpt2_requests_finished_total", 1, "requests", "COUNTER", {"api": "openai", "finish_reason": "eos"})
        sink.emit("gpt2_time_to_first_token_seconds_sum", 0.012345, "seconds", "COUNTER", {})
        sink.emit("gpt2_slots_in_use", 2, "count", "GAUGE", {})
        assert not caplog.records  # nothing until commit
        sink.commit()
    [record] = caplog.records  # one record, a line per update
    lines = [line.removeprefix("[METRICS]") for line in record.getMessage().split("\n")]
    assert all(line.startswith("[METRICS]") for line in record.getMessage().split("\n"))
    parsed = [FRONTEND_PATTERN.fullmatch(line) for line in lines]
    assert all(parsed), lines
    assert [(m[1], m[3], m[6]) for m in parsed] == [
        ("gpt2_time_to_first_token_seconds_bucket", "3", "COUNTER"), ("gpt2_requests_finished_total", "1", "COUNTER"),
        ("gpt2_time_to_first_token_seconds_sum", "0.012345", "COUNTER"), ("gpt2_slots_in_use", "2", "GAUGE")]
    assert parsed[0][4] == "le:+Inf,ModelName:tiny-gpt2,Level:Model"
    assert parsed[1][4] == "api:openai,finish_reason:eos,ModelName:tiny-gpt2,Level:Model"
    assert parsed[2][10] is None  # no request ids: the line is the same whichever requests are in flight
    # the same line as TorchServe's own CachingMetric writes for it
    from ts.metrics.caching_metric import CachingMetric
    from ts.metrics.metric_type_enum import MetricTypes

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ts.metrics"):
        CachingMetric("gpt2_slots_in_use", "tokens", ["ModelName", "Level"], MetricTypes.GAUGE).add_or_update(
            2, ["tiny-gpt2", "Model"])
        sink.emit("gpt2_slots_in_use", 2, "tokens", "GAUGE", {})
        sink.commit()
    theirs, ours = (r.getMessage() for r in caplog.records)
    assert theirs.rsplit(",", 1)[0] == ours.rsplit(",", 1)[0]  # all but the time stamp


@pytest.mark.parametrize("path,api", [("", "native"), ("v1/completions", "openai"),
                                      ("/v1/chat/completions", "openai"), ("describe", "native"), ("v1", "native")])
def test_api_of_a_route(path, api):
    assert api_of(path) == api


def test_memory_parts_in_bytes():
    sink = Sink()
    publish_memory(sink, "cpu", {"gpu": False, "note": "no GPU", "weights_mib": 1.5, "slot_pool_mib": 2.0})
    assert sink.value("gpt2_worker_memory_bytes", part="weights", device="cpu") == 1.5 * 2 ** 20
    assert sink.value("gpt2_worker_memory_bytes", part="slot_pool") == 2 * 2 ** 20


# ---- which decode step serves, and why: a WARNING and the gauge when it fell back to eager ----


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
    sink = Sink()
    with caplog.at_level("WARNING", logger="handler.serving.metrics"):
        outcome = publish_decode_step(sink, report)
    assert outcome == {"fell_back": fell_back, "cause": cause}
    [(name, value, _, kind, labels)] = sink.lines
    assert (name, value, kind) == ("gpt2_decode_step_info", 1, "GAUGE")
    assert labels == {"path": report.path, "setting": report.setting, "fell_back": str(fell_back).lower(),
                      "cause": cause}
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert bool(warnings) == warned
    if warned:
        assert report.reason in warnings[0].getMessage() and "EAGER" in warnings[0].getMessage()


# ---- the loop tells each request's end once, with its API and reason ----


@pytest.fixture(scope="module")
def counted(tiny_model_dir):
    """A handler whose metrics go to a Sink, published when the test says (no thread)."""
    h = make_handler(tiny_model_dir, warmup=False, limits=LIMITS)
    h.metrics.stop()
    h.metrics.sink = Sink()
    h.metrics.flush()
    return h


def test_the_loop_counts_each_end_once(counted):
    h = counted
    openai = [{"Content-Type": "application/json", "url_path": "v1/completions"}]
    native = [{"Content-Type": "application/json"}]
    bodies = [{"prompt": "a", "max_new_tokens": 5, "decoding": "greedy"},
              {"prompt": "b", "max_new_tokens": 40, "stream": True, "decoding": "greedy"},  # its client leaves
              {"prompt": "c", "max_new_tokens": -1},  # 400
              {"model": "tiny-gpt2", "prompt": "d", "max_tokens": 4, "temperature": 0},
              {"model": "tiny-gpt2", "prompt": "e", "max_tokens": 3, "temperature": 0, "stream": True},
              {"model": "tiny-gpt2", "prompt": "f", "max_tokens": "x"}]  # 400
    statuses, _, _ = h.frontend.serve(bodies, native * 3 + openai * 3, drop={1: 1})
    assert statuses == [200, 200, 400, 200, 200, 400]
    h.metrics.flush()
    sink = h.metrics.sink
    finished = {(api, reason): sink.value("gpt2_requests_finished_total", api=api, finish_reason=reason)
                for api in APIS for reason in FINISH_REASONS}
    assert {k: v for k, v in finished.items() if v} == {("native", "length"): 1, ("native", "cancelled"): 1,
                                                        ("openai", "length"): 2}
    assert sink.value("gpt2_requests_rejected_total", api="native", code=400) == 1
    assert sink.value("gpt2_requests_rejected_total", api="openai", code=400) == 1
    assert sink.value("gpt2_time_to_first_token_seconds_count") == 4
    kept = sink.value("gpt2_request_generation_tokens_sum")
    assert 5 + 4 + 3 + 1 <= kept <= 5 + 4 + 3 + 40
    assert sink.value("gpt2_generation_tokens_total") >= kept
    assert h.metrics.flush() == 0 or sink.value("gpt2_requests_finished_total", api="native",
                                                finish_reason="length") == 1  # never counted twice
