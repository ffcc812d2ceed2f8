"""End to end: a real TorchServe (Java frontend), the real archive, registration with the key, real HTTP."""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpt2ops.client import parse_metric
from gpt2ops.expected import ExpectedAnswers
from gpt2ops.local_server import model_config
from tests.e2e.conftest import MODEL


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    """The right answers: the same weights in-process (float32, CPU: what the server runs)."""
    return ExpectedAnswers(tiny_model_dir)


def test_registered_through_the_management_api(client):
    [description] = client.describe(MODEL, customized=False)
    assert description["modelName"] == MODEL
    shipped = model_config()  # the repo's model-config.yaml, which the archive carries
    assert (description["batchSize"], description["maxBatchDelay"]) == (shipped["batchSize"], shipped["maxBatchDelay"])
    assert description["batchSize"] == 8 and shipped["continuousBatching"] is True
    assert [w["status"] for w in description["workers"]] == ["READY"]


def test_the_users_prompt_gets_a_contrastive_answer(client, expected, tokenizer):
    answer = client.generate(MODEL, "你是谁?", return_token_ids=True)
    tokens, text, reason = vars(expected({"prompt": "你是谁?"})).values()
    assert answer["token_ids"] == tokens
    assert answer["generated_text"] == text
    assert answer["full_text"] == "你是谁?" + text
    assert answer["finish_reason"] == reason
    assert answer["prompt_tokens"] == len(tokenizer.encode("你是谁?"))
    assert answer["completion_tokens"] == len(tokens)


def test_readme_curl_flow(server):
    """The README's commands: key from key_file.json, Bearer header, JSON content type."""
    key = json.loads((server.run_dir / "key_file.json").read_text())["inference"]["key"]
    url = f"{server.client.inference_url}/predictions/{MODEL}"
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", url, "-H", f"Authorization: Bearer {key}",
         "-H", "Content-Type: application/json", "--data", '{"prompt": "你是谁?"}', "-w", "\n%{http_code}"],
        capture_output=True, text=True, timeout=60, check=True)
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "200"
    assert json.loads(body)["full_text"].startswith("你是谁?")
    # the same command without the content type: curl sends a form, TorchServe drops the body, we say why
    out = subprocess.run(["curl", "-sS", "-X", "POST", url, "-H", f"Authorization: Bearer {key}",
                          "--data", '{"prompt": "你是谁?"}', "-w", "\n%{http_code}"],
                         capture_output=True, text=True, timeout=60, check=True)
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "400"
    assert "Content-Type: application/json" in json.loads(body)["message"]


def test_plain_text_and_form_bodies(client):
    r = client.predict_raw(MODEL, data="Who are you?".encode(), headers={"Content-Type": "text/plain"})
    assert r.status_code == 200 and r.json()["full_text"].startswith("Who are you?")
    r = client.predict_raw(MODEL, data={"prompt": "你好", "max_new_tokens": "3", "decoding": "greedy"})
    assert r.status_code == 200 and r.json()["completion_tokens"] == 3


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, client, expected):
    prompts = [f"请问第{i}个问题是什么? Question {i}." for i in range(24)]
    modes = [{"decoding": "greedy"}, {}, {"top_k": 3, "penalty_alpha": 0.4},
             {"decoding": "sample", "seed": 5, "temperature": 0.9}]
    jobs = [(p, {**modes[i % 4], "max_new_tokens": 8 + i % 5, "return_token_ids": True}) for i, p in enumerate(prompts)]
    before = len(server.batch_sizes())
    with ThreadPoolExecutor(max_workers=12) as pool:
        answers = list(pool.map(lambda job: client.generate(MODEL, job[0], **job[1]), jobs))
    for (prompt, fields), answer in zip(jobs, answers):
        want = expected({"prompt": prompt, **fields})
        tokens, text = want.tokens, want.text
        assert answer["token_ids"] == tokens, prompt  # its answer does not depend on its batch-mates
        assert answer["full_text"] == prompt + text
    sizes = server.batch_sizes()[before:]
    assert sum(sizes) == len(jobs)
    assert max(sizes) > 1  # TorchServe formed real batches


def test_bad_requests_in_a_busy_batch_fail_alone(client):
    jobs = [{"prompt": "good one", "max_new_tokens": 6}, {"prompt": "bad", "top_k": 1},
            {"prompt": "good two", "max_new_tokens": 6}, {"prompt": "bad", "temperature": 0.5},
            {"prompt": "bad", "max_new_tokens": 100000}, {"prompt": "good three", "max_new_tokens": 6}] * 3
    with ThreadPoolExecutor(max_workers=9) as pool:
        responses = list(pool.map(lambda body: client.predict_raw(MODEL, body), jobs))
    for body, r in zip(jobs, responses):
        if body["prompt"] == "bad":
            assert r.status_code == 400, r.text
            assert r.json()["field"] in body
        else:
            assert r.status_code == 200 and r.json()["completion_tokens"] == 6


def test_streaming_over_http_joins_to_the_final_text(client):
    # long enough to span several of the worker's calls on any machine (the trained tiny model would end at
    # its answer's end-of-text after about 30 tokens)
    chunks = list(client.stream(MODEL, "你是谁?", max_new_tokens=240, decoding="greedy", ignore_eos=True))
    assert len(chunks) >= 3
    final = chunks[-1]
    assert final["finish_reason"] == "length" and final["completion_tokens"] == 240
    assert "".join(c["text"] for c in chunks) == final["generated_text"]
    plain = client.generate(MODEL, "你是谁?", max_new_tokens=240, decoding="greedy", ignore_eos=True)
    assert plain["generated_text"] == final["generated_text"]


def test_stop_strings_and_eos_over_http(client):
    base = client.generate(MODEL, "Hello there", decoding="greedy", max_new_tokens=30, return_token_ids=True)
    text = base["generated_text"]
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    cut = client.generate(MODEL, "Hello there", decoding="greedy", max_new_tokens=30, stop=[stop])
    assert cut["finish_reason"] == "stop" and cut["generated_text"] == text[: text.find(stop)]
    eos = base["token_ids"][5]
    ended = client.generate(MODEL, "Hello there", decoding="greedy", max_new_tokens=30, eos_token_id=eos,
                            return_token_ids=True)
    assert ended["finish_reason"] == "eos"
    assert ended["token_ids"] == base["token_ids"][: base["token_ids"].index(eos) + 1]


def test_describe_returns_the_memory_breakdown(client):
    meta = client.report(MODEL)
    assert meta["device"] == "cpu"
    assert meta["memory"]["gpu"] is False and "no GPU" in meta["memory"]["note"]
    assert meta["memory"]["weights_mib"] > 0
    assert meta["max_new_tokens_within_timeout"] == 256
    assert meta["limits"]["max_top_k"] == 16


def test_the_engine_load_on_the_metrics_endpoint(client):
    """Slots, slots in use, waiting requests, time to first token and generated tokens, as Prometheus reads
    them from TorchServe's metrics port (what the Kubernetes autoscaler scales on; docs/metrics.md). The worker
    publishes once a second, off the decode loop: the figures follow the answer within about a second."""
    def engine_metrics() -> dict[str, float]:
        text = client.metrics()
        found = {}
        for name in ("gpt2_slots", "gpt2_slots_in_use", "gpt2_requests_waiting",
                     "gpt2_time_to_first_token_seconds_count", "gpt2_generation_tokens_total"):
            values = [value for labels, value in parse_metric(text, name) if labels.get("ModelName") == MODEL]
            if values:
                found[name] = values[-1]
        return found

    before = engine_metrics()
    answer = client.generate(MODEL, "你好", max_new_tokens=7, decoding="greedy", ignore_eos=True)
    assert answer["completion_tokens"] == 7
    deadline = time.monotonic() + 10
    while True:
        after = engine_metrics()
        if after.get("gpt2_generation_tokens_total", 0) >= before.get("gpt2_generation_tokens_total", 0) + 7 \
                or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after["gpt2_slots"] == client.report(MODEL)["pool"]["max_slots"] > 0
    assert after["gpt2_slots_in_use"] == 0 and after["gpt2_requests_waiting"] == 0
    assert after["gpt2_time_to_first_token_seconds_count"] >= before.get("gpt2_time_to_first_token_seconds_count",
                                                                         0) + 1
    assert after["gpt2_generation_tokens_total"] >= before.get("gpt2_generation_tokens_total", 0) + 7  # only grows


def test_memory_gauges_on_the_metrics_endpoint(client):
    samples = parse_metric(client.metrics(), "gpt2_worker_memory_bytes")
    by_part = {labels["part"]: value for labels, value in samples if labels.get("ModelName") == MODEL}
    assert {labels["device"] for labels, _ in samples} == {"cpu"}
    meta = client.report(MODEL)
    assert by_part["weights"] == round(meta["memory"]["weights_mib"] * 2 ** 20)
    assert by_part["slot_pool"] == round(meta["memory"]["slot_pool_mib"] * 2 ** 20) > 0
