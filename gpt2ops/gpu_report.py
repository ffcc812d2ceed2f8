#!/usr/bin/env python3
"""The GPU report: one command, on a machine with an NVIDIA GPU, proves or disproves the GPU path.

    make gpu-wheels    # once, on a machine with network: the wheels the GPU machine lacks, into .whl/
    make gpu-report    # on the GPU machine (PyTorch, transformers, no TorchServe frontend, no network)

The GPU machine has PyTorch and transformers but not TorchServe's Python package `ts` (which the handler
imports) nor transformers 4.55.4 (the contrastive-search baseline). `make gpu-wheels` downloads them as
wheels into .whl/serve and .whl/hf; this report installs them with `pip --no-index --find-links` into
throwaway `--target` folders under .gpu-report/ and puts them on PYTHONPATH (the 4.55 one only for the
baseline's process). Nothing else is installed and nothing is fetched.

Sections, run in this order within DEADLINE_S (8 minutes), each in its own process with what time is left
(a section that does not fit is reported as skipped, with the reason):

1. the GPU tests: tests/memory/test_gpu_memory.py and tests/gpu/ (pytest);
2. the CUDA context with lazy and eager module loading (gpt2ops/measure_cuda_context.py);
3. per shape, 110M then 3.5B (random weights from a GPT2Config, saved under .gpu-report/models; built on
   the CPU while the tests run): a worker started in-process through a TorchServe context
   (`handler.gpt2_handler`, the shipped model-config.yaml), its start-up time, which decode step serves
   and its self-check, its memory breakdown against NVML's per-process figure (the parts must explain it
   within 2%) and against scripts/plan_memory.py (within 10%), and the issue's memory target;
4. speed: benchmarks/decode.py, eager vs compiled vs CUDA graphs (and cudagraph trees at batch 1), 110M at
   batch 1, 8, 32 and 3.5B at batch 1, 8, 128 new tokens; and transformers 4.55.4's contrastive search
   (benchmarks/hf_contrastive.py) when its wheels are staged.

It writes gpu-report.md and gpu-report.json (--out) and exits 0 when every check passed, 1 when one failed
or could not run. Without CUDA it says so and exits 2 without writing anything.

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
from tests.ts_context import make_context

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
    def __init__(self, deadline_s: float):
        self.start = time.monotonic()
        self.deadline = self.start + deadline_s

    def left(self) -> float:
        return self.deadline - RESERVE_S - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


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


def stage(name: str, wheels: Path, site: Path, packages: list[str], env: dict) -> dict:
    """pip install --no-index --find-links <wheels> --no-deps --target <site> <packages>."""
    if not wheels.is_dir() or not any(wheels.glob("*.whl")):
        return {"staged": False, "reason": f"no wheels in {wheels} (run `make gpu-wheels` on a machine with network)"}
    if site.is_dir() and (site / ".staged").is_file():
        return {"staged": True, "site": str(site), "reused": True}
    shutil.rmtree(site, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
           "--find-links", str(wheels), "--no-deps", "--target", str(site), *packages]
    result = run(cmd, env, 180)
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


def check(name: str, passed: bool | None, measured: str, target: str) -> dict:
    return {"check": name, "result": "pass" if passed else ("not run" if passed is None else "FAIL"),
            "measured": measured, "target": target}


def memory_checks(shape: str, worker: dict, plan: dict | None) -> list[dict]:
    d = worker["describe"]
    mem, step = d["memory"], d["decode_step"]
    parts = mem.get("parts_mib", {})
    out = [check(f"{shape}: decode step serving", step["live"] == "cuda-graphs", step["live"],
                 "cuda-graphs (compile: auto on a GPU)"),
           check(f"{shape}: start-up self-check", bool(step.get("self_check") and step["self_check"]["passed"]),
                 step["reason"], "every token as eager")]
    explained = mem.get("parts_explain_percent")
    out.append(check(f"{shape}: named parts explain NVML's per-process figure", explained is not None
                     and 98 <= explained <= 102, f"{explained}% of {mem.get('total_mib')} MiB "
                     f"({mem.get('driver_figure')})", "98-102%"))
    if plan is not None:
        predicted, measured = plan["per_worker_mib"]["total"], mem.get("total_mib")
        diff = None if not measured else 100 * (predicted - measured) / measured
        out.append(check(f"{shape}: plan_memory.py predicts the total", diff is not None and abs(diff) <= 10,
                         f"plan {predicted} MiB vs measured {measured} MiB ({diff:+.1f}%)" if diff is not None
                         else "no measured total", "within 10%"))
    if shape == "110m" and parts:
        named = parts.get("cuda_context", 0) + parts.get("weights", 0) + parts.get("slot_pool", 0) \
            + parts.get("graphs", 0)
        out.append(check(f"{shape}: total after start vs context + weights + pool + graphs",
                         mem["total_mib"] <= named + MEMORY_TARGET_SLACK_MIB,
                         f"{mem['total_mib']} MiB vs {named:.1f} MiB + {MEMORY_TARGET_SLACK_MIB:g}",
                         f"<= named + {MEMORY_TARGET_SLACK_MIB:g} MiB"))
    if shape in STARTUP_LIMIT_S:
        limit = STARTUP_LIMIT_S[shape]
        out.append(check(f"{shape}: start-up with compile and capture", worker["startup_s"] <= limit,
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
            out.append(check(f"{shape} batch {batch}: graphs {metric}", None, "not measured", f"{op} {limit:,}"))
            continue
        value = got[metric]
        ok = value <= limit if op == "<=" else value >= limit
        out.append(check(f"{shape} batch {batch}: graphs {metric}", ok, f"{value:,.2f}", f"{op} {limit:,}"))
    return out


# ---- the report ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO, help="folder for gpu-report.md and gpu-report.json")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="staged wheels (make gpu-wheels)")
    parser.add_argument("--work", type=Path, default=REPO / ".gpu-report", help="models, caches, staged packages")
    parser.add_argument("--deadline-s", type=float, default=DEADLINE_S)
    args = parser.parse_args(argv)

    import torch  # is_available does not create a context

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    clock = Clock(args.deadline_s)
    args.work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TORCHINDUCTOR_CACHE_DIR=str(args.work / "cache" / "inductor"),
               TRITON_CACHE_DIR=str(args.work / "cache" / "triton"))
    report: dict = {"sections": {}, "checks": [], "skipped": []}

    def skip(section: str, reason: str) -> None:
        report["skipped"].append({"section": section, "reason": reason})

    # staging: TorchServe's `ts` where it is missing; transformers 4.55.4 for the baseline, in its own folder
    staging = {}
    try:
        import ts  # noqa: F401

        staging["serve"] = {"staged": False, "reason": "ts already importable"}
        serve_site = None
    except ImportError:
        staging["serve"] = stage("torchserve", args.wheels / "serve", args.work / "site" / "serve",
                                 ["torchserve"], env)
        serve_site = staging["serve"].get("site")
    staging["hf"] = stage("transformers 4.55.4", args.wheels / "hf", args.work / "site" / "hf",
                          ["transformers", "tokenizers", "huggingface-hub"], env)
    report["staging"] = staging
    env["PYTHONPATH"] = os.pathsep.join([p for p in (serve_site, str(REPO), env.get("PYTHONPATH")) if p])
    if serve_site:
        sys.path.insert(0, serve_site)  # so that the environment line names the staged ts
    report["environment"] = environment()
    has_ts = run([sys.executable, "-c", "import ts"], env, 60)["rc"] == 0

    # the models, built on the CPU beside the GPU tests
    models = {name: args.work / "models" / name for name in SHAPES}
    builders = {}
    for name, folder in models.items():
        if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        builders[name] = subprocess.Popen(
            [sys.executable, "-c", BUILD, str(folder), json.dumps(SHAPES[name]), str(INIT_STD)], cwd=REPO,
            env={**env, "CUDA_VISIBLE_DEVICES": ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)

    # 1. the GPU tests
    if has_ts:
        result = run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                      "tests/memory/test_gpu_memory.py", "tests/gpu"], env, min(200.0, clock.left()))
        summary = re.findall(r"^=+ (.*(?:passed|failed|error|skipped).*) in [\d.]+s", result["stdout"], re.M)
        outcomes = re.findall(r"^(PASSED|FAILED|ERROR|SKIPPED)\s+(\S+)", result["stdout"], re.M)
        report["sections"]["gpu_tests"] = {"rc": result["rc"], "seconds": result["seconds"],
                                           "timed_out": result.get("timed_out"), "summary": summary[-1:] or None,
                                           "outcomes": outcomes, "tail": tail(result["stdout"])}
        report["checks"].append(check("GPU tests pass", result["rc"] == 0,
                                      (summary[-1] if summary else f"rc {result['rc']}")
                                      + (" (timed out)" if result.get("timed_out") else ""), "all pass"))
    else:
        skip("gpu_tests", "TorchServe's ts is not importable: " + staging["serve"].get("reason", ""))
        report["checks"].append(check("GPU tests pass", None, "not run: no ts", "all pass"))

    # 2. the CUDA context, lazy and eager
    result = run([sys.executable, "-m", "gpt2ops.measure_cuda_context", "--json"], env, min(90.0, clock.left()))
    report["sections"]["cuda_context"] = last_json_block(result["stdout"]) or {"rc": result["rc"],
                                                                              "stderr": tail(result["stderr"])}

    # 3 and 4: per shape, the worker then the speed
    rows: list[dict] = []
    for name in SHAPES:
        builder = builders.get(name)
        if builder is not None:
            try:
                _, err = builder.communicate(timeout=max(1.0, clock.left() - 60))
            except subprocess.TimeoutExpired:
                os.killpg(builder.pid, signal.SIGKILL)
                builder.communicate()
                skip(f"memory {name}", "building the random weights did not finish in time")
                continue
            if builder.returncode != 0:
                skip(f"memory {name}", f"building the random weights failed: {tail(err, 800)}")
                continue
        if not has_ts:
            skip(f"memory {name}", "TorchServe's ts is not importable")
        else:
            worker_section(name, models[name], env, clock, report)
        speed_section(name, env, clock, report, rows, args.work)
    report["sections"]["speed"] = rows
    report["checks"] += speed_checks(rows)
    hf_section(staging["hf"], env, clock, report)

    report["elapsed_s"] = round(clock.elapsed(), 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-report.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "gpu-report.md").write_text(markdown(report))
    failed = [c for c in report["checks"] if c["result"] != "pass"]
    print(f"wrote {args.out / 'gpu-report.md'} and gpu-report.json in {report['elapsed_s']} s: "
          f"{len(report['checks']) - len(failed)} of {len(report['checks'])} checks passed")
    for c in failed:
        print(f"  {c['result']}: {c['check']}: {c['measured']} (target {c['target']})")
    return 0 if not failed else 1


def last_json_block(text: str) -> dict | None:
    """The JSON document a command printed (indented or one line)."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return last_json(text)


def worker_section(name: str, model_dir: Path, env: dict, clock: Clock, report: dict) -> None:
    result = run([sys.executable, "-c", WORKER, str(model_dir)], env, min(240.0, clock.left() - 30))
    worker = last_json(result["stdout"]) if result["rc"] == 0 else None
    if worker is None:
        why = "timed out" if result.get("timed_out") else f"rc {result['rc']}"
        report["sections"][f"worker_{name}"] = {"error": why, "stderr": tail(result["stderr"])}
        report["checks"].append(check(f"{name}: worker starts", False, why, "starts"))
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
        planned = run(cmd, env, 60)
        plan = last_json_block(planned["stdout"])
    report["sections"][f"worker_{name}"] = {**worker, "plan": plan, "log_tail": tail(result["stderr"], 2000)}
    report["checks"] += memory_checks(name, worker, plan)


def speed_section(name: str, env: dict, clock: Clock, report: dict, rows: list[dict], work: Path) -> None:
    for shape, batch, steps in SPEED:
        if shape != name:
            continue
        out = work / f"speed-{shape}-{batch}.json"
        out.unlink(missing_ok=True)
        result = run([sys.executable, "-m", "benchmarks.decode", "--device", "cuda", "--shape", shape, "--batch",
                      str(batch), "--modes", "contrastive", "--new-tokens", str(NEW_TOKENS), "--steps", *steps,
                      "--json", str(out)], env, min(150.0, clock.left() - 20))
        if out.is_file():
            rows += json.loads(out.read_text())["rows"]
        else:
            why = "timed out" if result.get("timed_out") else (result.get("skipped") or f"rc {result['rc']}")
            skip(f"speed {shape} batch {batch}", f"{why}: {tail(result['stderr'], 800)}")


def hf_section(staged: dict, env: dict, clock: Clock, report: dict) -> None:
    if not staged.get("staged"):
        skip("transformers 4.55.4 baseline", staged.get("reason", "not staged"))
        return
    hf_env = dict(env, PYTHONPATH=os.pathsep.join([staged["site"], str(REPO)]))
    rows = []
    for shape, batches in (("110m", ["1", "8", "32"]), ("3.5b", ["1", "8"])):
        result = run([sys.executable, "-m", "benchmarks.hf_contrastive", "--device", "cuda", "--shape", shape,
                      "--batch", *batches, "--new-tokens", str(NEW_TOKENS)], hf_env, min(120.0, clock.left()))
        for line in result["stdout"].splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 5 and cells[1].startswith("hf-"):
                rows.append({"shape": cells[0], "batch": int(cells[2]), "ms_per_step": float(cells[3]),
                             "tokens_per_s": float(cells[4].replace(",", ""))})
        if result["rc"] != 0:
            skip(f"transformers 4.55.4 baseline {shape}", f"rc {result['rc']}: {tail(result['stderr'], 800)}")
    report["sections"]["hf_baseline"] = rows


def markdown(r: dict) -> str:
    e = r["environment"]
    lines = ["# GPU report", "",
             f"{e['gpu']} (compute capability {'.'.join(map(str, e['capability']))}), driver {e.get('driver')}; "
             f"torch {e['torch']} (CUDA {e['cuda']}), triton {e.get('triton')}, transformers {e.get('transformers')}, "
             f"ts {e.get('ts')}, Python {e['python']}; {e['date']}; written in {r['elapsed_s']} s by "
             "`make gpu-report` (gpt2ops/gpu_report.py).", "", "## Checks", "",
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
                  f"self-check {json.dumps(step.get('self_check'))}", "",
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
        if step.get("self_check"):
            sc = step["self_check"]
            agreement.append(f"- {name} worker's self-check ({step['path']}, weights std {INIT_STD}): "
                             f"{sc['tokens'] - sc['differing_tokens']}/{sc['tokens']} tokens as eager "
                             f"(first difference: {sc['first_mismatch']})")
    for row in rows:
        for s in ("graphs", "trees", "compiled"):
            x = row["steps"].get(s)
            if x:
                agreement.append(f"- benchmark {row['shape']} batch {row['batch']}, {s} vs eager (weights std 0.02): "
                                 f"{x['agreement_with_first']:.3f} of the tokens")
    if agreement:
        lines += ["", "## Float16: eager against the fast step, token by token", ""] + agreement
    if r["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['section']}: {s['reason']}" for s in r["skipped"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
