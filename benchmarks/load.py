#!/usr/bin/env python3
"""Bounded load test on loopback: concurrent clients against a real TorchServe with dynamic batching.

    python benchmarks/load.py                         # 16 clients, 320 requests, tiny model, own server
    python benchmarks/load.py --clients 32 --requests 640

Builds the tiny model and its archive in a temporary folder, starts TorchServe on free
loopback ports with scripts/serve.sh, registers the model with the management key, then
sends a mix of requests (contrastive search, contrastive sampling, greedy, sampling; each
with a fixed seed) from `--clients` threads until `--requests` have been sent or
`--seconds` have passed. Every answer is checked token for token against the same
request run in-process on the same weights: an answer that is missing, an error, or
different counts as lost or wrong. Prints latency percentiles, throughput and the batch
sizes TorchServe formed (from the handler's log), then stops the server.
Exit status 1 if any answer was lost or wrong.
"""

from __future__ import annotations

import argparse
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

PROMPTS = ["你是谁?", "今天天气很好", "Who are you?", "The weather is nice today", "春眠不觉晓，",
           "A language model predicts", "北京是中国的首都", "Batching puts several requests together"]
MODES = [{}, {"do_sample": True, "temperature": 0.8}, {"decoding": "greedy"},
         {"decoding": "sample", "top_k": 40, "top_p": 0.95}]


def request_mix(n_distinct: int = 32) -> list[dict]:
    """Distinct requests the load cycles through (each with a seed, so every answer is checkable)."""
    mix = []
    for i in range(n_distinct):
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": 8 + (i * 7) % 41,
                "return_token_ids": True, **MODES[i % len(MODES)]}
        if body.get("do_sample") or body.get("decoding") == "sample":
            body["seed"] = 1000 + i
        mix.append(body)
    return mix


def expected_tokens(model_dir: Path, mix: list[dict]) -> list[list[int]]:
    """The right answer of each request: the engine in-process, float32 on the CPU like the server."""
    from gpt2ops.expected import ExpectedAnswers

    expected = ExpectedAnswers(model_dir)
    return [expected(body).tokens for body in mix]


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
    batch_sizes: Counter = field(default_factory=Counter)

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    def table(self, clients: int) -> str:
        batches = ", ".join(f"{size}: {n}" for size, n in sorted(self.batch_sizes.items()))
        rows = [
            ("clients", clients), ("requests sent", self.sent), ("answered 200 and right", self.ok),
            ("lost (no answer / error)", self.lost), ("wrong (tokens differ)", self.wrong),
            ("statuses", dict(self.statuses)),
            ("latency p50 / p90 / p99 (ms)",
             f"{self.percentile(0.5):.0f} / {self.percentile(0.9):.0f} / {self.percentile(0.99):.0f}"),
            ("latency mean (ms)", f"{statistics.fmean(self.latencies_ms):.0f}" if self.latencies_ms else "-"),
            ("throughput (requests/s)", f"{self.sent / self.seconds:.1f}"),
            ("throughput (generated tokens/s)", f"{self.tokens / self.seconds:.0f}"),
            ("batch sizes formed (size: count)", batches),
            ("mean batch size", f"{sum(k * v for k, v in self.batch_sizes.items()) / max(1, sum(self.batch_sizes.values())):.2f}"),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)


def run_load(client: TorchServe, model: str, mix: list[dict], expected: list[list[int]], *, clients: int,
             requests: int, seconds: float, batch_sizes=lambda: []) -> LoadResult:
    """Send up to `requests` requests from `clients` threads, stopping after `seconds`; check every answer."""
    result, lock = LoadResult(), threading.Lock()
    counter = iter(range(requests))
    before = len(batch_sizes())
    deadline = time.monotonic() + seconds

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = mix[i % len(mix)]
            start = time.monotonic()
            try:
                r = client.predict_raw(model, body)
                status = r.status_code
                answer = r.json() if status == 200 else None
            except Exception:  # noqa: BLE001 - a connection error is a lost request, counted below
                status, answer = "error", None
            elapsed = 1000 * (time.monotonic() - start)
            with lock:
                result.sent += 1
                result.statuses[status] += 1
                result.latencies_ms.append(elapsed)
                if answer is None:
                    result.lost += 1
                elif answer.get("token_ids") != expected[i % len(mix)]:
                    result.wrong += 1
                else:
                    result.ok += 1
                    result.tokens += answer["completion_tokens"]

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for _ in range(clients):
            pool.submit(worker)
    result.seconds = time.monotonic() - start
    result.batch_sizes = Counter(batch_sizes()[before:])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--seconds", type=float, default=300, help="stop sending after this long")
    args = parser.parse_args(argv)

    from gpt2ops.tiny_model import TINY_DEFAULTS, build_tiny_model
    from gpt2ops.local_server import REPO, build_archive, start_server

    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        root = Path(tmp)
        model_dir = root / "tiny-gpt2"
        build_tiny_model(model_dir, corpus=REPO / "data" / "corpus.txt", seed=TINY_DEFAULTS["seed"])
        store = root / "model_store"
        store.mkdir()
        build_archive(model_dir, "tiny-gpt2", store)
        mix = request_mix()
        expected = expected_tokens(model_dir, mix)
        server = start_server(root / "ts", store)
        try:
            server.client.register("tiny-gpt2.mar", "tiny-gpt2")
            result = run_load(server.client, "tiny-gpt2", mix, expected, clients=args.clients,
                              requests=args.requests, seconds=args.seconds, batch_sizes=server.batch_sizes)
        finally:
            server.stop()
    import platform
    import os

    print(f"# load test on {platform.node()} ({os.cpu_count()} CPUs), TorchServe 0.12.0, tiny GPT-2 on CPU, "
          f"batchSize 8, maxBatchDelay 20 ms")
    print(result.table(args.clients))
    return 0 if result.lost == 0 and result.wrong == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
