"""EleutherAI's lm-evaluation-harness against the served model, with its loglikelihoods checked in-process.

    .venv/bin/python -m gpt2ops.lm_eval_run [--model-dir artifacts/models/tiny-gpt2] [--own-server]

Runs `lm_eval --model local-completions` with the repository's tasks (eval/tasks/: `tiny_cloze`, a
multiple-choice loglikelihood task, and `tiny_continue`, a generate_until task, over eval/data/*.jsonl)
against the OpenAI-compatible API of a running server: the one `make run` started (--run-dir, else
$RUN_DIR, else run/; --config, else $TS_CONFIG), or, when none answers or with --own-server, a fresh
TorchServe of the model's archive on free ports, stopped afterwards. Nothing downloads: the tokenizer is
the model folder's (`tokenizer=<model dir>`), the data sets are local JSON files, and the Hugging Face
libraries run offline. Then every loglikelihood the harness logged is recomputed in-process with
transformers on the same weights in float32 (the server on a CPU computes in float32: `dtype: auto`), and
the largest difference is printed: exit 1 when it is over 1e-4, or when the harness failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpt2ops import REPO
from gpt2ops.client import add_server_arguments, server_from_arguments
from gpt2ops.errors import OpsError

TASKS = ("tiny_cloze", "tiny_continue")
TASK_DIR = REPO / "eval" / "tasks"
TOLERANCE = 1e-4
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Scored:
    """One loglikelihood request of the harness and its answer: log p(continuation | context)."""

    task: str
    context: str
    continuation: str
    loglikelihood: float
    is_greedy: bool


def harness_command(base_url: str, model: str, tokenizer_dir: Path, out_dir: Path, tasks=TASKS,
                    limit: int | None = None) -> list[str]:
    """`lm_eval` with local-completions against `base_url` (…/v1/completions), the tokenizer of `tokenizer_dir`."""
    model_args = ",".join([f"model={model}", f"base_url={base_url}", f"tokenizer={tokenizer_dir}",
                           "tokenizer_backend=huggingface", "tokenized_requests=False", "num_concurrent=1",
                           "max_retries=1", "timeout=120", "max_length=512"])
    command = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", model_args,
               "--tasks", ",".join(tasks), "--include_path", str(TASK_DIR), "--output_path", str(out_dir),
               "--log_samples", "--batch_size", "1", "--seed", "1234"]
    return command + (["--limit", str(limit)] if limit else [])


def run_harness(base_url: str, key: str, model: str, tokenizer_dir: Path, out_dir: Path, tasks=TASKS,
                limit: int | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """The harness run, from the repository root (the task files name their data relative to it)."""
    env = {**os.environ, **OFFLINE, "OPENAI_API_KEY": key}
    return subprocess.run(harness_command(base_url, model, tokenizer_dir, out_dir, tasks, limit), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)


def results(out_dir: Path) -> dict:
    """The harness's results file: {"results": {task: {metric: value}}, ...}."""
    found = sorted(out_dir.rglob("results_*.json"))
    if not found:
        raise OpsError(f"lm_eval wrote no results under {out_dir}")
    return json.loads(found[-1].read_text())


def logged_loglikelihoods(out_dir: Path) -> list[Scored]:
    """Every loglikelihood request the harness logged (--log_samples), with the server's answer."""
    scored = []
    for path in sorted(out_dir.rglob("samples_*.jsonl")):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        for line in path.read_text(encoding="utf-8").splitlines():
            sample = json.loads(line)
            for args, resp in zip(sample["arguments"].values() if isinstance(sample["arguments"], dict)
                                  else sample["arguments"], sample["resps"]):
                args = list(args.values()) if isinstance(args, dict) else args
                answer = resp[0]
                if len(args) == 2 and isinstance(answer, (list, tuple)) and len(answer) == 2:
                    scored.append(Scored(task, args[0], args[1], float(answer[0]), answer[1] in (True, "True")))
    return scored


def reference_loglikelihoods(model_dir: Path, pairs: list[tuple[str, str]]) -> list[float]:
    """log p(continuation | context) in-process with transformers in float32, split into tokens as the
    harness splits them (lm_eval's `_encode_pair`: the context's trailing spaces go to the continuation,
    the continuation is the whole text's tokens after the context's)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for context, continuation in pairs:
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tokenizer.encode(context + continuation)
            n_context = len(tokenizer.encode(context))
            logits = model(torch.tensor([whole])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            out.append(sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole))))
    return out


def check(model_dir: Path, out_dir: Path) -> tuple[int, float]:
    """(loglikelihoods compared, the largest difference) between the harness's log and transformers."""
    logged = logged_loglikelihoods(out_dir)
    if not logged:
        raise OpsError(f"the harness logged no loglikelihood under {out_dir}")
    want = reference_loglikelihoods(model_dir, [(s.context, s.continuation) for s in logged])
    worst = max(abs(s.loglikelihood - w) for s, w in zip(logged, want))
    return len(logged), worst


def own_server(model_dir: Path, model: str, root: Path):
    """A fresh TorchServe with the model's archive registered (what the e2e tests start)."""
    from gpt2ops.local_server import build_archive, start_server

    store = root / "model_store"
    store.mkdir(parents=True)
    build_archive(model_dir, model, store)
    server = start_server(root / "ts", store)
    try:
        server.client.register(f"{model}.mar", model, workers=1)
    except BaseException:
        server.stop()
        raise
    return server


def summary(res: dict) -> str:
    lines = []
    for task, metrics in sorted(res.get("results", {}).items()):
        shown = ", ".join(f"{k.split(',')[0]}={v:.4f}" for k, v in sorted(metrics.items())
                          if isinstance(v, float) and "stderr" not in k)
        lines.append(f"{task}: {shown}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-gpt2", help="the served model's name (default tiny-gpt2)")
    parser.add_argument("--model-dir", type=Path, default=REPO / "artifacts" / "models" / "tiny-gpt2",
                        help="the model folder: its tokenizer for the harness, its weights for the check")
    parser.add_argument("--own-server", action="store_true", help="start a fresh TorchServe even if one runs")
    parser.add_argument("--out", type=Path, help="where the harness writes (default: a temporary folder)")
    parser.add_argument("--limit", type=int, help="documents per task (default: all)")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    model_dir = args.model_dir.resolve()
    with tempfile.TemporaryDirectory(prefix="lm-eval-") as tmp:
        out_dir = (args.out or Path(tmp) / "out").resolve()
        server = None
        try:
            running = server_from_arguments(args)
            if args.own_server or not running.ping():
                print(f"starting a TorchServe of {model_dir} ...", file=sys.stderr)
                server = own_server(model_dir, args.model, Path(tmp) / "server")
                running = server.client
            base_url = f"{running.inference_url}/predictions/{args.model}/1.0/v1/completions"
            proc = run_harness(base_url, running.key("inference"), args.model, model_dir, out_dir, limit=args.limit)
            if proc.returncode != 0:
                print(proc.stdout[-3000:] + proc.stderr[-5000:], file=sys.stderr)
                print(f"lm_eval failed ({proc.returncode})", file=sys.stderr)
                return 1
            print(summary(results(out_dir)))
            n, worst = check(model_dir, out_dir)
        except OpsError as err:
            print(f"lm_eval_run: {err}", file=sys.stderr)
            return 1
        finally:
            if server is not None:
                server.stop()
    ok = worst <= TOLERANCE and math.isfinite(worst)
    print(f"loglikelihoods: {n} checked against transformers (float32), largest difference {worst:.2e} "
          f"({'within' if ok else 'over'} {TOLERANCE:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
