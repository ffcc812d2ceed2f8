#!/usr/bin/env python3
"""What each of TorchServe 0.12's two ways to keep a request open costs per iteration: the prototype behind
the choice of `continuousBatching` over `asyncCommunication` (docs/engine.md, "Continuous batching in TorchServe").

    .venv/bin/python -m benchmarks.ts_modes                 # 1 and 8 concurrent streams, 100 iterations each

Two handlers with no model (benchmarks/ts_mode_handlers/): under `continuousBatching: true` the frontend calls the
worker once per iteration with every open job, and each call answers each job with a chunk; under
`asyncCommunication: true` each request is handed to an asyncio handler that sends its chunks itself.
Each request asks for `--iterations` chunks; `--clients` clients each stream `--requests` requests one
after the other. The table gives wall time per iteration (ms): with continuous batching, the frontend's
round trip that an engine pays between two batches of decode steps; with async, the cost of one chunk.
Both run on one real TorchServe on free loopback ports, token auth on.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from gpt2ops.local_server import script_env, start_server

HERE = Path(__file__).resolve().parent / "ts_mode_handlers"
MODES = {
    "continuousBatching": ("continuous_handler.py", {"continuousBatching": True}),
    # batchSize 1: the async worker hands each message's requests to one coroutine, one request each here
    "asyncCommunication": ("async_handler.py", {"asyncCommunication": True, "batchSize": 1}),
}


def build(store: Path, name: str, handler: str, extra: dict) -> None:
    config = store.parent / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 1,
                                      "responseTimeout": 120, **extra}))  # extra may override batchSize
    subprocess.run(["torch-model-archiver", "--model-name", name, "--version", "1.0", "--handler",
                    str(HERE / handler), "--config-file", str(config), "--export-path", str(store), "--force"],
                   check=True, env=script_env(), capture_output=True, timeout=120)


def measure(client, model: str, clients: int, requests: int, iterations: int) -> float:
    """ms per iteration: wall time over (requests per client x iterations)."""

    def one_client(_):
        for _ in range(requests):
            r = client.predict_raw(model, {"iterations": iterations}, stream=True)
            chunks = sum(1 for _ in r.iter_content(chunk_size=None))
            assert r.status_code == 200 and chunks >= 1, (r.status_code, chunks)

    one_client(None)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(one_client, range(clients)))
    return 1000 * (time.perf_counter() - start) / (requests * iterations)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ts-modes-") as tmp:
        root = Path(tmp)
        store = root / "model_store"
        store.mkdir()
        for name, (handler, extra) in MODES.items():
            build(store, name, handler, extra)
        server = start_server(root / "ts", store)
        try:
            for name in MODES:
                server.client.register(f"{name}.mar", name)
            rows = {(name, c): measure(server.client, name, c, args.requests, args.iterations)
                    for name in MODES for c in args.clients}
        finally:
            server.stop()
    print(f"# {platform.node()} ({os.cpu_count()} CPUs), TorchServe 0.12.0, handlers without a model; "
          f"{args.requests} requests x {args.iterations} iterations per client")
    print("| mode | concurrent streams | ms per iteration | iterations/s |")
    print("|---|---:|---:|---:|")
    for (name, c), ms in rows.items():
        print(f"| {name} | {c} | {ms:.2f} | {1000 / ms:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
