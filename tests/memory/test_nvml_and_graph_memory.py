"""The GPU memory figures, proven on the CPU with fakes (named as such) for NVML and the CUDA allocator.

- NVML in a container lists host PIDs: the ledger finds the worker's own line by the process that appeared when
  its context was created, or says the figure is device-wide and why; an NVML error never fails a stage.
- The graphs' pool: `torch.cuda.graph` empties the allocator's cache when it begins; `measure_capture` empties it
  before reading "before", so the pool is what capture added, and the ledger's split then sums to the
  allocator's own reserved figure with the graphs' part equal to the pool.
- The fallback: `FastStep.release` resets the trees, clears the cuBLAS workspaces and books what stays.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from handler.engine.compiled import FastStep, measure_capture
from handler.memory.ledger import GRAPHS, MemoryLedger, NvmlQuery, Reading, split

MIB = 2**20


class FakeNvml:
    """Stands in for pynvml: one device whose process list and used memory the test sets."""

    def __init__(self):
        self.procs: dict[int, int] = {}
        self.used = 1000 * MIB
        self.fail = False

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        return uuid

    def nvmlSystemGetDriverVersion(self):
        return "580.00"

    def nvmlDeviceGetName(self, handle):
        return "Fake H100"

    def nvmlDeviceGetMemoryInfo(self, handle):
        if self.fail:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST (fake)")
        return SimpleNamespace(used=self.used, total=80 * 1024 * MIB)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if self.fail:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST (fake)")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.procs.items()]


@pytest.fixture
def nvml():
    return FakeNvml()


def query(nvml, own_pid=12):
    return NvmlQuery(torch.device("cuda:0"), nvml=nvml, uuid="GPU-fake", own_pid=own_pid)


def test_in_a_pid_namespace_the_worker_is_the_process_its_context_added(nvml):
    nvml.procs = {900: 300 * MIB}  # another worker, listed by its host PID
    q = query(nvml, own_pid=12)  # PID 12 inside the container; the host calls it 4242
    assert q() == (None, 1000 * MIB)  # "start": before CUDA is touched
    nvml.procs[4242] = 520 * MIB
    nvml.used += 520 * MIB
    assert q() == (520 * MIB, 1520 * MIB)  # "context": found
    nvml.procs[4242] = 700 * MIB
    nvml.procs[900] = 900 * MIB  # the other worker grows: not ours
    assert q()[0] == 700 * MIB
    assert q.pid == 4242 and "host PID 4242" in q.note


def test_own_pid_listed_is_taken_as_is(nvml):
    nvml.procs = {12: 10 * MIB}
    q = query(nvml, own_pid=12)
    assert q()[0] == 10 * MIB and q.note == "NVML lists this process by its own PID"


def test_two_processes_starting_together_make_the_figure_device_wide_and_say_why(nvml):
    q = query(nvml)
    q()
    nvml.procs = {4242: 520 * MIB, 4243: 520 * MIB}
    assert q()[0] is None
    assert q.note.startswith("device-wide") and "2 processes appeared" in q.note


def test_an_nvml_error_never_fails_a_stage(nvml):
    ledger = MemoryLedger(torch.device("cpu"), query(nvml))
    ledger.mark("start")
    nvml.fail = True
    ledger.mark("context")  # raised before: initialize failed on an NVML error
    assert ledger.readings["context"].driver_process is None and ledger.readings["context"].driver_device_used is None
    assert "GPU_IS_LOST" in ledger.nvml_errors[0] and ledger.nvml_errors[0].startswith("context:")


class FakeAllocator:
    """Stands in for PyTorch's CUDA caching allocator: reserved = allocated + cache; empty_cache frees the cache;
    a capture adds a pool of `pool` bytes of which `live` stay allocated, after emptying the cache as
    torch.cuda.graph's __enter__ does."""

    def __init__(self, allocated: int, cache: int):
        self.allocated, self.cache = allocated, cache
        self.calls: list[str] = []
        self.graph_reserved = 0

    def read(self):
        return self.allocated + self.cache + self.graph_reserved, self.allocated

    def empty_cache(self):
        self.calls.append("empty_cache")
        self.cache = 0

    def capture(self, pool: int, live: int):
        self.empty_cache()  # torch.cuda.graph.__enter__
        self.graph_reserved += pool - live
        self.allocated += live

    def clear_workspaces(self):
        self.calls.append("clear_workspaces")
        self.graph_reserved -= 32 * MIB  # the capture stream's cuBLAS workspace

    def reset_trees(self):
        self.calls.append("reset_trees")


def test_the_graphs_pool_is_what_capture_added_not_that_minus_the_cache():
    alloc = FakeAllocator(allocated=2000 * MIB, cache=300 * MIB)  # the warm-up left 300 MiB cached
    reserved, allocated = measure_capture(alloc, lambda: alloc.capture(pool=200 * MIB, live=8 * MIB))
    assert (reserved, allocated) == (200 * MIB, 8 * MIB)  # read after the cache was emptied: -100 MiB before


def readings(alloc_graph: tuple[int, int], cache_after_warmup: int) -> dict[str, Reading]:
    """Stages of a worker on a fake allocator: weights 250 MiB, pool 1000 MiB, the graphs' pool, warm-up."""
    ctx, w, p = 0, 250 * MIB, 1250 * MIB
    g_res, g_alloc = alloc_graph
    graphs_alloc, graphs_res = p + g_alloc, p + g_res
    warm_alloc = graphs_alloc + 33 * MIB  # a workspace the warm-up kept
    warm_res = graphs_res + 33 * MIB + cache_after_warmup
    return {
        "start": Reading("start", None, 1000 * MIB, 0, 0, 0),
        "context": Reading("context", 520 * MIB, 1520 * MIB, ctx, 2 * MIB, 0),
        "weights": Reading("weights", 772 * MIB, 1772 * MIB, w, w + 2 * MIB, w),
        "pool": Reading("pool", 1772 * MIB, 2772 * MIB, p, p + 2 * MIB, p),
        GRAPHS: Reading(GRAPHS, 1772 * MIB + g_res + 30 * MIB, 0, graphs_alloc, graphs_res + 2 * MIB, graphs_alloc),
        "warmup": Reading("warmup", 1772 * MIB + g_res + 30 * MIB + 33 * MIB + cache_after_warmup + 10 * MIB,
                          0, warm_alloc, warm_res + 2 * MIB, warm_alloc + cache_after_warmup),
    }


def test_the_split_sums_to_the_allocators_reserved_with_the_true_graph_pool():
    alloc = FakeAllocator(allocated=1250 * MIB, cache=300 * MIB)
    pool = measure_capture(alloc, lambda: alloc.capture(pool=200 * MIB, live=8 * MIB))
    r = readings(pool, cache_after_warmup=120 * MIB)
    parts, method = split(r, pool)
    assert method == "nvml_process"
    allocator_parts = sum(v for k, v in parts.items() if k not in ("cuda_context", "other", "driver_total"))
    graphs_driver_growth = 30 * MIB  # the driver's growth over the graphs stage beyond the allocator's
    assert allocator_parts - graphs_driver_growth == r["warmup"].reserved  # the parts are the allocator's figure
    assert parts["graphs"] - graphs_driver_growth == 200 * MIB  # the graphs' pool, all of it
    assert parts["allocator_cache"] + parts["activations"] == 120 * MIB + 2 * MIB  # the cache, not the pool


def test_fallback_release_books_what_stays_and_frees_the_workspace_and_trees():
    """FastStep.release on a fake allocator (no CUDA): trees reset, workspaces cleared, cache emptied, and the
    bytes the allocator still reserves beyond prepare's start returned to be booked."""
    alloc = FakeAllocator(allocated=1000 * MIB, cache=0)
    fast = FastStep.__new__(FastStep)  # no compile: only the release path is exercised
    fast.ready, fast.compiled, fast._stream, fast.graphs, fast.allocator = {}, None, None, "trees", alloc
    fast.at_start = alloc.read()
    alloc.capture(pool=232 * MIB, live=0)  # 200 MiB of trees' pool (kept by the fake) + 32 MiB workspace
    kept = fast.release()
    assert alloc.calls[-3:] == ["reset_trees", "clear_workspaces", "empty_cache"]
    assert kept == 200 * MIB  # the workspace went; what the fake's trees kept is booked, not reported as 0
