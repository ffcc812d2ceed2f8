"""Memory accounting on the CPU: the ledger's stage arithmetic, the plan, and the two memory scripts.

The ledger runs against a scripted NVML query and a stand-in for torch.cuda's
allocator counters, so every part is checked against numbers worked out by
hand below; the plan's parameter count is checked against transformers'
GPT2LMHeadModel built on the `meta` device (no memory). Nothing here needs a
GPU; `tests/memory/test_gpu_memory.py` checks the same things on one.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from handler.memory.ledger import MIB, STAGES, MemoryLedger, Reading, split
from handler.engine.pool import PoolShape
from handler.memory.plan import ModelShape, Plan, activation_bytes, pool_parts
from gpt2ops import measure_cuda_context, plan_memory
from gpt2ops.tiny_model import TINY_DEFAULTS

M = MIB


# ---- stand-ins for NVML and for torch.cuda's allocator counters ----


class ScriptedNvml:
    """An NVML query returning scripted (process bytes or None, device used bytes), one per call."""

    def __init__(self, readings):
        self.readings = list(readings)
        self.calls = 0

    def __call__(self):
        reading = self.readings[self.calls]
        self.calls += 1
        return reading


class FakeAllocator:
    """torch.cuda's allocator API over numbers the test sets; records every call into "CUDA"."""

    def __init__(self):
        self.allocated = self.reserved = self.peak = 0
        self.calls: list[str] = []

    def set(self, allocated, reserved, peak):
        self.allocated, self.reserved, self.peak = allocated, reserved, peak

    def synchronize(self, device=None):
        self.calls.append("synchronize")

    def memory_allocated(self, device=None):
        self.calls.append("memory_allocated")
        return self.allocated

    def memory_reserved(self, device=None):
        self.calls.append("memory_reserved")
        return self.reserved

    def max_memory_allocated(self, device=None):
        self.calls.append("max_memory_allocated")
        return self.peak

    def reset_peak_memory_stats(self, device=None):
        self.calls.append("reset_peak_memory_stats")
        self.peak = self.allocated


@pytest.fixture
def allocator(monkeypatch):
    fake = FakeAllocator()
    for name in ("synchronize", "memory_allocated", "memory_reserved", "max_memory_allocated",
                 "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


# One worker's start-up, in bytes. NVML: (process, device used); allocator: (allocated, reserved, peak since
# the previous stage). The device's used memory also grows by what another process allocates meanwhile, so the
# device delta differs from the process's own figure and a test can tell which one was used.
NVML_LISTED = [(None, 1000 * M), (522 * M, 1530 * M), (784 * M, 1800 * M), (934 * M, 1950 * M),
               (1480 * M, 2550 * M)]
NVML_UNLISTED = [(None, used) for _, used in NVML_LISTED]  # another PID namespace: never listed
ALLOCATOR = {
    "context": (0, 2 * M, 0),  # the 1-element tensor is gone; its 2 MiB block stays cached
    "weights": (240 * M, 242 * M, 240 * M),
    "pool": (390 * M, 392 * M, 390 * M),  # the slot pool: 150 MiB, allocated once
    "warmup": (422 * M, 912 * M, 850 * M),  # + 32 MiB cuBLAS workspace kept; peak 850 during warm-up
}
# Worked out by hand (MiB):
#   cuda_context    = driver after context - reserved then         = 522 - 2          = 520
#   weights         = allocated after load - after context         = 240 - 0          = 240
#   slot_pool       = allocated after the pool - after load        = 390 - 240        = 150
#   activations     = min(cache, warm-up peak - pool level - kept) = min(490, 460-32) = 428
#   allocator_cache = (reserved - allocated) - the above           = 490 - 428        = 62
#   other_allocated = allocated after warm-up - after the pool     = 422 - 390        = 32
#   other           = total - the named parts                      = 1480 - 1432      = 48
LISTED_PARTS = {"cuda_context": 520, "weights": 240, "slot_pool": 150, "activations": 428, "allocator_cache": 62,
                "other_allocated": 32, "other": 48}
# Not listed: total = 2550 - 1000 = 1550, context = (1530 - 1000) - 2 = 528, other = 1550 - 1440 = 110.
UNLISTED_PARTS = {**LISTED_PARTS, "cuda_context": 528, "other": 110}
# No NVML: the allocator's reserved memory is all there is: total 912, no context, nothing unexplained.
ALLOCATOR_ONLY_PARTS = {**LISTED_PARTS, "cuda_context": 0, "other": 0}


def run_startup(allocator, query, allocator_script=ALLOCATOR) -> MemoryLedger:
    ledger = MemoryLedger(torch.device("cuda:0"), query, "Fake GPU", "999.1", 80 * 1024 * M)
    for stage in STAGES:
        if stage in allocator_script:
            allocator.set(*allocator_script[stage])
        ledger.mark(stage)
    return ledger


@pytest.mark.parametrize("nvml,method,expected,total_mib", [
    (NVML_LISTED, "nvml_process", LISTED_PARTS, 1480),
    (NVML_UNLISTED, "nvml_device_delta", UNLISTED_PARTS, 1550),
    (None, "allocator_only", ALLOCATOR_ONLY_PARTS, 912),
])
def test_split_gives_the_hand_worked_parts(allocator, nvml, method, expected, total_mib):
    ledger = run_startup(allocator, ScriptedNvml(nvml) if nvml else None)
    parts, got_method = split(ledger.readings)
    assert got_method == method
    total = parts.pop("driver_total")
    assert total == total_mib * M
    assert parts == {k: v * M for k, v in expected.items()}
    assert sum(parts.values()) == total


def test_a_kept_context_tensor_counts_as_other_allocated_not_weights(allocator):
    script = {"context": (1 * M, 2 * M, 1 * M), "weights": (241 * M, 243 * M, 241 * M),
              "pool": (391 * M, 393 * M, 391 * M), "warmup": (423 * M, 913 * M, 851 * M)}
    parts, _ = split(run_startup(allocator, ScriptedNvml(NVML_LISTED), script).readings)
    # weights 241 - 1 = 240; pool 391 - 241 = 150; kept 423 - 391 = 32, plus the 1 MiB from the context stage = 33;
    # other = 1480 - (520 + 240 + 150 + 428 + 62 + 33) = 47
    assert parts["weights"] == 240 * M
    assert parts["other_allocated"] == 33 * M
    assert parts["other"] == 47 * M


def test_an_emptied_cache_holds_only_what_is_left(allocator):
    nvml = NVML_LISTED[:4] + [(1018 * M, 2088 * M)]
    script = {**ALLOCATOR, "warmup": (422 * M, 450 * M, 850 * M)}  # torch.cuda.empty_cache() after the peak
    parts, _ = split(run_startup(allocator, ScriptedNvml(nvml), script).readings)
    # cache = 450 - 422 = 28 < the 428 the peak used: all of it is activations, none is spare cache;
    # other = 1018 - (520 + 240 + 150 + 28 + 0 + 32) = 48
    assert (parts["activations"], parts["allocator_cache"], parts["other"]) == (28 * M, 0, 48 * M)


# The same start-up with the fast decode step built between the pool and the warm-up (MiB): the graphs' pool
# reserves 60 of which 8 stay allocated (the capture stream's workspace), the stage keeps 34 more outside it
# (the side stream's workspace, the compiled code's constants), and the driver grows 20 beyond the allocator
# (kernel images, instantiated graphs).
GRAPHS_NVML = NVML_LISTED[:4] + [(1054 * M, 2070 * M), (1159 * M, 2175 * M)]
GRAPHS_ALLOCATOR = {**ALLOCATOR, "graphs": (432 * M, 492 * M, 500 * M), "warmup": (440 * M, 592 * M, 530 * M)}
# Worked out by hand:
#   graphs          = pool 60 + kept (432 - 390 - 8 = 34) + driver growth ((1054 - 934) - (492 - 392) = 20) = 114
#   activations     = min(cache, peak beyond what is kept): cache = (592 - 60) - (440 - 8) = 100,
#                     peak 530 - (390 + 8 + 34) = 98, kept since 440 - 432 = 8: min(100, 90)      =  90
#   allocator_cache = 100 - 90                                                                       =  10
#   other_allocated = 440 - 432                                                                      =   8
#   other           = 1159 - (520 + 240 + 150 + 114 + 90 + 10 + 8)                                   =  27
GRAPHS_PARTS = {"cuda_context": 520, "weights": 240, "slot_pool": 150, "graphs": 114, "activations": 90,
                "allocator_cache": 10, "other_allocated": 8, "other": 27}


def test_split_with_a_graphs_stage_gives_the_hand_worked_parts(allocator):
    ledger = MemoryLedger(torch.device("cuda:0"), ScriptedNvml(GRAPHS_NVML), "Fake GPU", "999.1", 80 * 1024 * M)
    for stage in ("start", "context", "weights", "pool", "graphs", "warmup"):
        if stage in GRAPHS_ALLOCATOR:
            allocator.set(*GRAPHS_ALLOCATOR[stage])
        ledger.mark(stage, **({"graph_pool": (60 * M, 8 * M)} if stage == "graphs" else {}))
    parts, method = split(ledger.readings, ledger.graph_pool)
    assert method == "nvml_process"
    assert parts.pop("driver_total") == 1159 * M
    assert parts == {k: v * M for k, v in GRAPHS_PARTS.items()}
    report = json.loads(json.dumps(ledger.breakdown(weights_bytes=240 * M, pool_bytes=150 * M)))
    assert report["parts_mib"]["graphs"] == 114.0 and report["graph_pool_mib"] == {"reserved": 60.0, "allocated": 8.0}
    assert set(report["stages"]) == set(STAGES) | {"graphs"}
    with pytest.raises(ValueError, match="graph_pool belongs to the graphs stage"):
        ledger.mark("pool", graph_pool=(1, 1))


def test_without_a_graphs_stage_there_is_no_graphs_part(allocator):
    parts, _ = split(run_startup(allocator, ScriptedNvml(NVML_LISTED)).readings)
    assert "graphs" not in parts


def _random_readings(seed: int) -> dict[str, Reading]:
    """Plausible readings with odd byte counts: every figure grows from stage to stage."""
    rng = random.Random(seed)
    ctx_res = rng.randrange(1, 4 * M)
    w_alloc = rng.randrange(1, 10_000 * M)
    w_res = w_alloc + rng.randrange(0, 64 * M)
    pool_alloc = w_alloc + rng.randrange(0, 2_000 * M)
    pool_res = max(w_res, pool_alloc) + rng.randrange(0, 64 * M)
    warm_alloc = pool_alloc + rng.randrange(0, 100 * M)
    warm_peak = warm_alloc + rng.randrange(0, 5_000 * M)
    warm_res = max(pool_res, warm_peak) + rng.randrange(0, 100 * M)
    ctx_proc = ctx_res + rng.randrange(300 * M, 1300 * M)
    warm_proc = ctx_proc + (warm_res - ctx_res) + rng.randrange(0, 200 * M)
    base = rng.randrange(0, 1000 * M)
    return {
        "start": Reading("start", None, base, 0, 0, 0),
        "context": Reading("context", ctx_proc, base + ctx_proc, 0, ctx_res, rng.randrange(0, 1024)),
        "weights": Reading("weights", ctx_proc + w_res, base + ctx_proc + w_res, w_alloc, w_res, w_alloc),
        "pool": Reading("pool", ctx_proc + pool_res, base + ctx_proc + pool_res, pool_alloc, pool_res, pool_alloc),
        "warmup": Reading("warmup", warm_proc, base + warm_proc, warm_alloc, warm_res, warm_peak),
    }


@pytest.mark.parametrize("seed", range(5))
def test_parts_add_up_to_the_driver_total_to_the_byte(seed):
    parts, method = split(_random_readings(seed))
    total = parts.pop("driver_total")
    assert method == "nvml_process"
    assert sum(parts.values()) == total
    assert all(v >= 0 for k, v in parts.items() if k != "other"), parts


def test_start_stage_does_not_touch_cuda(allocator):
    ledger = MemoryLedger(torch.device("cuda:0"), ScriptedNvml(NVML_LISTED))
    ledger.mark("start")
    assert allocator.calls == []
    assert ledger.readings["start"] == Reading("start", None, 1000 * M, 0, 0, 0)
    ledger.mark("context")
    assert "synchronize" in allocator.calls and "reset_peak_memory_stats" in allocator.calls
    with pytest.raises(ValueError, match="unknown stage"):
        ledger.mark("loaded")


def test_peak_is_measured_from_the_previous_stage(allocator):
    ledger = run_startup(allocator, ScriptedNvml(NVML_LISTED))
    assert [ledger.readings[s].peak_allocated for s in STAGES] == [0, 0, 240 * M, 390 * M, 850 * M]
    assert allocator.peak == 422 * M  # reset after the last reading


REPORT_KEYS = {"device", "gpu", "gpu_name", "driver_version", "gpu_total_mib", "driver_figure", "driver_figure_note",
               "total_mib", "parts_mib", "parts_explain_percent", "weights_expected_mib", "slot_pool_expected_mib",
               "each_extra_worker_costs_mib", "stages"}


def test_breakdown_json(allocator):
    ledger = run_startup(allocator, ScriptedNvml(NVML_LISTED))
    report = json.loads(json.dumps(ledger.breakdown(weights_bytes=240 * M, pool_bytes=150 * M)))
    assert set(report) == REPORT_KEYS
    assert report["gpu"] is True
    assert (report["gpu_name"], report["driver_version"], report["gpu_total_mib"]) == ("Fake GPU", "999.1", 81920.0)
    assert report["driver_figure"] == "nvml_process"
    assert report["total_mib"] == 1480.0
    assert report["parts_mib"] == {k: float(v) for k, v in LISTED_PARTS.items()}
    assert report["parts_explain_percent"] == round(100 * 1432 / 1480, 2) == 96.76
    assert report["each_extra_worker_costs_mib"] == 910.0  # context 520 + weights 240 + its own pool 150
    assert (report["weights_expected_mib"], report["slot_pool_expected_mib"]) == (240.0, 150.0)
    assert set(report["stages"]) == set(STAGES)
    assert report["stages"]["start"] == {"driver_process": None, "driver_device_used": 1000.0, "allocated": 0.0,
                                         "reserved": 0.0, "peak_allocated": 0.0}
    assert report["stages"]["warmup"] == {"driver_process": 1480.0, "driver_device_used": 2550.0,
                                          "allocated": 422.0, "reserved": 912.0, "peak_allocated": 850.0}


def test_cpu_report_says_there_is_no_gpu():
    ledger = MemoryLedger.for_device(torch.device("cpu"))
    for stage in STAGES:
        ledger.mark(stage)
    report = json.loads(json.dumps(ledger.breakdown(weights_bytes=3 * M, pool_bytes=M // 2)))
    assert report["gpu"] is False
    assert "no GPU" in report["note"]
    assert (report["weights_mib"], report["slot_pool_mib"]) == (3.0, 0.5)
    assert "parts_mib" not in report


# ---- the plan ----


TINY = {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 2048, "n_positions": 512}


def transformers_parameter_count(**config) -> int:
    """sum(p.numel()) of transformers' own GPT2LMHeadModel, built on the meta device (no memory)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, **config))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,config", [
    ("110m", {**vars(plan_memory.SHAPES["110m"])}),
    ("3.5b", {**vars(plan_memory.SHAPES["3.5b"])}),
    ("tiny", TINY),
    ("tiny, n_inner 300", {**TINY, "n_inner": 300}),
    ("tiny, untied head", {**TINY, "tie_word_embeddings": False}),
])
def test_parameter_count_matches_transformers(name, config):
    assert ModelShape.from_config(config).parameter_count() == transformers_parameter_count(**config)


def test_parameter_count_of_the_saved_tiny_model(tiny_model_dir):
    from safetensors import safe_open

    config = json.loads((tiny_model_dir / "config.json").read_text())
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:  # tied lm_head is saved once
        saved = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    assert ModelShape.from_config(config).parameter_count() == saved


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@pytest.mark.parametrize("shape,S,L,K,dtype_bytes,expected", [
    # 2 * layers * slots * (max_len + the candidate bucket of K) * d * bytes, by hand
    (plan_memory.SHAPES["110m"], 8, 512, 16, 2, 155_713_536),  # 2*12*8*528*768*2
    (plan_memory.SHAPES["3.5b"], 1, 200, 4, 4, 150_405_120),  # 2*30*1*204*3072*4
    (ModelShape(**TINY), 2, 30, 1, 2, 139_264),  # 2*4*2*34*128*2 (k 1: the smallest bucket, 4 candidates)
])
def test_kv_cache_bytes_are_the_hand_formula(shape, S, L, K, dtype_bytes, expected):
    pool = PoolShape(S, L, K)
    got = pool_parts(shape, pool, dtype_bytes)
    assert got["kv_cache"] == expected
    assert got["context_hidden"] == S * L * shape.n_embd * 4  # float32 whatever the model's dtype
    assert activation_bytes(shape, pool, dtype_bytes) > 0


def test_plan_kv_part_is_the_formula_in_mib():
    plan = Plan(plan_memory.SHAPES["110m"], 2, 1, 8, 16, 512, 520.0)
    assert plan.per_worker()["kv_cache"] == round(155_713_536 / M, 1) == 148.5


def test_3_5b_weights_in_fp16_are_about_6_8_thousand_mib():
    plan = Plan(plan_memory.SHAPES["3.5b"], 2, 1, 1, 4, 128, 520.0)
    weights = plan.per_worker()["weights"]
    assert weights == round(3_556_270_080 * 2 / M, 1) == 6783.0
    assert 6.7e3 < weights < 6.9e3  # 7.11 GB, 6.62 GiB


@pytest.mark.parametrize("workers", [1, 3, 16])
def test_per_gpu_is_workers_times_per_worker(workers):
    plan = Plan(plan_memory.SHAPES["110m"], 2, workers, 8, 16, 512, 520.0)
    per_worker = plan.per_worker()
    assert plan.per_gpu_mib() == round(workers * per_worker["total"], 1)
    parts = [v for k, v in per_worker.items() if k != "total"]
    assert per_worker["total"] == pytest.approx(sum(parts), abs=0.05 * len(parts))


def test_more_context_batch_and_length_cost_more():
    base = Plan(plan_memory.SHAPES["110m"], 2, 1, 8, 16, 512, 520.0).per_worker()["total"]
    assert Plan(plan_memory.SHAPES["110m"], 2, 1, 8, 16, 512, 1252.0).per_worker()["total"] == pytest.approx(
        base + 732, abs=0.1)
    assert Plan(plan_memory.SHAPES["110m"], 2, 1, 16, 16, 512, 520.0).per_worker()["total"] > base
    assert Plan(plan_memory.SHAPES["110m"], 2, 1, 8, 16, 1024, 520.0).per_worker()["total"] > base
    assert Plan(plan_memory.SHAPES["110m"], 4, 1, 8, 16, 512, 520.0).per_worker()["total"] > base


# ---- scripts/plan_memory.py ----


@pytest.mark.parametrize("argv,rc,verdict", [
    (["--shape", "110m", "--gpu", "h100"], 0, "FITS"),
    (["--shape", "3.5b", "--gpu", "h100", "--slots", "8"], 0, "FITS"),
    (["--shape", "3.5b", "--workers", "16", "--gpu-mib", "16384"], 1, "DOES NOT FIT"),
    (["--shape", "3.5b", "--gpu", "t4"], 0, "FITS"),
    (["--shape", "3.5b", "--gpu", "t4", "--workers", "2"], 1, "DOES NOT FIT"),
])
def test_plan_cli_verdict_and_exit_status(capsys, argv, rc, verdict):
    assert plan_memory.main(argv) == rc
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    assert last.startswith(verdict + ":"), out
    for part in ("cuda_context", "weights", "kv_cache", "context_hidden_and_slots", "activations",
                 "allocator_slack", "total"):
        assert part in out


def test_plan_cli_json(capsys):
    assert plan_memory.main(["--shape", "3.5b", "--workers", "16", "--gpu-mib", "16384", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False
    assert report["per_gpu_mib"] == pytest.approx(16 * report["per_worker_mib"]["total"], abs=0.1)
    assert report["headroom_mib"] == pytest.approx(16384 - report["per_gpu_mib"], abs=0.1)
    assert report["parameters"] == 3_556_270_080
    assert report["per_worker_mib"]["cuda_context"] == 520.0


def test_plan_cli_context_option(capsys):
    assert plan_memory.main(["--shape", "110m", "--context-mib", "1252", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_worker_mib"]["cuda_context"] == 1252.0


def test_plan_cli_on_the_tiny_model_dir(capsys, tiny_model_dir):
    assert plan_memory.main(["--model-dir", str(tiny_model_dir), "--workers", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert report["shape"]["n_layer"] == config["n_layer"] == TINY_DEFAULTS["n_layer"]
    assert report["shape"]["vocab_size"] == config["vocab_size"]
    assert report["parameters"] == transformers_parameter_count(
        **{k: config[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions")})
    assert report["fits"] is True and report["workers_per_gpu"] == 4


@pytest.mark.parametrize("argv,message", [
    (["--shape", "110m", "--max-len", "2048"], "exceeds the model's 1024 positions"),
    (["--config", "/nonexistent/config.json"], "cannot read"),
])
def test_plan_cli_usage_errors(capsys, argv, message):
    assert plan_memory.main(argv) == 2
    assert message in capsys.readouterr().err


def test_plan_cli_refuses_a_config_that_is_not_gpt2(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    assert plan_memory.main(["--config", str(config)]) == 2
    assert "'llama'" in capsys.readouterr().err


def test_plan_cli_reads_transformers_alias_names(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "gpt2", "num_hidden_layers": 12, "hidden_size": 768,
                                  "num_attention_heads": 12, "max_position_embeddings": 1024, "vocab_size": 50257}))
    assert plan_memory.main(["--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 124_439_808


# ---- scripts/measure_cuda_context.py ----


no_cuda_only = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script measures instead")


@no_cuda_only
def test_measure_without_cuda_exits_cleanly_with_the_message():
    proc = subprocess.run([sys.executable, "scripts/measure_cuda_context.py"], cwd=plan_memory.REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA device: nothing to measure"


@no_cuda_only
def test_measure_without_cuda_json(capsys):
    assert measure_cuda_context.main(["--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"cuda": False, "message": "no CUDA device: nothing to measure"}


@no_cuda_only
def test_plan_measure_context_without_cuda_is_a_usage_error(capsys):
    assert plan_memory.main(["--shape", "110m", "--measure-context"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


BASE_RAW = {"mode": "LAZY", "torch": "2.11.0", "cuda": "12.8", "gpu_name": "NVIDIA H100 80GB HBM3",
            "driver_version": "570.1", "reserved": 2 * M, "allocated": 512}


@pytest.mark.parametrize("nvml,method,process_mib,context_mib", [
    ({"process_before": None, "device_used_before": 100 * M, "process_after": 522 * M,
      "device_used_after": 700 * M}, "nvml_process", 522.0, 520.0),
    ({"process_before": None, "device_used_before": 100 * M, "process_after": None,
      "device_used_after": 624 * M}, "nvml_device_delta", 524.0, 522.0),
    ({"process_before": None, "device_used_before": None, "process_after": None,
      "device_used_after": None, "nvml_error": "NVMLError_LibraryNotFound"}, "unavailable", None, None),
])
def test_measure_summary_picks_the_driver_figure(nvml, method, process_mib, context_mib):
    row = measure_cuda_context.summarize({**BASE_RAW, **nvml})
    assert (row["method"], row["process_mib"], row["context_mib"]) == (method, process_mib, context_mib)
    assert row["reserved_mib"] == 2.0 and row["mode"] == "LAZY"
    assert ("warning" in row) == ("nvml_error" in nvml)
    table = measure_cuda_context.format_table([row])
    assert "context MiB" in table and method in table


def test_measure_summary_warns_when_a_context_existed_before():
    row = measure_cuda_context.summarize({**BASE_RAW, "process_before": 300 * M, "device_used_before": 400 * M,
                                          "process_after": 522 * M, "device_used_after": 622 * M})
    assert "300.0 MiB before" in row["warning"]


def test_with_graphs_the_step_activations_move_into_the_graphs_part():
    from handler.memory.plan import prefill_activation_bytes, step_activation_bytes

    shape = plan_memory.SHAPES["110m"]
    eager = Plan(shape, 2, 1, 8, 16, 512, 520.0).per_worker()
    graphs = Plan(shape, 2, 1, 8, 16, 512, 520.0, graphs=True).per_worker()
    pool = PoolShape(8, 512, 16)
    assert "graphs" not in eager
    assert graphs["activations"] == round(prefill_activation_bytes(shape, pool, 2, 256) / M, 1)
    assert graphs["graphs"] == round(step_activation_bytes(shape, pool, 2) / M + graphs["workspaces"], 1)
    assert eager["activations"] == round(activation_bytes(shape, pool, 2, 256) / M, 1)
    # a worker with graphs holds the prefill's activations in the cache and the step's in the graphs' pool
    assert graphs["total"] > eager["total"]
