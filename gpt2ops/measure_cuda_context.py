#!/usr/bin/env python3
"""Measure the CUDA context of a fresh PyTorch process, with lazy and with eager kernel loading.

    .venv/bin/python scripts/measure_cuda_context.py              # GPU 0, a table
    .venv/bin/python scripts/measure_cuda_context.py --device 1 --json

The user's experiment, done right. For each CUDA_MODULE_LOADING mode (LAZY,
EAGER) a fresh Python process (nothing else in it has touched CUDA) reads the
driver's figures through NVML, creates the context with
`torch.zeros(1, device="cuda")`, synchronizes, and reads them again together
with `torch.cuda.memory_reserved()`. Then

    context MiB = driver's figure for the process - what PyTorch's allocator reserved

The driver's figure is the process's own line in NVML (what `nvidia-smi`
shows) where the process is listed; in another PID namespace (a container
without `--pid=host`) it is not, and the device's used memory after minus
before stands in for it (exact only while nothing else on the GPU allocates:
the table says which method gave each row).

Without a CUDA device the script prints "no CUDA device: nothing to measure"
and exits 0: there is nothing wrong to report. It exits 1 when a measuring
process fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from gpt2ops import REPO
from gpt2ops.errors import report as report_error
from handler.memory.ledger import driver_figure
from handler.memory.plan import MIB

MODES = ("LAZY", "EAGER")
NO_CUDA = "no CUDA device: nothing to measure"

# Runs in the fresh process: argv[1] is the torch device index. Prints one JSON line.
CHILD = r"""
import json, os, sys
import torch
from handler.memory.ledger import NvmlQuery

device = torch.device("cuda", int(sys.argv[1]))
out = {"mode": os.environ.get("CUDA_MODULE_LOADING"), "torch": torch.__version__, "cuda": torch.version.cuda}
try:
    nvml = NvmlQuery(device)  # the properties lookup initialises the runtime, not a context
    out.update(gpu_name=nvml.name, driver_version=nvml.driver_version, gpu_total=nvml.total)
except Exception as err:
    nvml = None
    out.update(gpu_name=torch.cuda.get_device_name(device), nvml_error=repr(err))
out["process_before"], out["device_used_before"] = nvml() if nvml else (None, None)
torch.cuda.set_device(device)
torch.zeros(1, device=device)  # the context, and nothing else
torch.cuda.synchronize(device)
out["process_after"], out["device_used_after"] = nvml() if nvml else (None, None)
out["driver_figure_note"] = nvml.note if nvml else None  # how this process was found in NVML's list (host PIDs)
out["reserved"] = torch.cuda.memory_reserved(device)
out["allocated"] = torch.cuda.memory_allocated(device)
print(json.dumps(out))
"""


def run_child(device: int, mode: str, timeout_s: float = 300) -> dict:
    """One fresh process with CUDA_MODULE_LOADING=`mode`; returns its readings (bytes)."""
    env = dict(os.environ, CUDA_MODULE_LOADING=mode)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(device)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the measuring process ({mode}) failed with exit code {proc.returncode}:\n"
                           f"{proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1])


def summarize(raw: dict) -> dict:
    """Readings of one process -> the table's row (MiB), with the method that gave the driver's figure."""
    method, process = driver_figure(raw.get("process_after"), raw.get("device_used_after"),
                                    raw.get("device_used_before"))
    row = {
        "gpu_name": raw.get("gpu_name", ""),
        "driver_version": raw.get("driver_version", ""),
        "torch": raw.get("torch", ""),
        "cuda": raw.get("cuda", ""),
        "mode": raw.get("mode", ""),
        "method": method,
        "process_mib": _mib(process),
        "reserved_mib": _mib(raw.get("reserved", 0)),
        "context_mib": _mib(None if process is None else process - raw.get("reserved", 0)),
        "note": raw.get("driver_figure_note"),
    }
    if raw.get("process_before") is not None:  # a context existed before torch.zeros: the figure is not clean
        row["warning"] = f"the process already held {_mib(raw['process_before'])} MiB before the context"
    if raw.get("nvml_error"):
        row["warning"] = f"NVML unavailable: {raw['nvml_error']}"
    return row


def measure(device: int = 0, modes: tuple[str, ...] = MODES) -> list[dict]:
    """One summarized row per loading mode, each from its own fresh process."""
    return [summarize(run_child(device, mode)) for mode in modes]


def context_mib(device: int = 0, mode: str | None = None) -> float:
    """The CUDA context (MiB) in the loading mode this environment would serve with (default LAZY)."""
    mode = (mode or os.environ.get("CUDA_MODULE_LOADING") or "LAZY").upper()
    row = measure(device, (mode,))[0]
    if row["context_mib"] is None:
        raise RuntimeError(f"could not read the driver's figure: {row.get('warning', 'no NVML')}")
    return row["context_mib"]


COLUMNS = [("gpu_name", "GPU"), ("driver_version", "driver"), ("torch", "torch"), ("cuda", "CUDA"),
           ("mode", "loading"), ("process_mib", "process MiB (NVML)"), ("reserved_mib", "reserved MiB"),
           ("context_mib", "context MiB"), ("method", "driver figure")]


def format_table(rows: list[dict]) -> str:
    cells = [[h for _, h in COLUMNS]] + [["-" if r[k] is None else str(r[k]) for k, _ in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"warning ({r['mode']}): {r['warning']}" for r in rows if r.get("warning")]
    return "\n".join(lines)


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / MIB, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=int, default=0, help="CUDA device index, as torch numbers it (default 0)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    import torch  # is_available does not create a context

    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "message": NO_CUDA}) if args.json else NO_CUDA)
        return 0
    if not 0 <= args.device < torch.cuda.device_count():
        parser.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        rows = measure(args.device)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        report_error(err)
        return 1
    print(json.dumps({"cuda": True, "device": args.device, "rows": rows}, indent=2) if args.json
          else format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
