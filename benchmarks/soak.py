#!/usr/bin/env python3
"""Soak: thousands of mixed requests against a real TorchServe, with the worker's memory and open files watched.

    python -m benchmarks.soak                          # 20,000 requests, 16 clients, own server (`make soak`)
    python -m benchmarks.soak --requests 5000 --clients 8 --torch-threads 0

The mix (fixed by --seed): answers checked token for token, streams read to the end and checked, streams
whose client hangs up after the first chunk (the connection closed mid-stream), bad requests (each with the
4xx it must get), and the worker's report (`/predictions/<model>/1.0/describe`). A thread samples the
worker process (psutil: RSS, open file descriptors, open regular files, threads) every --sample-every
seconds. At the end, with the server idle, the report must show no slot in use and nothing waiting.

Growth is measured after the warm-up (the first --warmup-fraction of the requests): the largest RSS of
the last fifth of the run against the largest RSS up to the end of the warm-up, and the same for
descriptors. Exit status 1 when an answer was lost or wrong, when the worker restarted, when anything
was still held once idle (slots, waiting requests, engine records, open jobs), or when growth passed
--rss-bound-mib / --fd-bound.
"""

from __future__ import annotations

import argparse
import http.client
import json
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
from urllib.parse import urlsplit

import psutil

from gpt2ops.client import TorchServe
from handler.memory.plan import MIB

GOOD = [  # what a well-behaved client asks: every answer checked token for token
    {"prompt": "你是谁?", "max_new_tokens": 12},
    {"prompt": "Who are you?", "max_new_tokens": 8, "decoding": "greedy"},
    {"prompt": "春眠不觉晓，", "max_new_tokens": 10, "do_sample": True, "seed": 5},
    {"prompt": "A language model predicts", "max_new_tokens": 6, "decoding": "sample", "top_k": 40, "seed": 9},
    {"prompt": "北京是中国的首都", "max_new_tokens": 16, "top_k": 8, "penalty_alpha": 0.4},
    {"prompt": "The weather is nice today", "max_new_tokens": 4, "stop": ["."]},
]
# ignore_eos: the stream must still be running when its client hangs up (the trained tiny model would end it
# at an end-of-text within a few tokens)
HANG_UP = {"prompt": "I will hang up", "max_new_tokens": 200, "decoding": "greedy", "stream": True, "ignore_eos": True}
JSON = "application/json"
BAD = [  # (body, content type, status): malformed in every way the fuzz found, and the usual ones
    (b'{"prompt": bad', JSON, 400),
    (b"[1, 2]", JSON, 400),
    (b'{"prompt": "hi", "top_k": 1}', JSON, 400),
    (b'{"prompt": "hi", "temprature": 0.5}', JSON, 400),
    (b'{"prompt": "\\ud800"}', JSON, 400),
    (b'{"prompt": "hi", "\\udfff": 1}', JSON, 400),
    (b'{"prompt": "hi", "temperature": 1' + b"0" * 400 + b"}", JSON, 400),
    (b'{"prompt": "hi", "max_new_tokens": ' + b"9" * 5000 + b"}", JSON, 400),
    (b'{"prompt": "hi", "stop": ' + b"[" * 3000 + b"]" * 3000 + b"}", JSON, 400),
    (b"\xff\xfe\xfd", "application/octet-stream", 400),
    (b'{"prompt": "x"}', "application/x-www-form-urlencoded", 400),
    (b'{"prompt": "' + "春".encode() * 400 + b'"}', JSON, 400),
    (b'{"prompt": "' + b"x" * 70000 + b'"}', JSON, 413),
]
KINDS = {"answer": 0.45, "stream": 0.15, "hang-up": 0.12, "bad": 0.25, "report": 0.03}


@dataclass
class Sample:
    at_s: float  # since the start
    done: int  # requests answered so far
    rss_mib: float
    fds: int
    files: int  # open regular files
    threads: int


@dataclass
class SoakResult:
    sent: Counter = field(default_factory=Counter)  # by kind
    statuses: Counter = field(default_factory=Counter)  # (kind, status)
    wrong: list = field(default_factory=list)  # what went wrong: (kind, index, detail)
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    idle_load: dict = field(default_factory=dict)  # the report's "load" once idle
    cancelled: int | None = None  # hung-up requests the worker logged as cancelled (when its log was given)
    worker_pid_before: int = 0
    worker_pid_after: int = 0
    warmup_fraction: float = 0.2

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def _split(self) -> tuple[list[Sample], list[Sample]]:
        """(samples up to the end of the warm-up, samples of the last fifth of the run)."""
        warm = [s for s in self.samples if s.done <= self.warmup_fraction * self.total] or self.samples[:1]
        tail = [s for s in self.samples if s.done >= 0.8 * self.total] or self.samples[-1:]
        return warm, tail

    def rss_growth_mib(self) -> float:
        warm, tail = self._split()
        return max(s.rss_mib for s in tail) - max(s.rss_mib for s in warm)

    def fd_growth(self) -> int:
        warm, tail = self._split()
        return max(s.fds for s in tail) - max(s.fds for s in warm)

    def rss_slope_mib_per_1000(self) -> float:
        """Least-squares slope of RSS over requests answered, after the warm-up (MiB per 1000 requests)."""
        points = [(s.done, s.rss_mib) for s in self.samples if s.done > self.warmup_fraction * self.total]
        if len(points) < 3 or len({x for x, _ in points}) < 2:
            return 0.0
        return 1000 * statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope

    def table(self) -> str:
        warm, tail = self._split()
        first, last = self.samples[0], self.samples[-1]
        rows = [
            ("requests", f"{self.total} in {self.seconds:.1f} s ({self.total / self.seconds:.0f}/s): "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.sent.items()))),
            ("statuses (kind, status): count", ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(self.statuses.items(),
                                                                                                  key=str))),
            ("lost or wrong", len(self.wrong)),
            ("hung-up streams the worker cancelled", "-" if self.cancelled is None else
             f"{self.cancelled} of {self.sent['hang-up']}"),
            ("worker pid before / after", f"{self.worker_pid_before} / {self.worker_pid_after}"),
            ("worker RSS MiB: start / end of warm-up / max last fifth / end",
             f"{first.rss_mib:.1f} / {max(s.rss_mib for s in warm):.1f} / {max(s.rss_mib for s in tail):.1f} / "
             f"{last.rss_mib:.1f}"),
            ("RSS growth after warm-up (MiB); slope (MiB per 1000 requests)",
             f"{self.rss_growth_mib():+.1f}; {self.rss_slope_mib_per_1000():+.3f}"),
            ("open fds: start / end of warm-up / max last fifth / end",
             f"{first.fds} / {max(s.fds for s in warm)} / {max(s.fds for s in tail)} / {last.fds}"),
            ("open regular files: min / max", f"{min(s.files for s in self.samples)} / "
                                              f"{max(s.files for s in self.samples)}"),
            ("threads: min / max", f"{min(s.threads for s in self.samples)} / {max(s.threads for s in self.samples)}"),
            ("samples", len(self.samples)),
            ("load when idle (report)", json.dumps(self.idle_load)),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)

    def timeline(self, rows: int = 12) -> str:
        """RSS and descriptors over the run, `rows` samples evenly spaced."""
        step = max(1, len(self.samples) // rows)
        picked = self.samples[::step] + ([self.samples[-1]] if (len(self.samples) - 1) % step else [])
        lines = ["| t (s) | requests done | RSS MiB | fds | files | threads |", "|---|---|---|---|---|---|"]
        lines += [f"| {s.at_s:.1f} | {s.done} | {s.rss_mib:.1f} | {s.fds} | {s.files} | {s.threads} |" for s in picked]
        return "\n".join(lines)


def expected_tokens(model_dir: Path) -> list[list[int]]:
    from gpt2ops.expected import ExpectedAnswers

    answers = ExpectedAnswers(model_dir)
    return [answers(body).tokens for body in GOOD]


def plan(requests: int, seed: int, mix: dict[str, float] | None = None) -> list[tuple[str, int]]:
    """The requests in order: (kind, index into GOOD or BAD); `mix` weighs the kinds (default KINDS)."""
    rnd = random.Random(seed)
    mix = mix or KINDS
    kinds = rnd.choices(list(mix), weights=list(mix.values()), k=requests)
    return [(k, rnd.randrange(len(BAD) if k == "bad" else len(GOOD))) for k in kinds]


def _lines(content: bytes) -> list[dict]:
    return [json.loads(line) for line in content.decode("utf-8").splitlines() if line.strip()]


def hang_up(client: TorchServe, model: str) -> int:
    """A streamed request whose client closes the connection after the first chunk; returns the status."""
    parts = urlsplit(client.inference_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request("POST", f"/predictions/{model}", body=json.dumps(HANG_UP).encode(),
                     headers={"Content-Type": JSON, "Authorization": f"Bearer {client.key('inference')}"})
        response = conn.getresponse()
        response.read(1)  # the first bytes of the first chunk
        return response.status
    finally:
        conn.close()  # mid-stream: the server learns it when it writes the next chunk


def one(client: TorchServe, model: str, kind: str, index: int, expected: list[list[int]]) -> tuple[int, str | None]:
    """Send one request of the plan; returns (status, what was wrong or None)."""
    if kind == "hang-up":
        status = hang_up(client, model)
        return status, None if status == 200 else f"status {status}"
    if kind == "report":
        report = client.report(model)
        in_use = report["load"]["slots_in_use"]
        return 200, None if 0 <= in_use <= report["pool"]["max_slots"] else f"load {report['load']}"
    if kind == "bad":
        body, content_type, status = BAD[index]
        r = client.predict_raw(model, data=body, headers={"Content-Type": content_type})
        error = r.json()
        ok = r.status_code == status and error.get("code") == status and isinstance(error.get("field"), str)
        return r.status_code, None if ok else f"expected {status}, got {r.status_code}: {r.text[:200]}"
    body = {**GOOD[index], "return_token_ids": True, **({"stream": True} if kind == "stream" else {})}
    r = client.predict_raw(model, body)
    if r.status_code != 200:
        return r.status_code, r.text[:200]
    answer = _lines(r.content)[-1]
    if answer.get("token_ids") != expected[index]:
        return 200, f"tokens {answer.get('token_ids')} != {expected[index]}"
    if kind == "stream" and "".join(line.get("text", "") for line in _lines(r.content)) != answer["generated_text"]:
        return 200, "the streamed chunks do not join to the text"
    return 200, None


CANCELLED = "the client went away after"  # what the handler logs when it cancels a hung-up request


def run_soak(client: TorchServe, model: str, worker_pid: int, expected: list[list[int]], *, requests: int,
             clients: int = 16, seed: int = 0, sample_every_s: float = 0.25, warmup_fraction: float = 0.2,
             workers=None, log=None, mix: dict[str, float] | None = None) -> SoakResult:
    """Send the plan from `clients` threads while sampling the worker; then wait for it to be idle.

    workers: `Server.workers`, to read the worker's pid afterwards; log: a callable giving the worker log's text,
    to count the cancelled hang-ups."""
    log_before = log().count(CANCELLED) if log else 0
    result = SoakResult(worker_pid_before=worker_pid, warmup_fraction=warmup_fraction)
    process = psutil.Process(worker_pid)
    lock, stop = threading.Lock(), threading.Event()
    todo = iter(enumerate(plan(requests, seed, mix)))
    done = [0]
    start = time.monotonic()

    def sample() -> None:
        with process.oneshot():
            result.samples.append(Sample(time.monotonic() - start, done[0], process.memory_info().rss / MIB,
                                         process.num_fds(), len(process.open_files()), process.num_threads()))

    def sampler() -> None:
        while not stop.wait(sample_every_s):
            sample()

    def client_thread() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            _, (kind, index) = item
            try:
                status, wrong = one(client, model, kind, index, expected)
            except Exception as err:  # noqa: BLE001 - a lost request: counted
                status, wrong = "error", f"{type(err).__name__}: {err}"
            with lock:
                done[0] += 1
                result.sent[kind] += 1
                result.statuses[(kind, status)] += 1
                if wrong:
                    result.wrong.append((kind, index, wrong))

    sample()
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for _ in range(clients):
            pool.submit(client_thread)
    result.seconds = time.monotonic() - start
    stop.set()
    watcher.join()
    time.sleep(1.0)  # the last hung-up streams: the frontend drops them at their next chunk
    result.idle_load = client.report(model)["load"]  # a call of its own: it cancels what was left, then reports
    sample()
    if workers is not None:
        [worker] = workers(model)
        result.worker_pid_after = worker["pid"]
    if log is not None:  # the worker's lines reach the log through the frontend: give the last ones a moment
        deadline = time.monotonic() + 10
        while True:
            result.cancelled = log().count(CANCELLED) - log_before
            if result.cancelled >= result.sent["hang-up"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    return result


def start_soak_server(root: Path, store: Path, torch_threads: int | None):
    """A TorchServe for the soak; `torch_threads` sets OMP_NUM_THREADS for its worker (None: as the environment
    has it). On a busy 2-core machine torch's default of one thread per core makes each step of the tiny model
    wait on the other thread: one thread served 81 requests/s where two served 10 (see docs/benchmarks.md)."""
    import os

    from gpt2ops.local_server import start_server

    saved = os.environ.get("OMP_NUM_THREADS")
    if torch_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(torch_threads)  # the frontend passes its environment to the worker
    try:
        return start_server(root, store)
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-every", type=float, default=0.5, help="seconds between samples of the worker")
    parser.add_argument("--warmup-fraction", type=float, default=0.2)
    parser.add_argument("--rss-bound-mib", type=float, default=16.0, help="largest RSS growth after warm-up")
    parser.add_argument("--fd-bound", type=int, default=4, help="largest growth of open descriptors after warm-up")
    parser.add_argument("--mix", default=",".join(f"{k}={v}" for k, v in KINDS.items()),
                        help="weights of the kinds of request, e.g. bad=1 or answer=1,hang-up=1")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the worker (0: leave the environment's)")
    args = parser.parse_args(argv)

    from gpt2ops.local_server import REPO, build_archive
    from gpt2ops.tiny_model import TINY_DEFAULTS, build_tiny_model

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tmp)
        model_dir = root / "tiny-gpt2"
        build_tiny_model(model_dir, corpus=REPO / "data" / "corpus.txt", seed=TINY_DEFAULTS["seed"])
        store = root / "model_store"
        store.mkdir()
        build_archive(model_dir, "tiny-gpt2", store)
        expected = expected_tokens(model_dir)
        server = start_soak_server(root / "ts", store, args.torch_threads or None)
        try:
            server.client.register("tiny-gpt2.mar", "tiny-gpt2")
            [worker] = server.workers("tiny-gpt2")
            result = run_soak(server.client, "tiny-gpt2", worker["pid"], expected, requests=args.requests,
                              clients=args.clients, seed=args.seed, sample_every_s=args.sample_every,
                              warmup_fraction=args.warmup_fraction, workers=server.workers,
                              log=lambda: server.log("model_log.log"),
                              mix={k: float(v) for k, v in (item.split("=") for item in args.mix.split(","))})
        finally:
            server.stop()
    import os
    import platform

    print(f"# soak on {platform.node()} ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}), TorchServe "
          f"0.12.0, tiny GPT-2 on CPU ({args.torch_threads or 'default'} torch threads), continuous batching, "
          f"batchSize 8, {args.clients} clients")
    print(result.table())
    print()
    print(result.timeline())
    problems = soak_problems(result, args.rss_bound_mib, args.fd_bound)
    print()
    print("bounds: RSS growth after warm-up <= %.0f MiB, descriptors <= +%d: %s" % (
        args.rss_bound_mib, args.fd_bound, "held" if not problems else "; ".join(problems)))
    return 1 if problems else 0


def soak_problems(result: SoakResult, rss_bound_mib: float, fd_bound: int) -> list[str]:
    """What the soak must not show: lost or wrong answers, a restarted worker, a busy idle engine, growth."""
    problems = []
    if result.wrong:
        problems.append(f"{len(result.wrong)} lost or wrong, e.g. {result.wrong[:3]}")
    if result.worker_pid_after and result.worker_pid_after != result.worker_pid_before:
        problems.append(f"the worker restarted ({result.worker_pid_before} -> {result.worker_pid_after})")
    held = {k: result.idle_load.get(k) for k in ("slots_in_use", "requests_waiting", "requests_tracked", "jobs_open")}
    if set(held.values()) != {0}:
        problems.append(f"not idle at the end: {result.idle_load}")
    if result.rss_growth_mib() > rss_bound_mib:
        problems.append(f"RSS grew {result.rss_growth_mib():.1f} MiB after warm-up (bound {rss_bound_mib} MiB)")
    if result.fd_growth() > fd_bound:
        problems.append(f"descriptors grew by {result.fd_growth()} after warm-up (bound {fd_bound})")
    return problems


if __name__ == "__main__":
    sys.exit(main())
