"""Pictures of the figures the tools print: drawn from the same rows as their tables, never by hand.

- `memory_plan_figure`: `scripts/plan_memory.py --plot FILE`: the planned split of one worker, part by part,
  and the card: each worker's total stacked, then what is left free (or how far over it is);
- `load_figure`: `benchmarks/load.py --plot FILE`: latency percentiles and generated tokens/s against the
  arrival rate, one line per scheduling, and the CDF of time to first token at the highest rate;
- `measured_vs_plan_figure`: `make gpu-report` (or `python -m gpt2ops.plots gpu-report.json [FOLDER]` on any
  machine, from the report a GPU run wrote): each worker's measured split beside its plan.

matplotlib is a tool of the operator's machine (requirements.txt), not of the serving image: it is imported
here, when a picture is asked for, with the file-only Agg backend. The file's format follows its suffix
(.png, .svg, .pdf).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# the plan's parts in the order they are stacked (bottom up), with the names the legend shows
PLAN_PARTS = {
    "cuda_context": "CUDA context",
    "weights": "weights",
    "kv_cache": "KV cache (slot pool)",
    "context_hidden_and_slots": "context hidden states + slot state",
    "activations": "activations",
    "graphs": "CUDA graphs' pool",
    "allocator_slack": "allocator cache (slack)",
    "workspaces": "cuBLAS workspaces",
}
PERCENTILES = (0.5, 0.9, 0.99)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt


def plan_bars(report: Mapping[str, Any]) -> dict[str, list[float]]:
    """The heights the plan's picture stacks, from plan_memory's report: per worker part (MiB) and the card's
    segments (each worker's total, then free; free is negative when the workers do not fit)."""
    per_worker = report["per_worker_mib"]
    workers = report["workers_per_gpu"]
    return {
        "parts": [float(per_worker[part]) for part in PLAN_PARTS if part in per_worker],
        "card": [float(per_worker["total"])] * workers + [float(report["headroom_mib"])],
    }


def memory_plan_figure(report: Mapping[str, Any]):
    """A figure of plan_memory's report: left, one worker's stacked parts; right, the card."""
    plt = _pyplot()
    bars = plan_bars(report)
    parts = [part for part in PLAN_PARTS if part in report["per_worker_mib"]]
    fig, (worker_ax, card_ax) = plt.subplots(1, 2, figsize=(10, 6), gridspec_kw={"width_ratios": [1, 1]})
    bottom = 0.0
    for part, mib in zip(parts, bars["parts"]):
        worker_ax.bar(["one worker"], [mib], bottom=bottom, label=f"{PLAN_PARTS[part]}: {mib:,.1f}")
        bottom += mib
    worker_ax.set_ylabel("MiB")
    worker_ax.set_title(f"per worker: {report['per_worker_mib']['total']:,.1f} MiB planned")
    worker_ax.legend(fontsize=8, loc="upper right")
    worker_ax.set_ylim(0, bottom * 1.6)

    bottom = 0.0
    for i, mib in enumerate(bars["card"][:-1]):
        card_ax.bar(["card"], [mib], bottom=bottom, color=f"C{i % 10}", edgecolor="black",
                    label=f"worker {i + 1}: {mib:,.1f}")
        bottom += mib
    free = bars["card"][-1]
    if free >= 0:
        card_ax.bar(["card"], [free], bottom=bottom, color="white", edgecolor="grey", hatch="//",
                    label=f"free: {free:,.1f}")
    else:
        card_ax.bar(["card"], [free], bottom=bottom, color="red", alpha=0.4, label=f"over by {-free:,.1f}")
    card_ax.axhline(report["gpu_mib"], color="black", linestyle="--", linewidth=1)
    card_ax.set_title(f"{report['gpu']}: {report['gpu_mib']:,.0f} MiB, {report['workers_per_gpu']} worker(s)")
    card_ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"planned GPU memory (prediction): {report['source']}, {report['dtype']}, {report['slots']} slots "
                 f"of {report['max_len']}, decode step {report['decode_step']}; CUDA context {report['context_source']}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def load_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """The lines of the load picture, from load.py's rows (one per scheduling and rate: name, rate,
    tokens_per_s, latency_ms {q: ms}): per scheduling, the rates in order and each quantity at them."""
    series: dict[str, dict[str, list[float]]] = {}
    for row in sorted(rows, key=lambda r: (r["name"], r["rate"])):
        line = series.setdefault(row["name"], {"rate": [], "tokens_per_s": [],
                                               **{f"p{round(q * 100)}": [] for q in PERCENTILES}})
        line["rate"].append(float(row["rate"]))
        line["tokens_per_s"].append(float(row["tokens_per_s"]))
        for q in PERCENTILES:
            line[f"p{round(q * 100)}"].append(float(row["latency_ms"][q]))
    return series


def ttft_cdf(ttft_ms: Sequence[float]) -> tuple[list[float], list[float]]:
    """(sorted times, cumulative fraction) of the streamed requests' times to first token."""
    xs = sorted(float(x) for x in ttft_ms)
    return xs, [(i + 1) / len(xs) for i in range(len(xs))]


def load_figure(rows: Sequence[Mapping[str, Any]], ttft_at_highest: Mapping[str, Sequence[float]], title: str):
    """Latency percentiles and tokens/s against the arrival rate (a line per scheduling), and the CDF of
    time to first token at the highest rate (a line per scheduling)."""
    plt = _pyplot()
    series = load_series(rows)
    fig, (latency_ax, tokens_ax, ttft_ax) = plt.subplots(1, 3, figsize=(15, 4.8))
    styles = {"p50": "-", "p90": "--", "p99": ":"}
    for i, (name, line) in enumerate(series.items()):
        for key, style in styles.items():
            latency_ax.plot(line["rate"], line[key], style, marker="o", color=f"C{i}", label=f"{name} {key}")
        tokens_ax.plot(line["rate"], line["tokens_per_s"], marker="o", color=f"C{i}", label=name)
        if ttft_at_highest.get(name):
            xs, ys = ttft_cdf(ttft_at_highest[name])
            ttft_ax.step(xs, ys, where="post", color=f"C{i}", label=name)
    latency_ax.set(xlabel="arrivals per second", ylabel="request latency (ms)", yscale="log",
                   title="latency percentiles")
    tokens_ax.set(xlabel="arrivals per second", ylabel="generated tokens per second", title="throughput")
    ttft_ax.set(xlabel="time to first token (ms)", ylabel="fraction of streamed requests", xscale="log",
                title="time to first token, highest rate")
    for ax in (latency_ax, tokens_ax, ttft_ax):
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def measured_vs_plan_bars(parts_mib: Mapping[str, float], plan_mib: Mapping[str, float]) -> dict[str, list]:
    """The stacked segments of the measured-beside-plan picture: the union of the parts' names (the measured
    ones first, in their order), and each bar's MiB per name (0 where a side lacks the part)."""
    names = [n for n in parts_mib if n != "total"] + [n for n in plan_mib if n != "total" and n not in parts_mib]
    return {"names": names,
            "measured": [float(parts_mib.get(n) or 0.0) for n in names],
            "plan": [float(plan_mib.get(n) or 0.0) for n in names]}


def measured_vs_plan_figure(title: str, parts_mib: Mapping[str, float], total_mib: float | None,
                            plan_mib: Mapping[str, float]):
    """Two stacked bars: the worker's measured parts (gpu-report) and plan_memory's parts for its shapes."""
    plt = _pyplot()
    bars = measured_vs_plan_bars(parts_mib, plan_mib)
    fig, ax = plt.subplots(figsize=(7, 6))
    bottoms = {"measured": 0.0, "plan": 0.0}
    for i, name in enumerate(bars["names"]):
        for side in ("measured", "plan"):
            mib = bars[side][i]
            ax.bar([side], [mib], bottom=bottoms[side], color=f"C{i % 10}", label=name if side == "measured" else None)
            bottoms[side] += mib
    if total_mib is not None:
        ax.plot(["measured"], [total_mib], "k_", markersize=40, label=f"NVML total: {total_mib:,.1f}")
    ax.set_ylabel("MiB")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def gpu_report_figures(report: Mapping[str, Any], folder: Path) -> list[Path]:
    """One picture per worker section of a gpu-report.json that has both a measured split and a plan."""
    written = []
    for key, section in report.get("sections", {}).items():
        if not key.startswith("worker_") or "describe" not in section or not section.get("plan"):
            continue
        memory = section["describe"]["memory"]
        env = report.get("environment", {})
        title = (f"{key[len('worker_'):]} worker on {env.get('gpu', 'the GPU')}: measured (make gpu-report, "
                 f"{env.get('date', '')}) beside plan_memory.py")
        fig = measured_vs_plan_figure(title, memory.get("parts_mib", {}), memory.get("total_mib"),
                                      section["plan"]["per_worker_mib"])
        written.append(save(fig, Path(folder) / f"memory-{key[len('worker_'):]}.png"))
    return written


def save(fig, path: Path) -> Path:
    """Write the figure (format from the suffix) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """python -m gpt2ops.plots gpu-report.json [FOLDER]: draw a GPU report's pictures (default: beside it)."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m gpt2ops.plots gpu-report.json [FOLDER]", file=sys.stderr)
        return 2
    source = Path(args[0])
    written = gpu_report_figures(json.loads(source.read_text()), Path(args[1]) if len(args) == 2 else source.parent)
    for path in written:
        print(path)
    if not written:
        print(f"{source}: no worker section with both a measured split and a plan", file=sys.stderr)
    return 0 if written else 1


if __name__ == "__main__":
    raise SystemExit(main())
