"""End to end: EleutherAI's lm-evaluation-harness (`lm_eval --model local-completions`, from PyPI) runs the
repository's two tasks (eval/tasks/) against a real TorchServe, offline, and its loglikelihoods equal the ones
transformers computes in-process on the same weights in float32 within 1e-4 (`make eval` does the same against
`make run`'s server: gpt2ops/lm_eval_run.py)."""

from __future__ import annotations

import json

import pytest

from gpt2ops.client import read_keys
from gpt2ops.lm_eval_run import TOLERANCE, check, logged_loglikelihoods, results, run_harness
from tests.e2e.conftest import MODEL
from tests.readme import REPO

pytest.importorskip("lm_eval", reason="lm-eval is installed by `make venv` (requirements-eval.txt)")


@pytest.fixture(scope="module")
def harness(server, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm-eval")
    key = read_keys(server.run_dir / "key_file.json")["inference"]
    base_url = f"{server.client.inference_url}/predictions/{MODEL}/1.0/v1/completions"
    proc = run_harness(base_url, key, MODEL, tiny_model_dir, out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def test_the_harness_runs_both_tasks_offline(harness):
    out, proc = harness
    res = results(out)["results"]
    assert set(res) == {"tiny_cloze", "tiny_continue"}
    assert 0 <= res["tiny_cloze"]["acc,none"] <= 1 and 0 <= res["tiny_continue"]["exact_match,none"] <= 1
    docs = len((REPO / "eval" / "data" / "cloze.jsonl").read_text().splitlines())
    assert len(logged_loglikelihoods(out)) == 3 * docs  # three choices per document, each a request


def test_its_generations_are_the_servers_greedy_continuations(harness, client):
    out, _ = harness
    [samples] = list(out.rglob("samples_tiny_continue_*.jsonl"))
    for line in samples.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        want = client.generate(MODEL, sample["doc"]["prompt"], decoding="greedy", max_new_tokens=16,
                               stop=[",", "."])["generated_text"]
        assert sample["resps"][0][0] == want


def test_its_loglikelihoods_equal_transformers_in_float32(harness, tiny_model_dir):
    out, _ = harness
    n, worst = check(tiny_model_dir, out)
    assert n == len(logged_loglikelihoods(out)) and worst <= TOLERANCE, worst
