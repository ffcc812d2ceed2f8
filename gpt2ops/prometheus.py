"""A real Prometheus on loopback that scrapes a TorchServe's metrics port, and the queries others run against it:
prometheus-adapter's rules as the adapter fills them, and a Grafana dashboard's panels as Grafana expands them.

Used by the end-to-end test (tests/e2e/test_prometheus.py) and the dashboard's picture (gpt2ops.dashboard).
The binary is Debian's `prometheus` package (2.42; `make venv` installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from gpt2ops.errors import OpsError

BINARY = "/usr/bin/prometheus"
# the labels Kubernetes service discovery (or the PodMonitor) puts on a pod's series; here as static labels
POD_LABELS = {"namespace": "gpt2-serve", "pod": "gpt2-serve-0"}


def available() -> bool:
    return Path(BINARY).exists() or shutil.which("prometheus") is not None


@dataclass
class Prometheus:
    """`prometheus` scraping `target` (host:port of a metrics endpoint) every `interval_s`, its series labelled
    with `labels` (as Kubernetes' service discovery would), serving its API on a free loopback port."""

    root: Path
    target: str
    labels: dict[str, str] = field(default_factory=lambda: dict(POD_LABELS))
    interval_s: int = 1
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict:
        every = f"{self.interval_s}s"
        return {"global": {"scrape_interval": every, "evaluation_interval": every},
                "scrape_configs": [{"job_name": "gpt2-serve", "scrape_interval": every, "scrape_timeout": every,
                                    "metrics_path": "/metrics",
                                    "static_configs": [{"targets": [self.target], "labels": self.labels}]}]}

    def start(self, timeout_s: float = 60) -> "Prometheus":
        from gpt2ops.local_server import free_port

        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config()))
        self.port = self.port or free_port()
        binary = BINARY if Path(BINARY).exists() else shutil.which("prometheus")
        if binary is None:
            raise OpsError("prometheus is not installed: apt-get install prometheus (make venv does)")
        log = open(self.root / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise OpsError(f"prometheus exited ({self.proc.returncode}): {self.log()[-2000:]}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise OpsError(f"prometheus not ready in {timeout_s:.0f} s: {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.root / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    # ---- the HTTP API ----

    def _get(self, path: str, **params) -> dict:
        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise OpsError(f"prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant query: [{"metric": labels, "value": [t, "v"]}, ...] (a scalar comes as one such row)."""
        data = self._get("query", query=expr, **({} if at is None else {"time": f"{at:.3f}"}))
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The value of a query that gives one series (None: no series)."""
        result = self.query(expr, at)
        if not result:
            return None
        if len(result) > 1:
            raise OpsError(f"{expr} gave {len(result)} series, one expected: {[r['metric'] for r in result]}")
        return float(result[0]["value"][1])

    def query_range(self, expr: str, start: float, end: float, step_s: float = 1.0) -> list[dict]:
        return self._get("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}",
                         step=f"{step_s:g}")["result"]

    def series(self, match: str, start: float | None = None, end: float | None = None) -> list[dict]:
        params = {"match[]": match}
        if start is not None:
            params.update(start=f"{start:.3f}", end=f"{end or time.time():.3f}")
        return self._get("series", **params)

    def targets_up(self) -> bool:
        return all(t["health"] == "up" for t in self._get("targets")["activeTargets"])

    def wait_for(self, expr: str, predicate, timeout_s: float = 30, every_s: float = 0.5):
        """Poll `expr` until `predicate(value)`; returns the last value (None: no series)."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.value(expr)
            if (got is not None and predicate(got)) or time.monotonic() > deadline:
                return got
            time.sleep(every_s)


# ---- prometheus-adapter's templates, filled as the adapter fills them ----

_ADAPTER_VARIABLE = re.compile(r"<<\s*\.(\w+)\s*>>")


def adapter_query(template: str, series: str, namespace: str, pods: list[str]) -> str:
    """A rule's metricsQuery as prometheus-adapter fills it for `pods` of `namespace` (its pkg/naming/
    metrics_query.go, `Build`): LabelMatchers `namespace="ns",pod="p"` (`pod=~"a|b"` for several pods),
    GroupBy `pod`. Any other template variable is an error here, as the rules must not need one."""
    pod = f'pod="{pods[0]}"' if len(pods) == 1 else f'pod=~"{"|".join(pods)}"'
    values = {"Series": series, "LabelMatchers": f'namespace="{namespace}",{pod}', "GroupBy": "pod"}

    def fill(match: re.Match) -> str:
        if match[1] not in values:
            raise OpsError(f"the adapter template uses <<.{match[1]}>>, which this check does not fill")
        return values[match[1]]

    return _ADAPTER_VARIABLE.sub(fill, template)


def adapter_series_name(series_query: str) -> str:
    """The metric name of a rule's seriesQuery (`name{...}`)."""
    return series_query.split("{", 1)[0].strip()


# ---- Grafana's variables, expanded as Grafana expands them ----


def grafana_expr(expr: str, scrape_interval_s: int = 1, variables: dict[str, str] | None = None) -> str:
    """A panel's PromQL with Grafana's variables replaced: `$__rate_interval` as Grafana computes it for a short
    time range (four scrape intervals), `$__interval` as the scrape interval, the dashboard's own variables from
    `variables` (default: every template variable matches everything)."""
    out = expr.replace("$__rate_interval", f"{4 * scrape_interval_s}s").replace("${__rate_interval}",
                                                                                  f"{4 * scrape_interval_s}s")
    out = out.replace("$__interval", f"{scrape_interval_s}s").replace("${__interval}", f"{scrape_interval_s}s")
    for name, value in sorted((variables or {}).items(), key=lambda kv: -len(kv[0])):
        out = out.replace("${" + name + "}", value).replace("$" + name, value)
    if "$" in out:
        raise OpsError(f"a variable is left in {out!r}")
    return out
