"""End to end: Debian's Prometheus scrapes the real TorchServe of the e2e session, a mixed load goes in (native and
OpenAI, streamed and not, one client that leaves, two bad requests), and what Prometheus holds is checked against
what the clients saw; then the autoscaler's queries and every panel of the Grafana dashboard run against it.

Prometheus scrapes every second, with the `namespace` and `pod` labels Kubernetes' service discovery would put on
the pod's series (static labels here). Counts are exact: each is the difference of two instant queries (`@`), one
just before the load and one after every answer was in and published.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from gpt2ops import prometheus
from gpt2ops.client import read_keys, read_properties
from gpt2ops.dashboard import DASHBOARD, all_values, panel_queries
from handler.serving.metrics import BUCKETS, FINISH_REASONS, STEP_PATHS
from tests.e2e.conftest import MODEL
from tests.readme import REPO

ADAPTER_VALUES = REPO / "deploy" / "kubernetes" / "prometheus-adapter" / "values.yaml"

if not prometheus.available():
    pytest.fail("the Prometheus test needs Debian's prometheus: run `make venv` (it installs it with apt-get)",
                pytrace=False)


@pytest.fixture(scope="module")
def prom(server, tmp_path_factory):
    metrics = read_properties(server.config)["metrics_address"].split("//", 1)[1]
    p = prometheus.Prometheus(tmp_path_factory.mktemp("prometheus"), metrics).start()
    try:
        assert Ours(p).wait_for("count(gpt2_slots)", lambda v: v >= 1, timeout_s=60) == 1, p.log()
        yield p
    finally:
        p.stop()


_SELECTOR = re.compile(r"\b(gpt2_\w+|ts_queue_latency_microseconds)(\{([^}]*)\})?")


def mine(expr: str) -> str:
    """`expr` narrowed to this module's model: the session's TorchServe has other models registered by other
    tests (each with its own series), idle while this test runs."""
    def narrow(m: re.Match) -> str:
        label = "model_name" if m[1].startswith("ts_") else "ModelName"
        return f'{m[1]}{{{label}="{MODEL}"{"," + m[3] if m[3] else ""}}}'

    return _SELECTOR.sub(narrow, expr)


class Ours:
    """The Prometheus API with every query narrowed to this module's model (`mine`)."""

    def __init__(self, prom: prometheus.Prometheus):
        self.prom = prom

    def value(self, expr: str, at: float | None = None):
        return self.prom.value(mine(expr), at)

    def query(self, expr: str, at: float | None = None):
        return self.prom.query(mine(expr), at)

    def query_range(self, expr: str, start: float, end: float):
        return self.prom.query_range(mine(expr), start, end)

    def wait_for(self, expr: str, predicate, timeout_s: float = 30):
        return self.prom.wait_for(mine(expr), predicate, timeout_s)


@dataclass
class Sent:
    api: str
    stream: bool
    body: dict
    status: int = 0
    first_s: float | None = None  # the first line (streamed) or the whole answer (not streamed)
    total_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    lines: list = field(default_factory=list)


class Load:
    def __init__(self, server):
        self.base = f"{server.client.inference_url}/predictions/{MODEL}"
        self.headers = {"Authorization": f"Bearer {read_keys(server.run_dir / 'key_file.json')['inference']}",
                        "Content-Type": "application/json"}

    def send(self, sent: Sent) -> Sent:
        url = self.base + ("/1.0/v1/completions" if sent.api == "openai" else "")
        start = time.monotonic()
        with requests.post(url, headers=self.headers, data=json.dumps(sent.body), stream=sent.stream,
                           timeout=120) as r:
            sent.status = r.status_code
            if not sent.stream:
                sent.first_s = sent.total_s = time.monotonic() - start
                self._final(sent, r.json())
                return sent
            for line in r.iter_lines():
                if not line:
                    continue
                if sent.first_s is None:
                    sent.first_s = time.monotonic() - start
                sent.lines.append(line.decode())
                if sent.cancelled:
                    break  # the client goes away after its first line
        sent.total_s = time.monotonic() - start
        if not sent.cancelled:
            self._stream_end(sent)
        return sent

    @staticmethod
    def _final(sent: Sent, body: dict) -> None:
        if sent.status != 200:
            return
        if sent.api == "openai":
            sent.prompt_tokens, sent.completion_tokens = body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]
            sent.finish_reason = body["choices"][0]["finish_reason"]
        else:
            sent.prompt_tokens, sent.completion_tokens = body["prompt_tokens"], body["completion_tokens"]
            sent.finish_reason = body["finish_reason"]

    def _stream_end(self, sent: Sent) -> None:
        if sent.api == "native":
            self._final(sent, json.loads(sent.lines[-1]))
            return
        events = [json.loads(line[len("data: "):]) for line in sent.lines if line != "data: [DONE]"]
        sent.finish_reason = next(c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"])
        usage = events[-1]["usage"]
        sent.prompt_tokens, sent.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]


FILLERS, FILL_S = 2, 5.0


def fill(load: "Load", until: float) -> list[Sent]:
    """Requests one after the other until `until` (time.time())."""
    out = []
    while time.time() < until:
        out.append(load.send(Sent("native", False, {"prompt": "慢一点", "max_new_tokens": 32, "decoding": "greedy",
                                                    "ignore_eos": True})))
    return out


def mixed_load(leave_after_at_most: int) -> list[Sent]:
    native = [Sent("native", False, {"prompt": p, "max_new_tokens": n, "decoding": "greedy"})
              for p, n in (("你是谁?", 16), ("hello", 24), ("今天", 32))]
    native.append(Sent("native", False, {"prompt": "Once upon a time", "max_new_tokens": 20}))  # contrastive
    native += [Sent("native", True, {"prompt": p, "max_new_tokens": 24, "decoding": "greedy", "stream": True})
               for p in ("你好", "the model", "一个")]
    openai = [Sent("openai", False, {"model": MODEL, "prompt": p, "max_tokens": n, "temperature": 0})
              for p, n in (("你是谁?", 16), ("天气", 24), ("a b c", 8))]
    openai += [Sent("openai", True, {"model": MODEL, "prompt": p, "max_tokens": 20, "temperature": 0, "stream": True,
                                     "stream_options": {"include_usage": True}}) for p in ("你是", "hi", "模型")]
    leaves = Sent("native", True, {"prompt": "leave early", "max_new_tokens": leave_after_at_most, "decoding": "greedy",
                                   "ignore_eos": True, "stream": True}, cancelled=True)
    bad = [Sent("native", False, {"prompt": "x", "max_new_tokens": -1}),
           Sent("openai", False, {"model": MODEL, "prompt": "x", "max_tokens": "many"})]
    return [leaves, *native, *openai, *bad]


@dataclass
class Run:
    prom: prometheus.Prometheus
    sent: list[Sent]
    before: float
    after: float
    load_start: float
    load_end: float
    cancelled_prompt_tokens: int

    @property
    def ours(self) -> Ours:
        return Ours(self.prom)

    def delta(self, expr: str) -> float:
        """How much sum(expr) grew over the load (exact: two instant queries), for this module's model."""
        at = [self.ours.value(f"sum({expr})", at=t) for t in (self.before, self.after)]
        return (at[1] or 0.0) - (at[0] or 0.0)

    def served(self) -> list[Sent]:
        return [s for s in self.sent if s.status == 200 and not s.cancelled]


@pytest.fixture(scope="module")
def run(prom, server, tokenizer):
    idle = "sum(gpt2_slots_in_use) + sum(gpt2_requests_waiting)"
    ours = Ours(prom)
    assert ours.wait_for(idle, lambda v: v == 0, timeout_s=60) == 0
    time.sleep(3)  # the worker's last publication (every second) and a scrape after it
    before = time.time()
    time.sleep(1.5)
    # the client that leaves asks for as many tokens as the worker can make within its deadline (here, on a busy
    # machine, maybe fewer than the limit), so that it is still running when its client goes
    most = min(200, server.client.report(MODEL)["max_new_tokens_within_timeout"])
    load, sent = Load(server), mixed_load(most)
    load_start = time.time()
    with ThreadPoolExecutor(len(sent) + FILLERS) as pool:
        # beside the mix, a few clients keep slots busy for FILL_S at least: on a fast machine the mix alone ends
        # within a second, between two publications of the gauges, and a gauge sampled every second can miss it
        filling = [pool.submit(fill, load, load_start + FILL_S) for _ in range(FILLERS)]
        done = list(pool.map(load.send, sent)) + [s for f in filling for s in f.result()]
    load_end = time.time()
    expected = sum(1 for s in done if s.status == 200)  # the one that left counts (as cancelled)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = ours.value(f"sum(gpt2_requests_finished_total) - sum(gpt2_requests_finished_total @ {before:.3f})")
        if now is not None and now >= expected and ours.value(idle) == 0:
            break
        time.sleep(0.5)
    time.sleep(2.5)  # the gauges' last values and one more scrape
    cancelled = len(tokenizer.encode(done[0].body["prompt"]))
    return Run(prom, done, before, time.time(), load_start, load_end, cancelled)


def test_the_load_went_as_planned(run):
    assert [s.status for s in run.sent[:16]] == [200] * 14 + [400, 400]
    assert all(s.status == 200 for s in run.sent[16:]) and len(run.sent) > 16  # the fillers
    leaves = run.sent[0]
    assert leaves.cancelled and len(leaves.lines) == 1


def test_finished_requests_by_api_and_reason_match_what_was_sent(run):
    finished = {(api, reason): run.delta(f'gpt2_requests_finished_total{{api="{api}",finish_reason="{reason}"}}')
                for api in ("native", "openai") for reason in FINISH_REASONS}
    served = run.served()
    for reason in ("eos", "length"):  # the native API reports the engine's reason as is
        assert finished["native", reason] == sum(1 for s in served if s.api == "native" and s.finish_reason == reason)
    assert finished["native", "cancelled"] == 1
    # OpenAI's finish_reason: "length", or "stop" for an end-of-text token or a stop string
    assert finished["openai", "length"] == sum(1 for s in served if s.api == "openai" and s.finish_reason == "length")
    assert finished["openai", "eos"] + finished["openai", "stop"] == \
        sum(1 for s in served if s.api == "openai" and s.finish_reason == "stop")
    assert finished["native", "stop"] == finished["native", "timeout"] == finished["native", "error"] == 0
    assert sum(finished.values()) == len(served) + 1
    assert run.delta('gpt2_requests_rejected_total{api="native",code="400"}') == 1
    assert run.delta('gpt2_requests_rejected_total{api="openai",code="400"}') == 1
    assert run.delta("gpt2_requests_rejected_total") == 2


def test_token_counters_match_the_answers(run):
    served = run.served()
    prompt = sum(s.prompt_tokens for s in served) + run.cancelled_prompt_tokens
    assert run.delta("gpt2_prompt_tokens_total") == prompt
    assert run.delta("gpt2_request_prompt_tokens_sum") == prompt
    answered = sum(s.completion_tokens for s in served)
    generated = run.delta("gpt2_generation_tokens_total")
    kept = run.delta("gpt2_request_generation_tokens_sum")
    # the client that left had some of its tokens when it went; no stop strings: the engine keeps all it generates
    assert answered + 1 <= kept < answered + run.sent[0].body["max_new_tokens"]
    assert generated == kept


def test_histogram_counts_match_the_requests(run):
    served = run.served()
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prompt_tokens", "request_generation_tokens"):
        assert run.delta(f"gpt2_{name}_count") == len(served) + 1, name  # and the one that left
        assert run.delta(f'gpt2_{name}_bucket{{le="+Inf"}}') == len(served) + 1, name
    # per output token: requests with two tokens or more that were not cancelled
    assert run.delta("gpt2_time_per_output_token_seconds_count") == sum(1 for s in served if s.completion_tokens >= 2)
    # cumulative: each bucket holds at least the one below it
    for name, bounds in BUCKETS.items():
        counts = [run.delta(f'gpt2_{name}_bucket{{le="{b!r}"}}') for b in bounds]
        assert counts == sorted(counts), name
    lengths = [s.completion_tokens for s in served]
    assert run.delta('gpt2_request_generation_tokens_bucket{le="32.0"}') >= sum(1 for n in lengths if n <= 32)


def _bucket(value: float, bounds: tuple[float, ...]) -> tuple[float, float]:
    """The (lower, upper] edges of the bucket that holds `value`."""
    lower = 0.0
    for b in bounds:
        if value <= b:
            return lower, b
        lower = b
    return lower, float("inf")


def test_ttft_quantiles_lie_within_what_the_clients_measured(run):
    """Each request's first token reaches the worker before its client sees it (the frontend and HTTP are
    between), so the worker's figures are bounded above by the clients'. The clients give no lower bound: the
    worker's clock starts when the request reaches it, after the frontend's queue, which under this load holds
    requests for up to seconds (a bound of one bucket below the clients' fastest failed once here)."""
    bounds = BUCKETS["time_to_first_token_seconds"]
    firsts = sorted(s.first_s for s in run.sent if s.status == 200)
    assert run.delta("gpt2_time_to_first_token_seconds_sum") <= sum(firsts)
    at = f"@ {run.after:.3f}"
    was = f"@ {run.before:.3f}"
    increase = (f"(sum by (le) (gpt2_time_to_first_token_seconds_bucket {at})"
                f" - sum by (le) (gpt2_time_to_first_token_seconds_bucket {was}))")
    for q in (0.5, 0.9, 0.99):
        got = run.ours.value(f"histogram_quantile({q}, {increase})")
        client = firsts[min(len(firsts) - 1, int(q * len(firsts)))]
        assert 0.0 < got <= _bucket(client, bounds)[1], (q, got, firsts)
    assert run.ours.value(f"histogram_quantile(0.5, {increase})") <= \
        run.ours.value(f"histogram_quantile(0.99, {increase})")


def test_gauges_and_the_series_published_at_start(run, server):
    report = server.client.report(MODEL)
    pool = report["pool"]
    assert run.ours.value("sum(gpt2_slots)") == pool["max_slots"]
    assert run.ours.value("sum(gpt2_kv_positions)") == pool["max_slots"] * pool["max_len"]
    assert run.ours.value("sum(gpt2_slots_in_use)") == run.ours.value("sum(gpt2_kv_positions_in_use)") == 0
    assert run.ours.value("sum(gpt2_requests_waiting)") == 0
    paths = {r["metric"]["path"]: float(r["value"][1]) for r in run.ours.query("gpt2_decode_step_path")}
    assert set(paths) == set(STEP_PATHS) and paths[report["decode_step"]["live"]] == 1 and sum(paths.values()) == 1
    [info] = run.ours.query("gpt2_decode_step_info")
    assert info["metric"]["path"] == report["decode_step"]["path"]
    parts = {r["metric"]["part"]: float(r["value"][1]) for r in run.ours.query("gpt2_worker_memory_bytes")}
    assert parts["slot_pool"] == pytest.approx(report["memory"]["slot_pool_mib"] * 2 ** 20, rel=0.01)
    # during the load slots were taken (and TorchServe's queue held what did not fit: 16 requests and more, 8 slots)
    in_use = run.ours.query_range("sum(gpt2_slots_in_use)", run.load_start, run.load_end + 2)
    assert max(float(v) for _, v in in_use[0]["values"]) >= 1
    assert run.delta("ts_queue_latency_microseconds") > 0
    # every series carries the pod's labels, as the adapter needs
    for r in run.prom.query('{__name__=~"gpt2_.*"}'):
        assert r["metric"]["namespace"] == "gpt2-serve" and r["metric"]["pod"] == "gpt2-serve-0", r["metric"]


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


@pytest.mark.parametrize("rule", adapter_rules(), ids=lambda r: r["name"]["as"])
def test_adapter_rules_give_the_hpa_a_value(run, rule):
    """Each rule as prometheus-adapter runs it: its seriesQuery finds the pod's series (discovery), the name
    matches, and its metricsQuery, filled for the pod, gives one value per pod, over the load and after it."""
    labels = prometheus.POD_LABELS
    found = run.prom.series(rule["seriesQuery"], start=run.before, end=run.after)
    assert found and all(s["namespace"] == labels["namespace"] and s["pod"] == labels["pod"] for s in found)
    series = prometheus.adapter_series_name(rule["seriesQuery"])
    assert __import__("re").fullmatch(rule["name"]["matches"].strip("^$"), series)
    for pods in ([labels["pod"]], [labels["pod"], "gpt2-serve-1"]):  # one pod, and the HPA's list of pods
        query = prometheus.adapter_query(rule["metricsQuery"], series, labels["namespace"], pods)
        [result] = run.prom.query(query, at=run.after)
        assert result["metric"] == {"pod": labels["pod"]}
        idle = float(result["value"][1])
        assert idle >= 0
        over_load = run.prom.query_range(query, run.load_start, run.load_end + 2)
        assert len(over_load) == 1 and max(float(v) for _, v in over_load[0]["values"]) > 0, query
    if rule["name"]["as"] == "gpt2_engine_slot_utilization":
        assert idle == 0 and max(float(v) for _, v in over_load[0]["values"]) <= 1


def test_every_dashboard_panel_has_data(run):
    """Every query of every panel, with Grafana's variables expanded, over the load's time range, as Grafana
    asks for a graph: each gives at least one series with at least one number."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = panel_queries(dashboard)
    assert len({title for title, _ in queries}) >= 9
    empty = []
    results = {}
    for title, expr in queries:
        got = run.prom.query_range(prometheus.grafana_expr(expr, variables=all_values(dashboard)), run.load_start - 5,
                                   run.after)
        values = [float(v) for s in got for _, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")]
        results[(title, expr)] = got
        if not values:
            empty.append((title, expr))
    assert not empty, empty
    out = os.environ.get("GPT2_DASHBOARD_PNG")  # the README's picture: drawn from these very results
    if out:
        from gpt2ops.dashboard import render

        render(dashboard, results, Path(out), note=os.environ.get("GPT2_DASHBOARD_NOTE", ""))
