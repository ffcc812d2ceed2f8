#!/usr/bin/env python3
"""Load test on loopback: run-to-completion batching against continuous batching, one real TorchServe.

    .venv/bin/python -m benchmarks.load                        # the issue's comparison, ~3 minutes
    .venv/bin/python -m benchmarks.load --rate 30 --requests 400
    .venv/bin/python -m benchmarks.load --plot load.png --plot-rates 8,16,24   # and a rate sweep, drawn

Builds the tiny model and two archives of it, which differ only in scheduling: `run-to-completion`
(`continuousBatching: false`, `maxBatchDelay: 20`: each TorchServe batch decodes until its longest
request is done, as this package did before) and `continuous` (the shipped model-config.yaml). Both are
registered on one TorchServe on free loopback ports and get the same workload, one after the other:

- low load: one request at a time (a client that waits for each answer);
- open loop: Poisson arrivals at `--rate` requests/s, each request sent at its time whatever is pending.

The workload mixes prompts of 4-128 tokens (cut from the repo's corpus), `max_new_tokens` 8-256 (a third
of them short, at most 16), contrastive search, contrastive sampling, greedy and sampling (with seeds),
and streamed requests; every request asks for `ignore_eos`, so that it generates the length drawn for it.
Every answer is checked token for token against the same request run in-process
(`gpt2ops.expected`): a missing answer or an error counts as lost, different tokens as wrong. For each
scheduling the table gives generated tokens/s, request latency p50/p90/p99, time to first token of the
streamed requests, and the latency of the short requests; then the ratios the issue sets targets for.
With `--plot FILE`, the open loop also runs at each of `--plot-rates`; a table of that sweep is printed
and drawn (gpt2ops.plots.load_figure): latency percentiles and tokens/s against the rate, and the CDF of
time to first token at the highest rate.
Exit status 1 if anything was lost or wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gpt2ops.client import TorchServe

SHORT = 16  # a "short" request asks for at most this many new tokens
MODES = [  # (weight, fields)
    (4, {}),  # contrastive search, the default (alpha 0.6, k 4)
    (1, {"do_sample": True, "temperature": 0.8}),  # contrastive sampling
    (3, {"decoding": "greedy"}),
    (2, {"decoding": "sample", "top_k": 40, "top_p": 0.95}),
]


# ---- the workload ----

def corpus_prompts(tokenizer, corpus: Path, rng: random.Random, n: int) -> list[str]:
    """`n` prompts of 4-128 tokens, windows of the corpus."""
    ids = tokenizer.encode(corpus.read_text(encoding="utf-8"))
    prompts = []
    while len(prompts) < n:
        length = rng.randint(4, 128)
        start = rng.randrange(0, len(ids) - length)
        text = tokenizer.decode(ids[start:start + length]).strip().replace("\ufffd", "")
        if text:
            prompts.append(text)
    return prompts


def workload(tokenizer, corpus: Path, n: int, seed: int = 0, longest: int = 256) -> list[dict]:
    """`n` request bodies of the mixed workload (module docstring), in arrival order; `max_new_tokens` at
    most `longest`."""
    rng = random.Random(seed)
    weights = [w for w, _ in MODES]
    bodies = []
    for i, prompt in enumerate(corpus_prompts(tokenizer, corpus, rng, n)):
        fields = dict(rng.choices([m for _, m in MODES], weights)[0])
        new = rng.randint(8, SHORT) if rng.random() < 1 / 3 else rng.randint(SHORT + 1, longest)
        # ignore_eos: each request generates the length drawn for it (the trained tiny model would end most
        # of them at an end-of-text within a sentence or two, and long requests would not be long)
        body = {"prompt": prompt, "max_new_tokens": new, "ignore_eos": True, "return_token_ids": True, **fields}
        if body.get("do_sample") or body.get("decoding") == "sample":
            body["seed"] = 1000 + i
        if rng.random() < 0.3:
            body["stream"] = True
        bodies.append(body)
    return bodies


# ---- one request, timed ----

@dataclass
class Outcome:
    status: int | str
    tokens: list[int] | None
    sent_at: float
    first_token_at: float | None
    done_at: float

    @property
    def latency(self) -> float:
        return self.done_at - self.sent_at


def send(client: TorchServe, model: str, body: dict) -> Outcome:
    sent = time.monotonic()
    first = None
    try:
        r = client.predict_raw(model, body, stream=bool(body.get("stream")))
        if r.status_code != 200:
            return Outcome(r.status_code, None, sent, None, time.monotonic())
        if not body.get("stream"):
            return Outcome(200, r.json().get("token_ids"), sent, None, time.monotonic())
        last, buffer = {}, b""
        for chunk in r.iter_content(chunk_size=None):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    last = json.loads(line)
                    if first is None and last.get("text"):
                        first = time.monotonic()
        return Outcome(200, last.get("token_ids"), sent, first, time.monotonic())
    except Exception as err:  # noqa: BLE001 - a broken connection is a lost request, counted by the caller
        return Outcome(f"error: {type(err).__name__}", None, sent, first, time.monotonic())


# ---- runs ----

@dataclass
class RunResult:
    name: str
    bodies: list[dict]
    outcomes: list[Outcome]
    expected: list[list[int]]
    statuses: Counter = field(default_factory=Counter)

    def __post_init__(self):
        self.statuses = Counter(o.status for o in self.outcomes)

    @property
    def lost(self) -> int:
        return sum(1 for o in self.outcomes if o.tokens is None)

    @property
    def wrong(self) -> int:
        return sum(1 for o, want in zip(self.outcomes, self.expected) if o.tokens is not None and o.tokens != want)

    def tokens_per_s(self) -> float:
        start = min(o.sent_at for o in self.outcomes)
        end = max(o.done_at for o in self.outcomes)
        return sum(len(o.tokens or []) for o in self.outcomes) / (end - start)

    def latency_ms(self, q: float, short_only: bool = False) -> float:
        xs = [1000 * o.latency for o, b in zip(self.outcomes, self.bodies)
              if o.tokens is not None and (not short_only or b["max_new_tokens"] <= SHORT)]
        return percentile(xs, q)

    def ttft_samples_ms(self) -> list[float]:
        """Time to first token of each streamed request that got one."""
        return [1000 * (o.first_token_at - o.sent_at) for o in self.outcomes if o.first_token_at is not None]

    def ttft_ms(self, q: float) -> float:
        return percentile(self.ttft_samples_ms(), q)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_sequential(client: TorchServe, model: str, bodies: list[dict]) -> list[Outcome]:
    """Low load: one request at a time."""
    return [send(client, model, body) for body in bodies]


def run_open_loop(client: TorchServe, model: str, bodies: list[dict], rate: float, seed: int = 1) -> list[Outcome]:
    """Poisson arrivals at `rate` requests/s; each request is sent at its time, whatever is still pending."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in bodies:
        t += rng.expovariate(rate)
        arrivals.append(t)
    start = time.monotonic() + 0.2
    outcomes: list[Outcome | None] = [None] * len(bodies)

    def at(i: int) -> None:
        delay = start + arrivals[i] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        outcomes[i] = send(client, model, bodies[i])

    with ThreadPoolExecutor(max_workers=min(256, len(bodies))) as pool:
        list(pool.map(at, range(len(bodies))))
    return outcomes


# ---- the closed-loop load of the CI test (tests/e2e/test_load.py) ----

@dataclass
class LoadResult:
    sent: int = 0
    ok: int = 0
    lost: int = 0
    wrong: int = 0
    statuses: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    def table(self, clients: int) -> str:
        rows = [
            ("clients", clients), ("requests sent", self.sent), ("answered 200 and right", self.ok),
            ("lost (no answer / error)", self.lost), ("wrong (tokens differ)", self.wrong),
            ("statuses", dict(self.statuses)),
            ("latency p50 / p90 / p99 (ms)", " / ".join(f"{percentile(self.latencies_ms, q):.0f}"
                                                       for q in (0.5, 0.9, 0.99))),
            ("latency mean (ms)", f"{statistics.fmean(self.latencies_ms):.0f}" if self.latencies_ms else "-"),
            ("throughput (requests/s)", f"{self.sent / self.seconds:.1f}"),
            ("throughput (generated tokens/s)", f"{self.tokens / self.seconds:.0f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)


def run_load(client: TorchServe, model: str, mix: list[dict], expected: list[list[int]], *, clients: int,
             requests: int, seconds: float) -> LoadResult:
    """`clients` threads each sending the next request of `mix` (cycled) until `requests` are sent or
    `seconds` have passed; every answer is checked against `expected`."""
    result, lock = LoadResult(), threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            outcome = send(client, model, mix[i % len(mix)])
            with lock:
                result.sent += 1
                result.statuses[outcome.status] += 1
                result.latencies_ms.append(1000 * outcome.latency)
                if outcome.tokens is None:
                    result.lost += 1
                elif outcome.tokens != expected[i % len(mix)]:
                    result.wrong += 1
                else:
                    result.ok += 1
                    result.tokens += len(outcome.tokens)

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for _ in range(clients):
            pool.submit(worker)
    result.seconds = time.monotonic() - start
    return result


# ---- the comparison ----

def comparison_table(low: dict[str, RunResult], high: dict[str, RunResult], rate: float) -> str:
    lines = [f"| scheduling | load | requests | lost | wrong | tokens/s | latency p50 / p90 / p99 ms | "
             f"TTFT p50 / p90 ms (streamed) | short (<= {SHORT} new) p50 ms |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, runs in (("one at a time", low), (f"Poisson {rate:g}/s", high)):
        for name, r in runs.items():
            lines.append(
                f"| {name} | {label} | {len(r.outcomes)} | {r.lost} | {r.wrong} | {r.tokens_per_s():,.0f} | "
                f"{r.latency_ms(0.5):,.0f} / {r.latency_ms(0.9):,.0f} / {r.latency_ms(0.99):,.0f} | "
                f"{r.ttft_ms(0.5):,.0f} / {r.ttft_ms(0.9):,.0f} | {r.latency_ms(0.5, short_only=True):,.0f} |")
    old, new = high["run-to-completion"], high["continuous"]
    low_old, low_new = low["run-to-completion"], low["continuous"]
    lines += [
        "",
        f"- throughput at Poisson {rate:g}/s: continuous / run-to-completion = "
        f"{new.tokens_per_s() / old.tokens_per_s():.2f}x (target >= 2)",
        f"- short-request p50 at Poisson {rate:g}/s: continuous / run-to-completion = "
        f"{new.latency_ms(0.5, True) / old.latency_ms(0.5, True):.2f} (target <= 0.25)",
        f"- latency p50 one at a time: continuous / run-to-completion = "
        f"{low_new.latency_ms(0.5) / low_old.latency_ms(0.5):.2f} (target <= 1.10)",
    ]
    return "\n".join(lines)


SWEEP_QUANTILES = (0.5, 0.9, 0.99)


def sweep_row(result: RunResult, rate: float) -> dict:
    """One row of the rate sweep (the table and the picture read the same rows)."""
    return {"name": result.name, "rate": rate, "tokens_per_s": result.tokens_per_s(),
            "latency_ms": {q: result.latency_ms(q) for q in SWEEP_QUANTILES},
            "lost": result.lost, "wrong": result.wrong}


def sweep_table(rows: list[dict]) -> str:
    lines = ["| scheduling | arrivals/s | tokens/s | latency p50 / p90 / p99 ms | lost | wrong |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["name"], r["rate"])):
        lines.append(f"| {r['name']} | {r['rate']:g} | {r['tokens_per_s']:,.0f} | "
                     + " / ".join(f"{r['latency_ms'][q]:,.0f}" for q in SWEEP_QUANTILES)
                     + f" | {r['lost']} | {r['wrong']} |")
    return "\n".join(lines)


def rates(text: str) -> list[float]:
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive rates, got {text!r}")
    return sorted(set(values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=24.0, help="Poisson arrivals per second (default 24)")
    parser.add_argument("--requests", type=int, default=240, help="requests of the open-loop run (default 240)")
    parser.add_argument("--low-requests", type=int, default=40, help="requests of the one-at-a-time run")
    parser.add_argument("--decode-shapes", choices=("buckets", "fixed"), default="buckets",
                        help="both archives' handler.pool.decode_shapes (fixed: every step costs the full pool's, "
                        "as on a GPU where a step's time hardly depends on the rows it computes)")
    parser.add_argument("--plot", type=Path, metavar="FILE",
                        help="also sweep the open loop over --plot-rates and draw it to FILE (.png, .svg, .pdf)")
    parser.add_argument("--plot-rates", type=rates, default=[8.0, 16.0, 24.0],
                        help="arrival rates of the sweep (default 8,16,24; --rate's run is reused)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from gpt2ops import REPO
    from gpt2ops.expected import ExpectedAnswers
    from gpt2ops.local_server import build_archive, model_config, start_server
    from gpt2ops.tiny_model import TINY_DEFAULTS, build_tiny_model

    corpus = REPO / "data" / "corpus.txt"
    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        root = Path(tmp)
        model_dir = root / "tiny-gpt2"
        build_tiny_model(model_dir, corpus=corpus, seed=TINY_DEFAULTS["seed"])
        store = root / "model_store"
        store.mkdir()
        pool = {"pool": {"decode_shapes": args.decode_shapes}}
        archives = {"run-to-completion": model_config(continuousBatching=False, maxBatchDelay=20, **pool),
                    "continuous": model_config(**pool)}
        for name, config in archives.items():
            build_archive(model_dir, name, store, config)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        high_bodies = workload(tokenizer, corpus, args.requests, seed=1)
        low_bodies = workload(tokenizer, corpus, args.low_requests, seed=2)
        expected = ExpectedAnswers(model_dir)
        want_high = [expected(b).tokens for b in high_bodies]
        want_low = [expected(b).tokens for b in low_bodies]
        server = start_server(root / "ts", store, job_queue_size=1000)  # an open loop must not overflow the queue
        low, high, sweep = {}, {}, []
        ttft_at_highest: dict[str, list[float]] = {}
        try:
            for name in archives:
                server.client.register(f"{name}.mar", name)
            for name in archives:
                low[name] = RunResult(name, low_bodies, run_sequential(server.client, name, low_bodies), want_low)
                high[name] = RunResult(name, high_bodies, run_open_loop(server.client, name, high_bodies, args.rate),
                                       want_high)
            if args.plot is not None:
                for name in archives:
                    for rate in sorted({*args.plot_rates, args.rate}):
                        result = high[name] if rate == args.rate else RunResult(
                            name, high_bodies, run_open_loop(server.client, name, high_bodies, rate), want_high)
                        sweep.append(sweep_row(result, rate))
                        ttft_at_highest[name] = result.ttft_samples_ms()  # the rates go up: the last is the highest
        finally:
            server.stop()
    print(f"# load test on {platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or 'cpu'}), "
          f"TorchServe 0.12.0, tiny GPT-2 on the CPU in float32, batchSize 8, decode_shapes {args.decode_shapes}")
    print(comparison_table(low, high, args.rate))
    if args.plot is not None:
        from gpt2ops.plots import load_figure, save

        print(f"\n# open-loop sweep, {args.requests} requests per rate (drawn to {args.plot})")
        print(sweep_table(sweep))
        title = (f"load test, {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}: tiny GPT-2, "
                 f"CPU float32, batchSize 8, decode_shapes {args.decode_shapes}")
        save(load_figure(sweep, ttft_at_highest, title), args.plot)
    bad = sum(r.lost + r.wrong for r in [*low.values(), *high.values()]) + sum(r["lost"] + r["wrong"] for r in sweep)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
