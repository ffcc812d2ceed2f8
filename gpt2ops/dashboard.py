"""The Grafana dashboard (deploy/grafana/gpt2-serving.json): its panels' queries, and a picture of it drawn with
matplotlib from those very queries' results against a real Prometheus (tests/e2e/test_prometheus.py draws it when
GPT2_DASHBOARD_PNG names a file; docs/metrics.md shows it). The picture is not Grafana: one plot per panel, the
panel's queries as lines (bars for the bar gauge), its legend format filled with each series' labels.
"""

from __future__ import annotations

import re
from pathlib import Path

from gpt2ops import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "gpt2-serving.json"


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, rows' panels included."""
    out = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def all_values(dashboard: dict) -> dict[str, str]:
    """Each query variable of the dashboard at its "All" value (what Grafana substitutes when All is chosen)."""
    return {v["name"]: v.get("allValue") or ".*" for v in dashboard.get("templating", {}).get("list", [])
            if v.get("type") == "query"}


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row keeps its panels inside
    return [p for p in out if p.get("type") != "row"]


def _legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m[1], ""), fmt or "") or str(labels)


def render(dashboard: dict, results: dict[tuple[str, str], list[dict]], out: Path, note: str = "") -> Path:
    """Draw every panel from `results`: {(panel title, expr): Prometheus range-query result}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(dashboard)
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 2.9 * rows), squeeze=False)
    start = min((float(v[0]) for res in results.values() for s in res for v in s["values"]), default=0.0)
    for ax, panel in zip(axes.flat, panels):
        ax.set_title(panel["title"], fontsize=10)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        if panel["type"] == "bargauge":
            names, values = [], []
            for target in panel["targets"]:
                for s in results.get((panel["title"], target["expr"]), []):
                    names.append(_legend(target.get("legendFormat", ""), s["metric"]))
                    values.append(float(s["values"][-1][1]) / (2 ** 20 if unit == "bytes" else 1))
            ax.barh(names, values, color="#5794f2")
            ax.set_xlabel("MiB" if unit == "bytes" else unit, fontsize=8)
        else:
            for target in panel["targets"]:
                for s in results.get((panel["title"], target["expr"]), []):
                    xs = [float(t) - start for t, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")]
                    ys = [float(v) for t, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")]
                    if ys and any(ys):  # a series at 0 all along (a finish reason that did not occur) is left out
                        ax.plot(xs, ys, label=_legend(target.get("legendFormat", ""), s["metric"]), linewidth=1.2)
            ax.set_xlabel("seconds", fontsize=8)
            ax.set_ylabel({"s": "seconds", "reqps": "requests/s", "percentunit": "share"}.get(unit, ""), fontsize=8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="upper right")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']}: each panel's queries against Prometheus{(' - ' + note) if note else ''}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
