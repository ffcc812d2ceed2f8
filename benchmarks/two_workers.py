#!/usr/bin/env python3
"""One worker against two workers of one model, same load, one real TorchServe (docs/engine.md, Traps).

    .venv/bin/python -m benchmarks.two_workers                       # ~3 minutes on 2 cores
    .venv/bin/python -m benchmarks.two_workers --requests 30 --interval 0.8 --tokens 64   # a heavier load

Under continuous batching, TorchServe 0.12.0's `Model.pollInferJob` holds the model-wide lock while an idle
worker waits in `poll` for a job; a busy worker that needs the lock for its next iteration waits until a
request arrives. This measures it: the tiny model (artifacts/models/tiny-gpt2, `make model`) is registered
with one worker, gets the load, is scaled to two (`PUT /models/<m>?min_worker=2`, TorchServe's own call),
and gets the same load again.

The load: streamed requests at a fixed interval (open loop: each sent at its time, whatever is pending),
greedy, `ignore_eos`, `--tokens` new tokens each. A stall lasts until the next arrival, so requests keep
arriving (unmeasured) until every measured one has finished. For each shape the table gives the latency
(send to last byte) p50/p99, the time to the first chunk p50, and the longest gap between two chunks of one
request (max over the requests; the median request's longest gap too).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

MODEL = "tiny-gpt2"


@dataclass
class Timing:
    latency: float  # send to the last byte, s
    first_chunk: float  # send to the first chunk, s
    longest_gap: float  # the longest wait between two chunks, s
    ok: bool


def timed_stream(client, body: dict) -> Timing:
    start = time.monotonic()
    arrivals, ok = [], False
    try:
        r = requests.post(f"{client.inference_url}/predictions/{MODEL}", json=body, stream=True, timeout=120,
                          headers={"Authorization": f"Bearer {client.key('inference')}"})
        for chunk in r.iter_content(chunk_size=None):
            if chunk:
                arrivals.append(time.monotonic())
        ok = r.status_code == 200 and bool(arrivals)
    except requests.RequestException:
        pass
    end = time.monotonic()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return Timing(end - start, (arrivals[0] if arrivals else end) - start, max(gaps, default=0.0), ok)


def run_load(client, count: int, interval: float, tokens: int) -> list[Timing]:
    """`count` measured requests every `interval` s; then fillers at the same pace until the measured are done."""
    results: list[Timing | None] = [None] * count
    threads = []

    def send(i: int | None) -> None:
        body = {"prompt": f"第{i}个问题" if i is not None else "填充", "max_new_tokens": tokens, "stream": True,
                "decoding": "greedy", "ignore_eos": True}
        timing = timed_stream(client, body)
        if i is not None:
            results[i] = timing

    next_at = time.monotonic()
    i = 0
    while i < count or any(r is None for r in results):
        t = threading.Thread(target=send, args=(i if i < count else None,), daemon=True)
        t.start()
        threads.append(t)
        i += 1
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
        if i > count * 4:  # something is wrong: stop sending
            break
    for t in threads:
        t.join(timeout=150)
    return [r for r in results if r is not None]


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def row(name: str, timings: list[Timing]) -> str:
    ok = [t for t in timings if t.ok]
    if not ok:
        return f"| {name} | 0/{len(timings)} | - | - | - | - | - |"
    lat = [t.latency for t in ok]
    gaps = [t.longest_gap for t in ok]
    return (f"| {name} | {len(ok)}/{len(timings)} | {1000 * statistics.median(lat):.0f} | "
            f"{1000 * quantile(lat, 0.99):.0f} | {1000 * statistics.median(t.first_chunk for t in ok):.0f} | "
            f"{1000 * max(gaps):.0f} | {1000 * statistics.median(gaps):.0f} |")


def wait_for_workers(server, count: int, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        workers = server.workers(MODEL)
        if len(workers) >= count and all(w.get("status") == "READY" for w in workers):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{MODEL} did not get {count} READY workers within {seconds:.0f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12, help="measured requests per shape (default 12)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between two arrivals (default 2: a "
                        "light load, where a stall cannot be mistaken for a busy CPU)")
    parser.add_argument("--tokens", type=int, default=16, help="new tokens per request (default 16)")
    parser.add_argument("--model-dir", default=None, help="the saved tiny model (default: artifacts/models/tiny-gpt2)")
    args = parser.parse_args(argv)

    from gpt2ops import REPO
    from gpt2ops.local_server import build_archive, start_server

    model_dir = Path(args.model_dir) if args.model_dir else REPO / "artifacts" / "models" / MODEL
    if not (model_dir / "model.safetensors").exists():
        print(f"error: no saved model at {model_dir}; run `make model` first", file=sys.stderr)
        return 1
    timings = {}
    load = os.getloadavg()  # other work on the machine: the figures are only comparable within one run
    with tempfile.TemporaryDirectory(prefix="two-workers-") as tmp:
        root = Path(tmp)
        store = root / "model_store"
        store.mkdir()
        build_archive(model_dir, MODEL, store)  # the shipped model-config.yaml
        server = start_server(root / "ts", store, job_queue_size=1000)
        try:
            client = server.client
            client.register(f"{MODEL}.mar", MODEL, workers=1)
            timed_stream(client, {"prompt": "warm", "max_new_tokens": 8})
            timings["1 worker"] = run_load(client, args.requests, args.interval, args.tokens)
            r = client._call("management", "PUT", f"{client.management_url}/models/{MODEL}",
                             params={"min_worker": 2, "max_worker": 2, "synchronous": "true"})
            if r.status_code != 200:
                raise RuntimeError(f"scaling to 2 workers failed: {r.status_code} {r.text}")
            wait_for_workers(server, 2)
            timed_stream(client, {"prompt": "warm", "max_new_tokens": 8})
            timings["2 workers"] = run_load(client, args.requests, args.interval, args.tokens)
        finally:
            server.stop()
    print(f"# two workers of one model: {platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or 'cpu'}), "
          f"TorchServe 0.12.0, tiny GPT-2 on the CPU in float32, the shipped model-config.yaml (continuous "
          f"batching, iteration_ms 25); {args.requests} streamed requests of {args.tokens} tokens, one every "
          f"{args.interval} s; load average before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print("| workers | answered | latency p50 (ms) | latency p99 (ms) | first chunk p50 (ms) | "
          "longest gap between chunks (ms) | median request's longest gap (ms) |")
    print("|---|---|---|---|---|---|---|")
    for name, result in timings.items():
        print(row(name, result))
    return 0 if all(t.ok for result in timings.values() for t in result) else 1


if __name__ == "__main__":
    sys.exit(main())
