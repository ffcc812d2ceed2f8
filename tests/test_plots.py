"""The pictures (gpt2ops.plots) show the tables' own figures: the bars and lines drawn are read back from the
figure and compared with the rows the table prints, and the command-line options write their file."""

from __future__ import annotations

import json
import subprocess

import pytest

from gpt2ops import REPO
from gpt2ops.plan_memory import build_parser, plan_report
from gpt2ops.plots import PLAN_PARTS, load_figure, load_series, memory_plan_figure, ttft_cdf

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(*argv: str) -> dict:
    return plan_report(build_parser().parse_args(list(argv)))


def _stacked(ax) -> list[tuple[float, float]]:
    """(bottom, height) of each bar drawn on an axis, in drawing order."""
    return [(round(p.get_y(), 6), round(p.get_height(), 6)) for p in ax.patches]


@pytest.mark.parametrize("argv", [
    ("--shape", "110m", "--gpu", "h100"),
    ("--shape", "110m", "--gpu", "t4", "--workers", "3", "--decode-step", "eager"),
    ("--shape", "3.5b", "--gpu", "t4", "--workers", "2"),  # does not fit: the card's last bar is negative
], ids=["110m-h100", "110m-t4-3-eager", "3.5b-t4-over"])
def test_the_plan_figure_stacks_the_reports_parts_and_the_cards_workers(argv):
    report = _report(*argv)
    fig = memory_plan_figure(report)
    worker_ax, card_ax = fig.axes
    parts = [mib for part, mib in report["per_worker_mib"].items() if part in PLAN_PARTS]
    assert sum(parts) == pytest.approx(report["per_worker_mib"]["total"], abs=0.1 * len(parts))
    bottoms = [round(sum(parts[:i]), 6) for i in range(len(parts))]
    assert _stacked(worker_ax) == [(pytest.approx(b), pytest.approx(h)) for b, h in zip(bottoms, parts)]
    card = [report["per_worker_mib"]["total"]] * report["workers_per_gpu"] + [report["headroom_mib"]]
    heights = [h for _, h in _stacked(card_ax)]
    assert heights == pytest.approx(card)
    assert (heights[-1] < 0) == (not report["fits"])
    assert "prediction" in fig._suptitle.get_text()


def test_plan_memory_plot_option_writes_the_picture_and_still_prints_the_table(tmp_path):
    out = tmp_path / "plan.png"
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(REPO / "scripts" / "plan_memory.py"),
                           "--shape", "110m", "--gpu", "h100", "--json", "--plot", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["per_worker_mib"]["total"] > 0
    assert out.read_bytes()[:8] == PNG_MAGIC


ROWS = [  # load.py's rows: one per scheduling and rate
    {"name": "continuous", "rate": 16.0, "tokens_per_s": 900.0, "latency_ms": {0.5: 120.0, 0.9: 400.0, 0.99: 900.0}},
    {"name": "run-to-completion", "rate": 8.0, "tokens_per_s": 600.0, "latency_ms": {0.5: 200.0, 0.9: 800.0, 0.99: 1500.0}},
    {"name": "continuous", "rate": 8.0, "tokens_per_s": 610.0, "latency_ms": {0.5: 90.0, 0.9: 300.0, 0.99: 700.0}},
    {"name": "run-to-completion", "rate": 16.0, "tokens_per_s": 700.0, "latency_ms": {0.5: 3000.0, 0.9: 5000.0, 0.99: 7000.0}},
]


def test_the_load_figure_draws_each_schedulings_rows_in_rate_order():
    ttft = {"continuous": [15.0, 5.0, 30.0], "run-to-completion": [400.0, 38.0]}
    fig = load_figure(ROWS, ttft, "test")
    latency_ax, tokens_ax, ttft_ax = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in latency_ax.lines}
    assert lines["continuous p50"] == ([8.0, 16.0], [90.0, 120.0])
    assert lines["run-to-completion p99"] == ([8.0, 16.0], [1500.0, 7000.0])
    throughput = {line.get_label(): list(line.get_ydata()) for line in tokens_ax.lines}
    assert throughput == {"continuous": [610.0, 900.0], "run-to-completion": [600.0, 700.0]}
    cdf = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ttft_ax.lines}
    assert cdf["continuous"] == ([5.0, 15.0, 30.0], pytest.approx([1 / 3, 2 / 3, 1.0]))


def test_load_series_and_cdf_keep_every_row():
    series = load_series(ROWS)
    assert sum(len(line["rate"]) for line in series.values()) == len(ROWS)
    xs, ys = ttft_cdf([3.0, 1.0, 2.0, 2.0])
    assert xs == [1.0, 2.0, 2.0, 3.0] and ys == [0.25, 0.5, 0.75, 1.0]


def test_the_load_sweep_table_and_picture_read_the_same_rows():
    from benchmarks.load import Outcome, RunResult, sweep_row, sweep_table

    def run(name: str, latencies: list[float]) -> RunResult:
        outcomes = [Outcome(200, [1, 2, 3], i * 0.1, i * 0.1 + lat / 2, i * 0.1 + lat) for i, lat in enumerate(latencies)]
        return RunResult(name, [{"max_new_tokens": 3}] * len(outcomes), outcomes, [[1, 2, 3]] * len(outcomes))

    rows = [sweep_row(run("continuous", [0.1, 0.2, 0.3]), 8.0), sweep_row(run("continuous", [0.2, 0.4, 0.9]), 16.0)]
    table = sweep_table(rows)
    assert "| continuous | 8 |" in table and "| continuous | 16 |" in table
    fig = load_figure(rows, {}, "test")
    p99 = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].lines}["continuous p99"]
    assert p99 == [rows[0]["latency_ms"][0.99], rows[1]["latency_ms"][0.99]] == pytest.approx([300.0, 900.0])
    for row, value in zip(rows, p99):
        assert f"{value:,.0f}" in table


GPU_REPORT = {  # the shape of gpu-report.json's worker section (gpt2ops.gpu_report.worker_section)
    "environment": {"gpu": "NVIDIA H200", "date": "2026-12-03T12:00:00+00:00"},
    "sections": {
        "worker_110m": {
            "describe": {"memory": {"total_mib": 1100.0, "parts_mib": {
                "cuda_context": 530.0, "weights": 237.4, "kv_cache": 148.5, "allocator_cache": 40.0}}},
            "plan": {"per_worker_mib": {"cuda_context": 520.0, "weights": 237.4, "kv_cache": 148.5,
                                        "graphs": 51.5, "total": 957.4}},
        },
        "worker_3.5b": {"error": "timed out"},  # no picture without a measured split
    },
}


def test_a_gpu_reports_picture_stacks_the_measured_parts_beside_the_plans(tmp_path):
    from gpt2ops.plots import gpu_report_figures, measured_vs_plan_bars, measured_vs_plan_figure

    section = GPU_REPORT["sections"]["worker_110m"]
    bars = measured_vs_plan_bars(section["describe"]["memory"]["parts_mib"], section["plan"]["per_worker_mib"])
    assert bars["names"] == ["cuda_context", "weights", "kv_cache", "allocator_cache", "graphs"]
    assert bars["measured"] == [530.0, 237.4, 148.5, 40.0, 0.0]
    assert bars["plan"] == [520.0, 237.4, 148.5, 0.0, 51.5]
    fig = measured_vs_plan_figure("t", section["describe"]["memory"]["parts_mib"], 1100.0,
                                  section["plan"]["per_worker_mib"])
    drawn = {"measured": [], "plan": []}
    for patch in fig.axes[0].patches:
        drawn["measured" if patch.get_x() < 0.5 else "plan"].append(patch.get_height())
    assert drawn["measured"] == pytest.approx(bars["measured"]) and drawn["plan"] == pytest.approx(bars["plan"])
    written = gpu_report_figures(GPU_REPORT, tmp_path)
    assert [p.name for p in written] == ["memory-110m.png"]
    assert written[0].read_bytes()[:8] == PNG_MAGIC


def test_plots_module_draws_from_a_gpu_report_json(tmp_path):
    source = tmp_path / "gpu-report.json"
    source.write_text(json.dumps(GPU_REPORT))
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "gpt2ops.plots", str(source)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "memory-110m.png").read_bytes()[:8] == PNG_MAGIC
    source.write_text(json.dumps({"sections": {}}))
    proc = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "gpt2ops.plots", str(source)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and "no worker section" in proc.stderr
