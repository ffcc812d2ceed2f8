"""Where a worker's GPU memory goes: measured at each stage of start-up, split into parts that add up.

The driver's figure for this process (NVML, as `nvidia-smi` shows it) is

    driver total = CUDA context + reserved by PyTorch's allocator + other

and what the allocator reserves is allocated tensors (weights, the slot pool,
anything kept) plus its cache (reserved but unused: the warm-up's activations,
kept for the next step). The stages are: before CUDA is touched, after the
context exists (one 1-element tensor), after the weights are loaded, after the
slot pool is allocated (`handler.engine.pool`), after the fast decode step is
built ("graphs", optional: compiled, CUDA graphs captured, self-checked;
`handler.engine.compiled`), and after a warm-up that runs the largest prompt and
a full-pool decode step. "graphs" is what that stage added: the CUDA graphs'
private memory pool (the captured steps' activations), tensors the compiled
code keeps, and what the driver counts beyond the allocator for it (kernel
images, instantiated graphs). "other" is what the
driver counts that no named part explains (library workspaces, kernels loaded
lazily after the context was measured); a healthy worker keeps it within a few
percent of the total.

NVML is queried through `nvidia-ml-py` by the device's UUID, so that
`CUDA_VISIBLE_DEVICES` renumbering is no trap. In Docker or Kubernetes the
worker runs in its own PID namespace while NVML lists host PIDs, so
`os.getpid()` is not in the list. The worker's line is then found by what
survives the namespace (`NvmlQuery`): the device's processes are listed before
CUDA is touched and again once this worker's context exists; exactly one new
process is this worker (it has a context by then, so it is listed). When that is
ambiguous (another process started in the same moment) or NVML lists no
processes (some MIG and vGPU setups), the device's used memory minus what it was
before CUDA was touched stands in, and the report says that this figure is
device-wide and why (`driver_figure_note`): it is wrong as soon as something
else changes its use of the GPU (MPS, time-slicing, a restarting worker). An
NVML error never fails the worker: that stage's driver figures are None, and the
note says why. On the CPU the report says there is no GPU instead of failing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from handler.memory.plan import MIB

logger = logging.getLogger(__name__)

STAGES = ("start", "context", "weights", "pool", "warmup")
GRAPHS = "graphs"  # optional stage between "pool" and "warmup"


@dataclass(frozen=True)
class Reading:
    """One stage's figures, in bytes."""

    stage: str
    driver_process: int | None  # NVML: this process's GPU memory (None: not available)
    driver_device_used: int | None  # NVML: the whole device's used memory
    allocated: int  # torch.cuda.memory_allocated
    reserved: int  # torch.cuda.memory_reserved
    peak_allocated: int  # torch.cuda.max_memory_allocated since the previous stage


class NvmlQuery:
    """Reads NVML for one CUDA device: (this process's used bytes or None, device used bytes).

    The first call must come before this process touches CUDA (the ledger's "start"): it lists the device's
    processes then, so that a later call can find this worker's host PID (module docstring). `pid` is the PID
    NVML knows this worker by, `note` how it was found or why it was not."""

    def __init__(self, device: torch.device, *, nvml=None, uuid: str | None = None, own_pid: int | None = None):
        if nvml is None:
            import pynvml as nvml  # nvidia-ml-py

        nvml.nvmlInit()
        self._nvml = nvml
        uuid = uuid or str(torch.cuda.get_device_properties(device).uuid)
        self.handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        self.driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        self.name = _text(nvml.nvmlDeviceGetName(self.handle))
        self.total = nvml.nvmlDeviceGetMemoryInfo(self.handle).total
        self.own_pid = own_pid if own_pid is not None else os.getpid()
        self.pid: int | None = None
        self.note = "this process is not listed yet"
        self._before: set[int] | None = None  # PIDs on the device before this process touched CUDA

    def __call__(self) -> tuple[int | None, int]:
        procs = {p.pid: p.usedGpuMemory for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle)}
        used = int(self._nvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        if self.pid is None:
            self._find_self(procs)
        mine = procs.get(self.pid) if self.pid is not None else None
        return (int(mine) if mine is not None else None), used

    def _find_self(self, procs: dict) -> None:
        if self.own_pid in procs:
            self.pid, self.note = self.own_pid, "NVML lists this process by its own PID"
        elif self._before is None:
            self._before = set(procs)
        else:
            new = set(procs) - self._before
            if len(new) == 1:
                self.pid = new.pop()
                self.note = (f"NVML lists host PIDs (this worker is {self.own_pid} in its PID namespace): found as "
                             f"host PID {self.pid}, the one process that appeared on the device when this worker "
                             "created its CUDA context")
            else:
                self.note = (f"device-wide: NVML lists host PIDs and {len(new)} processes appeared on the device "
                             "while this worker created its CUDA context, so its own line is unknown; the figure is "
                             "the device's growth, which counts any other process's change too")


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class MemoryLedger:
    """Records `Reading`s at each start-up stage and turns them into a breakdown."""

    def __init__(self, device: torch.device, query: Callable[[], tuple[int | None, int]] | None = None,
                 gpu_name: str = "", driver_version: str = "", gpu_total: int = 0):
        self.device = device
        self.query = query
        self.gpu_name = gpu_name
        self.driver_version = driver_version
        self.gpu_total = gpu_total
        self.readings: dict[str, Reading] = {}
        self.nvml_errors: list[str] = []  # NVML failures (never fatal): those stages lack the driver's figures
        self.graph_pool: tuple[int, int] = (0, 0)  # (reserved, allocated) bytes of the CUDA graphs' memory pool

    @classmethod
    def for_device(cls, device: torch.device) -> "MemoryLedger":
        """A ledger that reads NVML on a GPU; on the CPU, or without NVML, one that only says so."""
        if device.type != "cuda":
            return cls(device)
        try:
            nvml = NvmlQuery(device)
        except Exception as err:  # no driver library, no permission: report without the driver's view
            logger.warning("NVML unavailable (%s): the breakdown will lack the driver's figures", err)
            return cls(device, gpu_name=torch.cuda.get_device_name(device))
        return cls(device, nvml, nvml.name, nvml.driver_version, nvml.total)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def touch_context(self) -> None:
        """Create the CUDA context and nothing else (a one-element tensor), so the next stage measures it."""
        if self.on_gpu:
            torch.zeros(1, device=self.device)

    def mark(self, stage: str, *, graph_pool: tuple[int, int] | None = None) -> None:
        """Take the figures of `stage` (one of STAGES, or GRAPHS with the graphs' pool (reserved, allocated))."""
        if stage not in STAGES and stage != GRAPHS:
            raise ValueError(f"unknown stage {stage!r}")
        if graph_pool is not None:
            if stage != GRAPHS:
                raise ValueError("graph_pool belongs to the graphs stage")
            self.graph_pool = (int(graph_pool[0]), int(graph_pool[1]))
        mine, used = None, None
        if self.query is not None:
            try:
                mine, used = self.query()
            except Exception as err:  # noqa: BLE001 - the driver's view is a report, never a reason to fail
                logger.warning("NVML failed at stage %s (%s): no driver figures for it", stage, err)
                self.nvml_errors.append(f"{stage}: {type(err).__name__}: {err}")
        if self.on_gpu and stage != "start":
            torch.cuda.synchronize(self.device)
            allocated = torch.cuda.memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:  # before CUDA is touched nothing may call into it
            allocated = reserved = peak = 0
        self.readings[stage] = Reading(stage, mine, used, allocated, reserved, peak)

    def breakdown(self, *, weights_bytes: int, pool_bytes: int) -> dict:
        """The report: parts in MiB that add up to the driver's figure, plus every stage's readings."""
        if not self.on_gpu:
            return {
                "device": str(self.device),
                "gpu": False,
                "note": "no GPU: this worker runs on the CPU, so there is no GPU memory to account for",
                "weights_mib": _mib(weights_bytes),
                "slot_pool_mib": _mib(pool_bytes),
            }
        parts, method = split(self.readings, self.graph_pool)
        total = parts.pop("driver_total")
        named = sum(v for k, v in parts.items() if k != "other")
        return {
            "device": str(self.device),
            "gpu": True,
            "gpu_name": self.gpu_name,
            "driver_version": self.driver_version,
            "gpu_total_mib": _mib(self.gpu_total),
            "driver_figure": method,
            "driver_figure_note": self._driver_note(method),
            "total_mib": _mib(total),
            "parts_mib": {k: _mib(v) for k, v in parts.items()},
            "parts_explain_percent": round(100.0 * named / total, 2) if total else None,
            "weights_expected_mib": _mib(weights_bytes),
            "slot_pool_expected_mib": _mib(pool_bytes),
            "each_extra_worker_costs_mib": _mib(parts["cuda_context"] + parts["weights"] + parts["slot_pool"]),
            "stages": {k: {f: (_mib(v) if isinstance(v, int) else v) for f, v in asdict(r).items() if f != "stage"}
                       for k, r in self.readings.items()},
            **({"graph_pool_mib": {"reserved": _mib(self.graph_pool[0]), "allocated": _mib(self.graph_pool[1])}}
               if GRAPHS in self.readings else {}),
        }


    def _driver_note(self, method: str) -> str:
        note = getattr(self.query, "note", "")
        if method == "nvml_device_delta" and not note.startswith("device-wide"):
            note = ("device-wide: this worker's own line is not in NVML's list (" + (note or "no note") +
                    "); the figure is the device's growth, which counts any other process's change too")
        if self.nvml_errors:
            note += f"; NVML errors: {self.nvml_errors}"
        return note


def split(readings: dict[str, Reading], graph_pool: tuple[int, int] = (0, 0)) -> tuple[dict[str, int], str]:
    """The parts (bytes) from the stage readings; returns (parts, how the driver figure was read).

    cuda_context     driver figure after the context exists, minus what the allocator held then
    weights          allocated after loading minus allocated before
    slot_pool        allocated after the pool minus allocated after loading
    graphs           (only with a graphs stage) the graphs' pool as reserved, tensors the stage kept outside it,
                     and the driver's growth over the stage beyond the allocator's
    activations      peak allocated during warm-up beyond what stayed allocated (now in the cache)
    allocator_cache  reserved but unused after warm-up, beyond the warm-up's peak use (the graphs' pool excluded)
    other_allocated  tensors allocated after warm-up beyond weights, pool and graphs (workspaces, kept buffers)
    other            the driver's figure that none of the above explains
    """
    start, ctx, weights, pool, warm = (readings[s] for s in STAGES)
    graphs = readings.get(GRAPHS)
    method, total = driver_figure(warm.driver_process if ctx.driver_process is not None else None,
                                  warm.driver_device_used, start.driver_device_used)
    if total is None:
        method, total, ctx_driver = "allocator_only", warm.reserved, ctx.reserved
    else:
        ctx_driver = driver_figure(ctx.driver_process if method == "nvml_process" else None,
                                   ctx.driver_device_used, start.driver_device_used)[1]
    cuda_context = ctx_driver - ctx.reserved
    weight_bytes = weights.allocated - ctx.allocated
    pool_bytes = pool.allocated - weights.allocated
    graph_reserved, graph_allocated = graph_pool if graphs is not None else (0, 0)
    kept = 0  # tensors the graphs stage allocated outside the graphs' pool and kept (the compiled code's constants)
    driver_growth = 0  # what the driver added over the stage beyond the allocator's reservations
    if graphs is not None:
        kept = max(0, graphs.allocated - pool.allocated - graph_allocated)
        grew = _driver_delta(method, pool, graphs)
        if grew is not None:
            driver_growth = max(0, grew - (graphs.reserved - pool.reserved))
    base = pool.allocated + graph_allocated + kept  # allocated after the graphs stage, for good
    peak = max(0, warm.peak_allocated - base)
    other_allocated = max(0, warm.allocated - base)
    cache = (warm.reserved - graph_reserved) - (warm.allocated - graph_allocated)
    held_from_peak = min(cache, max(0, peak - other_allocated))
    parts = {
        "cuda_context": cuda_context,
        "weights": weight_bytes,
        "slot_pool": pool_bytes,
    }
    if graphs is not None:
        parts["graphs"] = graph_reserved + kept + driver_growth
    parts.update({
        "activations": held_from_peak,
        "allocator_cache": cache - held_from_peak,
        "other_allocated": other_allocated + ctx.allocated,
    })
    parts["other"] = total - sum(parts.values())
    parts["driver_total"] = total
    return parts, method


def driver_figure(process: int | None, device_used: int | None, device_used_before: int | None
                  ) -> tuple[str, int | None]:
    """A process's GPU memory as the driver counts it, and how it was read: its own line in NVML
    ("nvml_process", what nvidia-smi lists), else the device's use minus what it was before the process
    began ("nvml_device_delta": a process in a PID namespace is not listed), else none ("unavailable")."""
    if process is not None:
        return "nvml_process", process
    if device_used is not None and device_used_before is not None:
        return "nvml_device_delta", device_used - device_used_before
    return "unavailable", None


def _driver_delta(method: str, before: Reading, after: Reading) -> int | None:
    """The driver's growth between two stages, read as the total was read (None: no driver figure)."""
    if method == "nvml_process" and before.driver_process is not None and after.driver_process is not None:
        return after.driver_process - before.driver_process
    if method == "nvml_device_delta" and before.driver_device_used is not None and after.driver_device_used is not None:
        return after.driver_device_used - before.driver_device_used
    return None


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / MIB, 1)
