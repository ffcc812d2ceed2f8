#!/usr/bin/env python3
"""What publishing the serving metrics costs a decode step: none, before (issue 20) and after, in one run.

    python -m benchmarks.metrics_cost                       # the tiny model, 8 slots, 12 rounds of 2 s per mode
    python -m benchmarks.metrics_cost --model-dir DIR --device cuda --rounds 20

The engine serves as the handler drives it: 8 slots kept full (contrastive search, k 4, 16-token prompts,
`--new-tokens` each, no end-of-text), `iterate` for `iteration_ms` at a time, each request that ends replaced.
Three modes, their rounds interleaved (so that the machine's other work falls on all three alike):

- none    no metrics;
- before  the publication this package had before issue 20: after every call, five gauges/counters through
          TorchServe's `context.metrics.add_metric` (throttled to once a second, and at every idle moment),
          on the decode loop's own thread;
- after   handler.serving.metrics: the loop appends each ended request to a queue (`ServingMetrics.finished`),
          a daemon thread publishes every second (histograms, counters, gauges) as TorchServe's log lines.

Log lines go where a worker's go, a stream (here /dev/null: the frontend reads the worker's stdout in another
process). "ms/step" is wall time over decode steps in a round, the median of the rounds; "vs none" compares
medians. "metrics CPU" is what the metrics themselves cost, measured apart from the noise of the machine:
the publishing thread's CPU time per second, plus the loop's own calls (time per call x calls), as a share of
the run; that share is the most a step could slow, if every microsecond of it were taken from the decode loop.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.serving.loading import load_model
from handler.serving.metrics import ServingMetrics, TorchServeSink

REPO = Path(__file__).resolve().parents[1]


class BeforeIssue20:
    """The engine's metrics as published before issue 20 (handler/serving/metrics.py's EngineMetrics), verbatim in
    what it does per call: five figures through TorchServe's metrics cache, at most once a second while busy."""

    def __init__(self, context):
        self.context, self.last_at, self.tokens_published, self.published_idle = context, float("-inf"), 0, False

    def _add(self, name, value, unit, counter=False):
        from ts.metrics.metric_type_enum import MetricTypes

        self.context.metrics.add_metric(name, value, unit, metric_type=MetricTypes.COUNTER if counter
                                        else MetricTypes.GAUGE, dimensions=[])

    def publish(self, stats) -> None:
        now = time.monotonic()
        idle = stats.slots_in_use == 0 and stats.waiting == 0
        if not idle or stats.generated_tokens != self.tokens_published:
            self.published_idle = False
        if now - self.last_at < 1.0 and not (idle and not self.published_idle):
            return
        self.last_at, self.published_idle = now, idle
        self._add("EngineSlots", stats.slots, "count")
        self._add("EngineSlotsInUse", stats.slots_in_use, "count")
        self._add("EngineRequestsWaiting", stats.waiting, "count")
        if stats.last_time_to_first_token_ms is not None:
            self._add("EngineTimeToFirstTokenMs", round(stats.last_time_to_first_token_ms, 2), "ms")
        new_tokens = stats.generated_tokens - self.tokens_published
        if new_tokens > 0:
            self._add("EngineGeneratedTokens", new_tokens, "count", counter=True)
            self.tokens_published = stats.generated_tokens


def worker_logging() -> None:
    """TorchServe's worker logs INFO lines to its stdout, which the frontend reads: here a stream to /dev/null."""
    handler = logging.StreamHandler(open(os.devnull, "w"))
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s - %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def serve_round(engine: Engine, seconds: float, iteration_s: float, make_request, on_end) -> tuple[int, float]:
    """Keep every slot busy for `seconds`; returns (decode steps, wall seconds)."""
    steps0, start = engine.stats().steps, time.perf_counter()
    while time.perf_counter() - start < seconds:
        changed = engine.iterate(until=time.monotonic() + iteration_s)
        for gen in changed:
            if gen.done:
                on_end(gen)
                engine.forget(gen.request_id)
                engine.submit(make_request())
    return engine.stats().steps - steps0, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(REPO / "artifacts" / "models" / "tiny-gpt2"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=12, help="rounds per mode")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of a round")
    parser.add_argument("--iteration-ms", type=float, default=25.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    args = parser.parse_args(argv)

    from gpt2ops.worker_context import make_context

    torch.set_num_threads(args.threads)
    worker_logging()
    device = torch.device(args.device)
    loaded = load_model(args.model_dir, device, torch.float16 if device.type == "cuda" else torch.float32)
    engine = Engine(loaded.model, PoolShape(max_slots=args.slots, max_len=16 + args.new_tokens, max_top_k=4),
                    sync_every=4)
    rng = random.Random(0)
    vocab = loaded.model.vocab_size
    counter = iter(range(10 ** 9))
    params = GenerationParams(max_new_tokens=args.new_tokens, top_k=4, penalty_alpha=0.6, ignore_eos=True)

    def make_request() -> Request:
        return Request(f"r{next(counter)}", [rng.randrange(1, vocab) for _ in range(16)], params)

    engine.warm_up(prompt_len=16)
    for _ in range(args.slots):
        engine.submit(make_request())
    context = make_context(Path(args.model_dir), {"batchSize": args.slots})
    context.metrics.request_ids = {i: f"r{i}" for i in range(args.slots)}
    before = BeforeIssue20(context)
    after = ServingMetrics(engine, TorchServeSink("tiny-gpt2"))
    calls = {"before": 0, "after": 0}

    def end_none(gen):
        pass

    def end_after(gen):
        after.finished("native", [gen])
        calls["after"] += 1

    serve_round(engine, 1.0, args.iteration_ms / 1000, make_request, end_none)  # warm
    results: dict[str, list[float]] = {"none": [], "before": [], "after": []}
    wall = {"none": 0.0, "before": 0.0, "after": 0.0}
    load = os.getloadavg()
    for r in range(args.rounds):
        order = ["none", "before", "after"]
        rng.shuffle(order)
        for mode in order:
            if mode == "after":
                after.start()
                steps, seconds = serve_round(engine, args.seconds, args.iteration_ms / 1000, make_request, end_after)
                after.stop()
            elif mode == "before":
                steps, seconds = _serve_before(engine, args, make_request, before, calls)
            else:
                steps, seconds = serve_round(engine, args.seconds, args.iteration_ms / 1000, make_request, end_none)
            results[mode].append(1000 * seconds / max(1, steps))
            wall[mode] += seconds

    # the loop's own calls, timed apart: one `finished` (after), one `publish` (before)
    gen = next(iter(engine.running.values()))
    n = 20000
    t = time.perf_counter()
    for _ in range(n):
        after.finished("native", [gen])
    record_us = 1e6 * (time.perf_counter() - t) / n
    flushed = after.flush_cpu_s
    after.flush()  # (those records are not part of the run's figures)
    after.flush_cpu_s = flushed
    t = time.perf_counter()
    for _ in range(2000):
        before.publish(engine.stats())
    publish_us = 1e6 * (time.perf_counter() - t) / 2000

    med = {m: statistics.median(v) for m, v in results.items()}
    spread = {m: (min(v), max(v)) for m, v in results.items()}
    cpu_after = (after.flush_cpu_s + calls["after"] * record_us / 1e6) / wall["after"]
    cpu_before = calls["before"] * publish_us / 1e6 / wall["before"]
    print(f"# metrics cost: {platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or 'cpu'}), "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, device {args.device}, torch threads {args.threads}, "
          f"{Path(args.model_dir).name}, {args.slots} slots, {args.rounds} rounds of {args.seconds:g} s per mode; "
          f"load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"# after: {after.lines} lines in {wall['after']:.0f} s, {calls['after']} requests recorded "
          f"({record_us:.2f} us each), publishing thread {1000 * after.flush_cpu_s / wall['after']:.2f} ms CPU per s; "
          f"before: {calls['before']} calls of {publish_us:.1f} us on the loop")
    print(f"{'mode':8} {'ms/step (median)':>17} {'min..max':>16} {'vs none':>8} {'metrics CPU':>12}")
    for mode in ("none", "before", "after"):
        share = {"none": 0.0, "before": cpu_before, "after": cpu_after}[mode]
        print(f"{mode:8} {med[mode]:17.3f} {spread[mode][0]:7.3f}..{spread[mode][1]:7.3f} "
              f"{100 * (med[mode] / med['none'] - 1):+7.1f}% {100 * share:11.3f}%")
    return 0


def _serve_before(engine, args, make_request, before: BeforeIssue20, calls) -> tuple[int, float]:
    """A round with the old publication: after every call of the loop, as the handler's postprocess did."""
    steps0, start = engine.stats().steps, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        changed = engine.iterate(until=time.monotonic() + args.iteration_ms / 1000)
        for gen in changed:
            if gen.done:
                engine.forget(gen.request_id)
                engine.submit(make_request())
        before.publish(engine.stats())
        calls["before"] += 1
    return engine.stats().steps - steps0, time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
