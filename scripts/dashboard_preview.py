#!/usr/bin/env python3
"""The Grafana dashboard's picture and the figures behind the alert thresholds, from a real run on this machine.

    .venv/bin/python scripts/dashboard_preview.py --out docs/images/dashboard.png     # ~3 minutes

Starts a TorchServe with the tiny model on free loopback ports (as the e2e tests do) and Debian's Prometheus
scraping it every second, sends `--seconds` of Poisson arrivals at `--rate` requests/s (native and OpenAI,
streamed and not, 8-64 new tokens, contrastive search or greedy), then:

- runs every panel query of deploy/grafana/gpt2-serving.json over the run (Grafana's variables expanded as
  Grafana would for this range) and draws them (gpt2ops.dashboard.render), labelled with machine and date;
- prints the quantiles over the whole run of the histograms an operator alerts on (docs/metrics.md, Alerts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gpt2ops import prometheus  # noqa: E402
from gpt2ops.client import read_keys, read_properties  # noqa: E402
from gpt2ops.dashboard import DASHBOARD, all_values, panel_queries, render  # noqa: E402
from gpt2ops.local_server import build_archive, start_server  # noqa: E402

MODEL = "tiny-gpt2"
ALERTED = ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
           "request_queue_time_seconds")


def one_request(base: str, headers: dict, rng: random.Random) -> None:
    n = rng.choice((8, 16, 32, 64))
    stream = rng.random() < 0.5
    if rng.random() < 0.5:
        url, body = base, {"prompt": "你是谁?" * rng.randint(1, 8), "max_new_tokens": n, "ignore_eos": True,
                           "stream": stream, **({"decoding": "greedy"} if rng.random() < 0.5 else {})}
    else:
        url, body = base + "/1.0/v1/completions", {"model": MODEL, "prompt": "今天" * rng.randint(1, 8),
                                                   "max_tokens": n, "temperature": 0, "stream": stream}
    try:
        with requests.post(url, headers=headers, data=json.dumps(body), stream=stream, timeout=120) as r:
            for _ in r.iter_lines():
                pass
    except requests.RequestException:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "dashboard.png")
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--model-dir", type=Path, default=REPO / "artifacts" / "models" / MODEL)
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").exists():
        print(f"error: no model in {args.model_dir}; run `make model` first", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="dashboard-"))
    store = root / "model_store"
    store.mkdir()
    build_archive(args.model_dir, MODEL, store)
    server = start_server(root / "ts", store)
    prom = None
    try:
        server.client.register(f"{MODEL}.mar", MODEL, workers=1)
        target = read_properties(server.config)["metrics_address"].split("//", 1)[1]
        prom = prometheus.Prometheus(root / "prometheus", target).start()
        prom.wait_for("count(gpt2_slots)", lambda v: v >= 1, timeout_s=60)
        time.sleep(3)
        headers = {"Authorization": f"Bearer {read_keys(server.run_dir / 'key_file.json')['inference']}",
                   "Content-Type": "application/json"}
        base = f"{server.client.inference_url}/predictions/{MODEL}"
        rng = random.Random(20)
        load = os.getloadavg()[0]
        start = time.time()
        threads = []
        while time.time() - start < args.seconds:
            t = threading.Thread(target=one_request, args=(base, headers, random.Random(rng.random())))
            t.start()
            threads.append(t)
            time.sleep(rng.expovariate(args.rate))
        for t in threads:
            t.join()
        time.sleep(4)
        end = time.time()
        dashboard = json.loads(DASHBOARD.read_text())
        results = {}
        for title, expr in panel_queries(dashboard):
            results[(title, expr)] = prom.query_range(prometheus.grafana_expr(expr, variables=all_values(dashboard)),
                                                      start - 5, end, step_s=1)
        when = datetime.now(timezone.utc)
        note = (f"{platform.node()}, {os.cpu_count()} CPUs, tiny model, {args.rate:g} requests/s for "
                f"{args.seconds:.0f} s, {when:%Y-%m-%d}")
        render(dashboard, results, args.out, note=note)
        window = f"{int(end - start) + 5}s"
        print(f"# {note}; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
        print(f"# drawn: {args.out}")
        print(f"{'histogram':34} {'p50':>8} {'p90':>8} {'p99':>8}   (over the whole run)")
        for name in ALERTED:
            qs = [prom.value(f"histogram_quantile({q}, sum by (le) (increase(gpt2_{name}_bucket[{window}])))",
                             at=end) for q in (0.5, 0.9, 0.99)]
            print(f"{name:34} " + " ".join(f"{q:8.3f}" for q in qs))
        tokens = prom.value(f"sum(increase(gpt2_generation_tokens_total[{window}]))", at=end)
        finished = prom.query(f"sum by (finish_reason) (increase(gpt2_requests_finished_total[{window}]))", at=end)
        print(f"generated tokens/s {tokens / (end - start):.1f}; finished: "
              + ", ".join(f"{r['metric']['finish_reason']} {float(r['value'][1]):.0f}" for r in finished
                          if float(r["value"][1]) > 0.5))
        queue = prom.value(f"sum(increase(ts_queue_latency_microseconds[{window}])) / 1e6 / {end - start:.1f}", at=end)
        print(f"TorchServe queue, average length over the run: {queue:.2f}")
        import yaml

        rules = yaml.safe_load((REPO / "deploy/kubernetes/prometheus-adapter/values.yaml").read_text())["rules"]
        for rule in rules["custom"]:
            series = prometheus.adapter_series_name(rule["seriesQuery"])
            query = prometheus.adapter_query(rule["metricsQuery"], series, prometheus.POD_LABELS["namespace"],
                                             [prometheus.POD_LABELS["pod"]])
            got = prom.query_range(query, start, end, step_s=1)
            values = [float(v) for s in got for _, v in s["values"]]
            print(f"adapter {rule['name']['as']}: max {max(values):.2f}, mean {sum(values) / len(values):.2f} "
                  f"over the run")
        report = server.client.report(MODEL)
        print(f"the worker's own step time at the full pool (warm-up): {report['step_ms_at_full_pool']} ms; "
              f"slots {report['pool']['max_slots']}")
    finally:
        if prom is not None:
            prom.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
