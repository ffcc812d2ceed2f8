#!/usr/bin/env python3
"""The GPU report: one command, on a machine with an NVIDIA GPU, proves or disproves the GPU path.

    make gpu-wheels    # once, on a machine with network: the wheels the GPU machine lacks, into .whl/
    make gpu-report    # on the GPU machine (PyTorch, transformers, no TorchServe frontend, no network)

The GPU machine has PyTorch and transformers but not TorchServe's Python package `ts` (which the handler
imports) nor transformers 4.55.4 (the contrastive-search baseline). `make gpu-wheels` downloads them as
wheels into .whl/serve and .whl/hf; this report installs them with `pip --no-index --find-links` into
throwaway `--target` folders under .gpu-report/ and puts them on PYTHONPATH (the 4.55 one only for the
baseline's process). Nothing else is installed and nothing is fetched.

Parts (`parts()`), in the issue's priority order, within one deadline DEADLINE_S (8 minutes) that bounds every
timeout (pip staging and plan_memory included); each runs in its own process, and the report is rewritten after
each part, so that a run cut short still returns what finished. A part that does not fit is labelled
"not run: time" (or "cut short: time" when the deadline stopped it), never a failure:

1. TorchServe's ts staged (when missing);
2. the 110M worker: started in-process through a TorchServe context (`handler.gpt2_handler`, the shipped
   model-config.yaml; random weights from a GPT2Config saved under .gpu-report/models, built on the CPU
   meanwhile): its start-up time, which decode step serves and its self-check, its memory breakdown against
   NVML's per-process figure (the parts must explain it within 2%) and scripts/plan_memory.py (within 10%);
3. 110M speed: benchmarks/decode.py eager vs graphs (and compiled and cudagraph trees at batch 1), batch 1, 8, 32;
4. the CUDA context with lazy and eager module loading (gpt2ops/measure_cuda_context.py);
5. batch invariance: one request alone vs beside seven others, decode_shapes buckets and fixed;
6. the GPU tests: tests/memory/test_gpu_memory.py and tests/gpu/ (pytest);
7. the 3.5B worker and its speed at batch 1 and 8;
8. transformers 4.55.4's contrastive search (benchmarks/hf_contrastive.py) when its wheels are staged.

The torch, CUDA and driver it ran on are printed beside what the image ships (read from the Dockerfile and
requirements-serve.txt). `--dry-run` runs the same ordering and labelling on a fake clock that advances by each
part's cold estimate, and prints the order and labels (no GPU needed).

It writes gpu-report.md and gpu-report.json (--out) and exits 0 when no check failed ("not run" is not a
failure), 1 when one failed. Without CUDA it says so and exits 2 without writing anything.

Weights: the workers' 110M and 3.5B weights are drawn with std INIT_STD (GPT-2's own 0.02 gives nearly
uniform next-token distributions, whose near ties make token comparisons between float16 kernels measure
rounding only); the benchmark builds its own with GPT2Config's default 0.02, so its eager-vs-graphs
agreement is the pessimistic figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpt2ops import REPO
from handler.memory.plan import REFERENCE_SHAPES, config_kwargs

DEADLINE_S = 480.0
RESERVE_S = 15.0  # kept for writing the report
NO_CUDA = "no CUDA device: the GPU report needs an NVIDIA GPU with CUDA; nothing was written"
INIT_STD = 0.1
SHAPES = {name: config_kwargs(shape) for name, shape in REFERENCE_SHAPES.items()}  # GPT2Config kwargs
# (shape, batch) -> decode steps to time; trees (mode="reduce-overhead") once, to compare with manual capture
SPEED = [("110m", 1, ["eager", "compiled", "graphs", "trees"]), ("110m", 8, ["eager", "graphs"]),
         ("110m", 32, ["eager", "graphs"]), ("3.5b", 1, ["eager", "graphs"]), ("3.5b", 8, ["eager", "graphs"])]
NEW_TOKENS = 128
# the targets (H100, fp16, 16-token prompt, 128 new tokens) and transformers 4.55.4 measured there
TARGETS = {("110m", 1): ("ms_per_step", "<=", 0.8), ("110m", 32): ("tokens_per_s", ">=", 20_000),
           ("3.5b", 1): ("ms_per_step", "<=", 4.4), ("3.5b", 8): ("tokens_per_s", ">=", 1_600)}
HF_REFERENCE = {("110m", 1): "11.9 ms/step", ("110m", 8): "691 tokens/s", ("110m", 32): "1,688 tokens/s",
                ("3.5b", 1): "37.3 ms/step", ("3.5b", 8): "303 tokens/s"}
STARTUP_LIMIT_S = {"110m": 120.0}
MEMORY_TARGET_SLACK_MIB = 64.0

# A worker started as TorchServe's would be (a fresh process), with the shipped model-config.yaml.
WORKER = r"""
import json, sys, time
from pathlib import Path
import yaml
from handler.gpt2_handler import ContrastiveGPT2Handler
from gpt2ops.worker_context import make_context

model_dir = Path(sys.argv[1])
config = yaml.safe_load((Path.cwd() / "model-config.yaml").read_text())
start = time.perf_counter()
handler = ContrastiveGPT2Handler()
handler.initialize(make_context(model_dir, config, gpu=0))
startup_s = time.perf_counter() - start
pool = handler.engine.shape
print(json.dumps({
    "startup_s": startup_s,
    "describe": json.loads(handler.describe_handle()),
    "pool": [pool.max_slots, pool.max_len, pool.max_top_k],
    "dtype": str(handler.loaded.model.dtype).replace("torch.", ""),
}))
"""

# One contrastive request alone, then in slot 0 beside seven others of other lengths and k, eager fp16 on the GPU:
# cuBLAS picks kernels (and split-K) by row count, so the tokens show whether a slot's bits depend on its
# neighbours, for decode_shapes buckets (the step's rows follow the live slots) and fixed (always the full pool).
BATCH_INVARIANCE = r"""
import json, sys
import torch
from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.engine.model import load_gpt2

_, model = load_gpt2(sys.argv[1], torch.device("cuda"), torch.float16)
new = 64
target = Request("target", [11, 22, 33, 44, 55, 66, 77, 88], GenerationParams(penalty_alpha=0.6, top_k=4,
                 max_new_tokens=new), (), seed=1)
others = [Request(f"other-{i}", [1 + (7 * i + 3 * j) % 2000 for j in range(5 + 3 * i)],
                  GenerationParams(penalty_alpha=0.6, top_k=4 + i % 4, max_new_tokens=new), (), seed=i)
          for i in range(7)]
out = {}
for shapes in ("buckets", "fixed"):
    engine = Engine(model, PoolShape(8, 160, 8), fixed_shapes=shapes == "fixed")
    alone = engine.run_to_completion([target])[0].tokens
    beside = engine.run_to_completion([target, *others])[0].tokens
    diff = next((i for i, (a, b) in enumerate(zip(alone, beside)) if a != b), None)
    out[shapes] = {"tokens": len(alone), "same": sum(a == b for a, b in zip(alone, beside)),
                   "identical": alone == beside, "first_difference": diff, "step": "eager"}
print(json.dumps(out))
"""

# Random GPT-2 weights from a GPT2Config, saved as a model folder the handler loads (no network).
BUILD = r"""
import json, sys, math
from pathlib import Path
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel
from gpt2ops.tiny_model import EOS, train_tokenizer

out, shape, std = Path(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
tokenizer = train_tokenizer(Path("data/corpus.txt"), 2048)
eos = tokenizer.convert_tokens_to_ids(EOS)
config = GPT2Config(**shape, initializer_range=std, bos_token_id=eos, eos_token_id=eos)
with torch.device("meta"):
    model = GPT2LMHeadModel(config).to(torch.float16)
model = model.to_empty(device="cpu")
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.zero_()
        elif ".ln_" in name or name.startswith("transformer.ln_f"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std / math.sqrt(2 * config.n_layer) if name.endswith("c_proj.weight") else std)
    model.tie_weights()
out.mkdir(parents=True, exist_ok=True)
model.save_pretrained(out)
tokenizer.save_pretrained(out)
GenerationConfig(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos).save_pretrained(out)
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
"""


class Clock:
    """One deadline for every timeout of the report."""

    def __init__(self, deadline_s: float):
        self.start = self._now()
        self.deadline = self.start + deadline_s

    def _now(self) -> float:
        return time.monotonic()

    def left(self) -> float:
        return self.deadline - RESERVE_S - self._now()

    def elapsed(self) -> float:
        return self._now() - self.start


def run(cmd: list[str], env: dict, timeout: float, cwd: Path = REPO) -> dict:
    """A command in its own process group (killed whole on timeout); returns rc, seconds, stdout, stderr."""
    start = time.monotonic()
    if timeout <= 1:
        return {"rc": None, "seconds": 0.0, "stdout": "", "stderr": "", "skipped": "no time left"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return {"rc": proc.returncode, "seconds": round(time.monotonic() - start, 1), "stdout": out, "stderr": err,
            "timed_out": timed_out, "timeout_s": round(timeout, 1)}


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def tail(text: str, n: int = 3000) -> str:
    return text[-n:]


# ---- staging ----


def stage(name: str, wheels: Path, site: Path, packages: list[str], env: dict, timeout: float) -> dict:
    """pip install --no-index --find-links <wheels> --no-deps --target <site> <packages>."""
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        return {"staged": False, "reason": f"no wheels in {wheels} (run `make gpu-wheels` on a machine with network)"}
    if site.is_dir() and (site / ".staged").is_file():
        return {"staged": True, "site": str(site), "reused": True}
    shutil.rmtree(site, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
           "--find-links", str(wheels), "--no-deps", "--target", str(site), *packages]
    result = run(cmd, env, timeout)
    if result.get("skipped"):
        return {"staged": False, "reason": f"not run: time (pip install of {name})"}
    if result["rc"] != 0:
        return {"staged": False, "reason": f"pip install of {name} failed: {tail(result['stderr'], 800)}"}
    (site / ".staged").write_text("ok\n")
    return {"staged": True, "site": str(site)}


def environment() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
            "gpus": torch.cuda.device_count(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    for module in ("transformers", "triton", "ts"):
        try:
            info[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            info[module] = f"missing ({type(err).__name__})"
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        info["driver"] = info["driver"].decode() if isinstance(info["driver"], bytes) else str(info["driver"])
    except Exception as err:  # noqa: BLE001
        info["driver"] = f"unknown ({type(err).__name__})"
    return info


# ---- checks ----


def verdict(name: str, passed: bool | None, measured: str, target: str) -> dict:
    return {"check": name, "result": "pass" if passed else ("not run" if passed is None else "FAIL"),
            "measured": measured, "target": target}


def memory_checks(shape: str, worker: dict, plan: dict | None) -> list[dict]:
    d = worker["describe"]
    mem, step = d["memory"], d["decode_step"]
    parts = mem.get("parts_mib", {})
    out = [verdict(f"{shape}: decode step serving", step["live"] == "cuda-graphs", step["live"],
                 "cuda-graphs (compile: auto on a GPU)"),
           verdict(f"{shape}: start-up self-check", bool(step.get("step_check") and step["step_check"]["passed"]),
                 step["reason"], "every step as eager within the dtype's tolerance (near ties counted)")]
    explained = mem.get("parts_explain_percent")
    out.append(verdict(f"{shape}: named parts explain NVML's per-process figure", explained is not None
                     and 98 <= explained <= 102, f"{explained}% of {mem.get('total_mib')} MiB "
                     f"({mem.get('driver_figure')})", "98-102%"))
    if plan is not None:
        predicted, measured = plan["per_worker_mib"]["total"], mem.get("total_mib")
        diff = None if not measured else 100 * (predicted - measured) / measured
        out.append(verdict(f"{shape}: plan_memory.py predicts the total", diff is not None and abs(diff) <= 10,
                         f"plan {predicted} MiB vs measured {measured} MiB ({diff:+.1f}%)" if diff is not None
                         else "no measured total", "within 10%"))
    if shape == "110m" and parts:
        named = parts.get("cuda_context", 0) + parts.get("weights", 0) + parts.get("slot_pool", 0) \
            + parts.get("graphs", 0)
        out.append(verdict(f"{shape}: total after start vs context + weights + pool + graphs",
                         mem["total_mib"] <= named + MEMORY_TARGET_SLACK_MIB,
                         f"{mem['total_mib']} MiB vs {named:.1f} MiB + {MEMORY_TARGET_SLACK_MIB:g}",
                         f"<= named + {MEMORY_TARGET_SLACK_MIB:g} MiB"))
    if shape in STARTUP_LIMIT_S:
        limit = STARTUP_LIMIT_S[shape]
        out.append(verdict(f"{shape}: start-up with compile and capture", worker["startup_s"] <= limit,
                         f"{worker['startup_s']:.1f} s (compile {step.get('compile_s')} s, capture "
                         f"{step.get('capture_s')} s, shapes {step.get('shapes')}, skipped "
                         f"{step.get('skipped_shapes')})", f"<= {limit:g} s"))
    return out


def speed_checks(rows: list[dict]) -> list[dict]:
    out = []
    for (shape, batch), (metric, op, limit) in TARGETS.items():
        row = next((r for r in rows if r["shape"] == shape and r["batch"] == batch), None)
        got = row and row["steps"].get("graphs")
        if not got:
            out.append(verdict(f"{shape} batch {batch}: graphs {metric}", None, "not measured", f"{op} {limit:,}"))
            continue
        value = got[metric]
        ok = value <= limit if op == "<=" else value >= limit
        out.append(verdict(f"{shape} batch {batch}: graphs {metric}", ok, f"{value:,.2f}", f"{op} {limit:,}"))
    return out


# ---- the report ----


# ---- the parts, in priority order ----


class CutShort(Exception):
    """A part stopped by the deadline (its timeouts are the deadline's): not a failure."""


class Part:
    """One part of the report: `min_s` is what it needs at least to be worth starting (else "not run: time");
    `estimate_s` is what it takes cold on an H100 (the dry run's fake clock advances by it)."""

    def __init__(self, name: str, min_s: float, estimate_s: float, run):
        self.name, self.min_s, self.estimate_s, self.run = name, min_s, estimate_s, run


def parts() -> list[Part]:
    """The priority order of the issue: self-check, fast path and memory split vs NVML on 110M (one worker), 110M
    speed, the CUDA context, batch invariance, the GPU tests, 3.5B, the transformers baseline last."""
    return [
        Part("stage TorchServe's ts", 5, 15, stage_serve),
        Part("110m worker: self-check, fast path, memory split vs NVML", 60, 120,
             lambda ctx: worker_part("110m", ctx)),
        *[Part(f"110m speed batch {batch}", 40, 60, lambda ctx, b=batch: speed_part("110m", b, ctx))
          for shape, batch, _steps in SPEED if shape == "110m"],
        Part("CUDA context, lazy and eager", 20, 30, context_part),
        Part("batch invariance: one request alone vs beside seven", 30, 45, invariance_part),
        Part("GPU tests (memory split, fast path)", 60, 120, gpu_tests_part),
        Part("3.5b worker", 90, 200, lambda ctx: worker_part("3.5b", ctx)),
        *[Part(f"3.5b speed batch {batch}", 60, 90, lambda ctx, b=batch: speed_part("3.5b", b, ctx))
          for shape, batch, _steps in SPEED if shape == "3.5b"],
        Part("transformers 4.55.4 baseline", 60, 120, hf_part),
    ]


class Context:
    """What the parts share: the clock (one deadline for every timeout), the environment, the report."""

    def __init__(self, args, clock: Clock, env: dict, report: dict):
        self.args, self.clock, self.env, self.report = args, clock, env, report
        self.rows: list[dict] = []
        self.has_ts = False
        self.builders: dict[str, subprocess.Popen] = {}

    def timeout(self, cap: float) -> float:
        """A part's timeout: its own cap, never past the deadline."""
        return max(0.0, min(cap, self.clock.left()))

    def skip(self, section: str, reason: str) -> None:
        self.report["skipped"].append({"section": section, "reason": reason})


def image_versions(repo: Path = REPO) -> dict:
    """What the image ships, read from the repo's pins (Dockerfile, requirements-serve.txt): torch and its wheel
    index (the CUDA build), TorchServe."""
    texts = {name: (repo / name).read_text() if (repo / name).is_file() else ""
             for name in ("Dockerfile", "requirements-serve.txt")}
    out = {"torch": None, "torch_index": None, "torchserve": None}
    for name, text in texts.items():
        for line in text.splitlines():
            line = line.split("#", 1)[0]
            torch_pin = re.search(r"(?<![\w-])torch==([\w.+]+)", line)
            if torch_pin and out["torch"] is None:
                out["torch"] = f"{torch_pin.group(1)} ({name})"
            index = re.search(r"--(?:extra-)?index-url\s+(\S+)", line)
            if index and torch_pin:
                out["torch_index"] = index.group(1)
            ts_pin = re.search(r"(?<![\w-])torchserve==([\w.+]+)", line)
            if ts_pin and out["torchserve"] is None:
                out["torchserve"] = ts_pin.group(1)
    if out["torch"] and out["torch_index"] is None:
        out["torch_index"] = "PyPI (its default CUDA build)"
    return out


def save(report: dict, out: Path, clock: Clock) -> None:
    """Write gpu-report.json and .md now: a run cut short still leaves every finished part."""
    report["elapsed_s"] = round(clock.elapsed(), 1)
    out.mkdir(parents=True, exist_ok=True)
    report["pictures"] = draw_pictures(report, out)
    (out / "gpu-report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu-report.md").write_text(markdown(report))


def draw_pictures(report: dict, out: Path) -> list[str]:
    """Each worker's measured memory beside its plan (gpt2ops.plots), when matplotlib is installed here; else one
    line saying how to draw them later from gpu-report.json (the lent GPU machines lack matplotlib)."""
    try:
        from gpt2ops.plots import gpu_report_figures

        return [path.name for path in gpu_report_figures(report, out)]
    except ImportError:
        return ["not drawn: no matplotlib here; draw them from this report with "
                "`python -m gpt2ops.plots gpu-report.json`"]


def run_parts(plan: list[Part], ctx: Context, execute=None) -> list[tuple[str, str]]:
    """Each part in order while it fits; the report is written after each. Returns (part, label) in order:
    "ran", "not run: time" (too little left: never a failure), or "failed: ..." (the part raised)."""
    labels = []
    for part in plan:
        if ctx.clock.left() < part.min_s:
            label = "not run: time"
            ctx.skip(part.name, f"not run: time ({ctx.clock.left():.0f} s left, needs {part.min_s:g} s)")
        else:
            try:
                (execute or (lambda p: p.run(ctx)))(part)
                label = "ran"
            except CutShort as err:
                label = f"cut short: time ({err})"
                ctx.skip(part.name, label)
            except Exception as err:  # noqa: BLE001 - one part's failure is reported, the others still run
                label = f"failed: {type(err).__name__}: {err}"
                ctx.report["checks"].append(verdict(part.name, False, label, "runs"))
        labels.append((part.name, label))
        ctx.report.setdefault("parts", []).append({"part": part.name, "result": label,
                                                   "at_s": round(ctx.clock.elapsed(), 1)})
        save(ctx.report, ctx.args.out, ctx.clock)
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO, help="folder for gpu-report.md and gpu-report.json")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="staged wheels (make gpu-wheels)")
    parser.add_argument("--work", type=Path, default=REPO / ".gpu-report", help="models, caches, staged packages")
    parser.add_argument("--deadline-s", type=float, default=DEADLINE_S)
    parser.add_argument("--dry-run", action="store_true", help="no GPU needed: a fake clock advances by each "
                        "part's cold estimate; prints the order and each part's label, writes to --out")
    args = parser.parse_args(argv)
    if args.dry_run:
        return dry_run(args)

    import torch  # is_available does not create a context

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    clock = Clock(args.deadline_s)
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TORCHINDUCTOR_CACHE_DIR=str(args.work / "cache" / "inductor"),
               TRITON_CACHE_DIR=str(args.work / "cache" / "triton"))
    env["PYTHONPATH"] = os.pathsep.join([p for p in (str(REPO), env.get("PYTHONPATH")) if p])
    report: dict = {"sections": {}, "checks": [], "skipped": [], "staging": {}, "environment": environment(),
                    "image": image_versions()}
    ctx = Context(args, clock, env, report)
    start_builders(ctx)
    run_parts(parts(), ctx)
    for builder in ctx.builders.values():
        if builder.poll() is None:
            os.killpg(builder.pid, signal.SIGKILL)
    report["sections"]["speed"] = ctx.rows
    report["checks"] += speed_checks(ctx.rows)
    save(report, args.out, clock)
    failed = [c for c in report["checks"] if c["result"] == "FAIL"]
    not_run = [c for c in report["checks"] if c["result"] != "FAIL" and c["result"] != "pass"]
    print(f"wrote {args.out / 'gpu-report.md'} and gpu-report.json in {report['elapsed_s']} s: "
          f"{len(report['checks']) - len(failed) - len(not_run)} of {len(report['checks'])} checks passed, "
          f"{len(failed)} failed, {len(not_run)} not run")
    for c in failed + not_run:
        print(f"  {c['result']}: {c['check']}: {c['measured']} (target {c['target']})")
    return 0 if not failed else 1


class FakeClock(Clock):
    """The dry run's clock: time moves only when a part "runs" (by its estimate)."""

    def __init__(self, deadline_s: float):
        self.now = 0.0
        self.start = 0.0
        self.deadline = deadline_s

    def _now(self) -> float:
        return self.now


def dry_run(args) -> int:
    """The order and the labels within the deadline, on a fake clock: each part advances it by its estimate."""
    clock = FakeClock(args.deadline_s)
    report: dict = {"sections": {}, "checks": [], "skipped": [], "staging": {}, "dry_run": True,
                    "environment": {"gpu": "none (dry run)", "capability": [0, 0], "torch": "-", "cuda": "-",
                                    "python": sys.version.split()[0], "date": "-"}, "image": image_versions()}
    ctx = Context(args, clock, {}, report)

    def pretend(part: Part) -> None:
        """As the real part: its timeouts end at the deadline."""
        if part.estimate_s > clock.left():
            clock.now += max(0.0, clock.left())
            raise CutShort(f"needs about {part.estimate_s:g} s cold")
        clock.now += part.estimate_s

    labels = run_parts(parts(), ctx, execute=pretend)
    at = {p["part"]: p["at_s"] for p in report["parts"]}
    print(f"dry run on a fake clock, deadline {args.deadline_s:g} s ({RESERVE_S:g} s kept for writing):")
    for n, (name, label) in enumerate(labels, 1):
        print(f"{n:2d}. {name}: {label} (clock {at[name]:.0f} s)")
    print(f"done at {clock.elapsed():.0f} s of {args.deadline_s:g} s")
    return 0


def start_builders(ctx: Context) -> None:
    """The random-weight models, built on the CPU while the first parts run."""
    for name in SHAPES:
        folder = ctx.args.work / "models" / name
        if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        ctx.builders[name] = subprocess.Popen(
            [sys.executable, "-c", BUILD, str(folder), json.dumps(SHAPES[name]), str(INIT_STD)], cwd=REPO,
            env={**ctx.env, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)


def model_ready(name: str, ctx: Context) -> Path | None:
    """The model folder once its builder finished (waiting no longer than the deadline allows)."""
    builder = ctx.builders.get(name)
    if builder is not None:
        try:
            _, err = builder.communicate(timeout=max(1.0, ctx.timeout(300)))
        except subprocess.TimeoutExpired:
            os.killpg(builder.pid, signal.SIGKILL)
            builder.communicate()
            ctx.skip(f"{name} model", "not run: time (building the random weights did not finish)")
            return None
        if builder.returncode != 0:
            ctx.skip(f"{name} model", f"building the random weights failed: {tail(err, 800)}")
            return None
    return ctx.args.work / "models" / name


def stage_serve(ctx: Context) -> None:
    try:
        import ts  # noqa: F401

        ctx.report["staging"]["serve"] = {"staged": False, "reason": "ts already importable"}
    except ImportError:
        staged = stage("torchserve", ctx.args.wheels / "serve", ctx.args.work / "site" / "serve", ["torchserve"],
                       ctx.env, ctx.timeout(180))
        ctx.report["staging"]["serve"] = staged
        if staged.get("site"):
            ctx.env["PYTHONPATH"] = os.pathsep.join([staged["site"], ctx.env["PYTHONPATH"]])
            sys.path.insert(0, staged["site"])  # so that the environment line names the staged ts
            ctx.report["environment"]["ts"] = environment().get("ts")
    ctx.has_ts = run([sys.executable, "-c", "import ts"], ctx.env, ctx.timeout(60))["rc"] == 0


def worker_part(name: str, ctx: Context) -> None:
    folder = model_ready(name, ctx)
    if folder is None:
        ctx.report["checks"].append(verdict(f"{name}: worker starts", None, "not run: no model", "starts"))
    elif not ctx.has_ts:
        ctx.skip(f"memory {name}", "TorchServe's ts is not importable")
        ctx.report["checks"].append(verdict(f"{name}: worker starts", None, "not run: no ts", "starts"))
    else:
        worker_section(name, folder, ctx)


def speed_part(shape: str, batch: int, ctx: Context) -> None:
    steps = next(s for sh, b, s in SPEED if sh == shape and b == batch)
    out = ctx.args.work / f"speed-{shape}-{batch}.json"
    out.unlink(missing_ok=True)
    result = run([sys.executable, "-m", "benchmarks.decode", "--device", "cuda", "--shape", shape, "--batch",
                  str(batch), "--modes", "contrastive", "--new-tokens", str(NEW_TOKENS), "--steps", *steps,
                  "--json", str(out)], ctx.env, ctx.timeout(150))
    if out.is_file():
        ctx.rows += json.loads(out.read_text())["rows"]
        ctx.report["sections"]["speed"] = ctx.rows
    else:
        why = "not run: time" if result.get("skipped") else ("timed out" if result.get("timed_out")
                                                             else f"rc {result['rc']}")
        ctx.skip(f"speed {shape} batch {batch}", f"{why}: {tail(result['stderr'], 800)}")


def gpu_tests_part(ctx: Context) -> None:
    if not ctx.has_ts:
        ctx.skip("gpu_tests", "TorchServe's ts is not importable: "
                 + ctx.report["staging"].get("serve", {}).get("reason", ""))
        ctx.report["checks"].append(verdict("GPU tests pass", None, "not run: no ts", "all pass"))
        return
    result = run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                  "tests/memory/test_gpu_memory.py", "tests/gpu"], ctx.env, ctx.timeout(200))
    summary = re.findall(r"^=+ (.*(?:passed|failed|error|skipped).*) in [\d.]+s", result["stdout"], re.M)
    outcomes = re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED)\s+(\S+)", result["stdout"], re.M)
    ctx.report["sections"]["gpu_tests"] = {"rc": result["rc"], "seconds": result["seconds"],
                                           "timed_out": result.get("timed_out"), "summary": summary[-1:] or None,
                                           "outcomes": outcomes, "tail": tail(result["stdout"])}
    ctx.report["checks"].append(verdict("GPU tests pass", result["rc"] == 0,
                                      (summary[-1] if summary else f"rc {result['rc']}")
                                      + (" (timed out)" if result.get("timed_out") else ""), "all pass"))


def context_part(ctx: Context) -> None:
    result = run([sys.executable, "-m", "gpt2ops.measure_cuda_context", "--json"], ctx.env, ctx.timeout(90))
    ctx.report["sections"]["cuda_context"] = last_json_block(result["stdout"]) or {
        "rc": result["rc"], "stderr": tail(result["stderr"])}


def invariance_part(ctx: Context) -> None:
    folder = model_ready("110m", ctx)
    if folder is None:
        return
    result = run([sys.executable, "-c", BATCH_INVARIANCE, str(folder)], ctx.env, ctx.timeout(120))
    rows = last_json(result["stdout"]) if result["rc"] == 0 else None
    if rows is None:
        ctx.skip("batch invariance", f"rc {result['rc']}: {tail(result['stderr'], 800)}")
        return
    ctx.report["sections"]["batch_invariance"] = rows
    for shapes, row in rows.items():
        ctx.report["checks"].append(verdict(
            f"110m batch invariance, decode_shapes {shapes}: one request alone vs beside seven", row["identical"],
            f"{row['same']}/{row['tokens']} tokens the same (first difference at {row['first_difference']})",
            "identical tokens"))


def hf_part(ctx: Context) -> None:
    staged = stage("transformers 4.55.4", ctx.args.wheels / "hf", ctx.args.work / "site" / "hf",
                   ["transformers", "tokenizers", "huggingface-hub"], ctx.env, ctx.timeout(180))
    ctx.report["staging"]["hf"] = staged
    hf_section(staged, ctx)


def last_json_block(text: str) -> dict | None:
    """The JSON document a command printed (indented or one line)."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return last_json(text)


def worker_section(name: str, model_dir: Path, ctx: Context) -> None:
    report = ctx.report
    result = run([sys.executable, "-c", WORKER, str(model_dir)], ctx.env, ctx.timeout(240))
    if result.get("skipped"):
        report["checks"].append(verdict(f"{name}: worker starts", None, "not run: time", "starts"))
        return
    worker = last_json(result["stdout"]) if result["rc"] == 0 else None
    if worker is None and result.get("timed_out") and result["timeout_s"] < 240:
        raise CutShort(f"the {name} worker was stopped at the deadline")
    if worker is None:
        why = "timed out" if result.get("timed_out") else f"rc {result['rc']}"
        report["sections"][f"worker_{name}"] = {"error": why, "stderr": tail(result["stderr"])}
        report["checks"].append(verdict(f"{name}: worker starts", False, why, "starts"))
        return
    d, pool = worker["describe"], worker["pool"]
    live = d["decode_step"]["live"]
    context = d["memory"].get("parts_mib", {}).get("cuda_context")
    plan = None
    if context:
        cmd = [sys.executable, "scripts/plan_memory.py", str(model_dir), "--slots", str(pool[0]), "--max-len",
               str(pool[1]), "--top-k", str(pool[2]), "--dtype", worker["dtype"], "--context-mib", str(context),
               "--decode-step", "graphs" if live == "cuda-graphs" else "eager", "--json"]
        if report["environment"]["capability"][0] < 9:
            cmd += ["--workspace-mib", "8.125"]
        planned = run(cmd, ctx.env, ctx.timeout(60))
        plan = last_json_block(planned["stdout"])
    report["sections"][f"worker_{name}"] = {**worker, "plan": plan, "log_tail": tail(result["stderr"], 2000)}
    report["checks"] += memory_checks(name, worker, plan)


def hf_section(staged: dict, ctx: Context) -> None:
    if not staged.get("staged"):
        ctx.skip("transformers 4.55.4 baseline", staged.get("reason", "not staged"))
        return
    hf_env = dict(ctx.env, PYTHONPATH=os.pathsep.join([staged["site"], str(REPO)]))
    rows = []
    for shape, batches in (("110m", ["1", "8", "32"]), ("3.5b", ["1", "8"])):
        result = run([sys.executable, "-m", "benchmarks.hf_contrastive", "--device", "cuda", "--shape", shape,
                      "--batch", *batches, "--new-tokens", str(NEW_TOKENS)], hf_env, ctx.timeout(120))
        for line in result["stdout"].splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[1].startswith("hf-"):
                rows.append({"shape": cells[0], "batch": int(cells[2]), "ms_per_step": float(cells[3]),
                             "tokens_per_s": float(cells[4].replace(",", ""))})
        if result.get("skipped"):
            ctx.skip(f"transformers 4.55.4 baseline {shape}", "not run: time")
        elif result["rc"] != 0:
            ctx.skip(f"transformers 4.55.4 baseline {shape}", f"rc {result['rc']}: {tail(result['stderr'], 800)}")
    ctx.report["sections"]["hf_baseline"] = rows


def markdown(r: dict) -> str:
    e = r["environment"]
    lines = ["# GPU report" + (" (dry run: a fake clock, nothing measured)" if r.get("dry_run") else ""), "",
             f"{e['gpu']} (compute capability {'.'.join(map(str, e.get('capability', [])))}), driver {e.get('driver')}; "
             f"torch {e['torch']} (CUDA {e['cuda']}), triton {e.get('triton')}, transformers {e.get('transformers')}, "
             f"ts {e.get('ts')}, Python {e['python']}; {e['date']}; written in {r['elapsed_s']} s by "
             "`make gpu-report` (gpt2ops/gpu_report.py).", "",
             "| | ran on | the image ships |", "|---|---|---|",
             f"| torch | {e.get('torch')} | {(r.get('image') or {}).get('torch')} |",
             f"| CUDA | {e.get('cuda')} | {(r.get('image') or {}).get('torch_index')} |",
             f"| driver | {e.get('driver')} | (the host's) |",
             f"| TorchServe | {e.get('ts')} | {(r.get('image') or {}).get('torchserve')} |", "",
             "## Parts, in priority order", ""]
    lines += [f"- {p['part']}: {p['result']}" + (f" (at {p['at_s']} s)" if p.get("at_s") is not None else "")
              for p in r.get("parts", [])]
    lines += ["", "## Checks", "",
             "| check | result | measured | target |", "|---|---|---|---|"]
    lines += [f"| {c['check']} | {c['result']} | {c['measured']} | {c['target']} |" for c in r["checks"]]
    tests = r["sections"].get("gpu_tests")
    if tests:
        lines += ["", "## GPU tests", "", f"`pytest tests/memory/test_gpu_memory.py tests/gpu`: "
                  f"{(tests['summary'] or ['no summary'])[0]} (rc {tests['rc']}, {tests['seconds']} s)", ""]
        lines += [f"- {o} {t}" for o, t in tests["outcomes"]]
    for name in SHAPES:
        w = r["sections"].get(f"worker_{name}")
        if not w or "describe" not in w:
            continue
        d = w["describe"]
        mem, step = d["memory"], d["decode_step"]
        lines += ["", f"## Worker, {name} shape (random weights, std {INIT_STD}; shipped model-config.yaml)", "",
                  f"Start-up {w['startup_s']:.1f} s; pool {w['pool']} (slots, positions, top-k); dtype {w['dtype']}; "
                  f"decode step **{step['live']}**: {step['reason']}", "",
                  f"Fast step: shapes {step.get('shapes')}, skipped {step.get('skipped_shapes')}, compile "
                  f"{step.get('compile_s')} s, capture {step.get('capture_s')} s, graphs' pool {step.get('graph_mib')} MiB; "
                  f"self-check {json.dumps(step.get('step_check'))}", "",
                  f"Memory: NVML {mem.get('driver_figure')} total **{mem.get('total_mib')} MiB**, named parts explain "
                  f"{mem.get('parts_explain_percent')}%.", "", "| part | MiB | plan_memory.py |", "|---|---:|---:|"]
        plan = (w.get("plan") or {}).get("per_worker_mib", {})
        for part, mib in mem.get("parts_mib", {}).items():
            lines.append(f"| {part} | {mib} | {plan.get(part, '')} |")
        lines.append(f"| **total** | **{mem.get('total_mib')}** | **{plan.get('total', '')}** |")
    ctx = r["sections"].get("cuda_context") or {}
    if ctx.get("rows"):
        lines += ["", "## CUDA context", "", "| loading | context MiB | process MiB (NVML) | driver figure |",
                  "|---|---:|---:|---|"]
        lines += [f"| {x['mode']} | {x['context_mib']} | {x['process_mib']} | {x['method']} |" for x in ctx["rows"]]
    rows = r["sections"].get("speed") or []
    if rows:
        steps = ["eager", "compiled", "graphs", "trees"]
        lines += ["", f"## Speed (contrastive search, top-k 4, 16-token prompt, {NEW_TOKENS} new tokens, float16; "
                  "benchmarks/decode.py, random weights with GPT2Config's default std 0.02)", "",
                  "ms/step (tokens/s); compile s; agreement with eager's tokens.", "",
                  "| shape | batch | " + " | ".join(steps) + " | transformers 4.55.4 here | 4.55.4 in the issue |",
                  "|---|---:|" + "---|" * (len(steps) + 2)]
        hf = {(x["shape"], x["batch"]): x for x in r["sections"].get("hf_baseline") or []}
        for row in rows:
            cells = []
            for s in steps:
                x = row["steps"].get(s)
                cells.append("-" if not x else f"{x['ms_per_step']:.2f} ({x['tokens_per_s']:,.0f})"
                             + ("" if s == "eager" else f"; {x['compile_s']:.0f} s; {x['agreement_with_first']:.3f}"))
            h = hf.get((row["shape"], row["batch"]))
            cells.append(f"{h['ms_per_step']:.2f} ({h['tokens_per_s']:,.0f})" if h else "-")
            cells.append(HF_REFERENCE.get((row["shape"], row["batch"]), "-"))
            lines.append(f"| {row['shape']} | {row['batch']} | " + " | ".join(cells) + " |")
    agreement = []
    for name in SHAPES:
        step = (r["sections"].get(f"worker_{name}") or {}).get("describe", {}).get("decode_step", {})
        if step.get("step_check"):
            sc, ag = step["step_check"], step.get("agreement") or {}
            agreement.append(f"- {name} worker's self-check ({step['path']}, weights std {INIT_STD}): "
                             f"{sc['compared']} slot steps within {sc['tolerance']:.3g}, {sc['near_ties']} near ties, "
                             f"{sc['failures']} failures, worst {sc['worst']}; end to end "
                             f"{ag.get('tokens', 0) - ag.get('differing_tokens', 0)}/{ag.get('tokens')} tokens as "
                             f"eager (not gating; first difference: {ag.get('first_mismatch')})")
    for row in rows:
        for s in ("graphs", "trees", "compiled"):
            x = row["steps"].get(s)
            if x:
                agreement.append(f"- benchmark {row['shape']} batch {row['batch']}, {s} vs eager (weights std 0.02): "
                                 f"{x['agreement_with_first']:.3f} of the tokens")
    if agreement:
        lines += ["", "## Float16: eager against the fast step, token by token", ""] + agreement
    inv = r["sections"].get("batch_invariance")
    if inv:
        lines += ["", "## Batch invariance (110m, eager fp16): one request alone vs beside seven others", "",
                  "| decode_shapes | tokens the same | identical |", "|---|---:|---|"]
        lines += [f"| {k} | {v['same']}/{v['tokens']} | {v['identical']} |" for k, v in inv.items()]
    if r.get("pictures"):
        lines += ["", "## Pictures: measured memory beside the plan", ""]
        lines += [f"![{p}]({p})" if p.endswith(".png") else f"- {p}" for p in r["pictures"]]
    if r["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['section']}: {s['reason']}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
