"""End to end: the official `openai` client (and curl) against the OpenAI-compatible routes of a real TorchServe.

The client is used as its users use it, with nothing changed but `base_url` (the model's version URL + `/v1`)
and `api_key` (TorchServe's inference key). Texts are checked against `ExpectedAnswers` (the same engine and
weights in-process) through the mapping the README states: temperature 0 is greedy, no decoding field is the
operator's contrastive search, a seed gives choice i the seed + i.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import openai
import pytest

from gpt2ops.client import read_keys
from gpt2ops.expected import ExpectedAnswers
from gpt2ops.local_server import script_env
from tests.e2e.conftest import MODEL
from tests.readme import REPO


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    return ExpectedAnswers(tiny_model_dir)


@pytest.fixture(scope="module")
def base_url(server):
    return f"{server.client.inference_url}/predictions/{MODEL}/1.0/v1"


@pytest.fixture(scope="module")
def key(server):
    return read_keys(server.run_dir / "key_file.json")["inference"]


@pytest.fixture(scope="module")
def oa(base_url, key):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def test_models_list_and_retrieve(oa):
    assert [m.id for m in oa.models.list()] == [MODEL]
    model = oa.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "torchserve")
    with pytest.raises(openai.NotFoundError) as err:
        oa.models.retrieve("gpt-4")
    assert err.value.body["code"] == "model_not_found"


def test_a_completion_at_temperature_0_is_greedy(oa, expected, tokenizer):
    prompt = "你是谁?"
    c = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    want = expected({"prompt": prompt, "decoding": "greedy", "max_new_tokens": 24})
    assert c.object == "text_completion" and c.model == MODEL and c.id.startswith("cmpl-")
    [choice] = c.choices
    assert (choice.index, choice.text, choice.logprobs) == (0, want.text, None)
    assert choice.finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert c.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert c.usage.completion_tokens == len(want.tokens)
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_no_decoding_field_is_contrastive_search_and_extra_body_asks_for_it(oa, expected):
    prompt = "A journey of a thousand miles"
    c = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=16)
    assert c.choices[0].text == expected({"prompt": prompt, "max_new_tokens": 16}).text
    c = oa.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                              extra_body={"penalty_alpha": 0.3, "top_k": 6})
    want = expected({"prompt": prompt, "max_new_tokens": 16, "penalty_alpha": 0.3, "top_k": 6})
    assert c.choices[0].text == want.text


def test_a_stream_joins_to_the_same_text(oa):
    # long enough to span several of the worker's calls on any machine
    kw = dict(model=MODEL, prompt="你是谁?", max_tokens=240, temperature=0, extra_body={"ignore_eos": True})
    plain = oa.completions.create(**kw)
    chunks = list(oa.completions.create(**kw, stream=True))
    assert len(chunks) >= 3
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    with_usage = list(oa.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_several_prompts_in_one_call(oa, expected):
    prompts = ["春天来了", "Hello there", "请问第一个问题是什么?"]
    c = oa.completions.create(model=MODEL, prompt=prompts, max_tokens=10, temperature=0)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, c.choices):
        assert choice.text == expected({"prompt": prompt, "decoding": "greedy", "max_new_tokens": 10}).text


def test_n_choices_with_a_seed(oa, expected):
    kw = dict(model=MODEL, prompt="你好", max_tokens=12, temperature=0.9, n=3, seed=7)
    c = oa.completions.create(**kw)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    for j, choice in enumerate(c.choices):
        want = expected({"prompt": "你好", "decoding": "sample", "temperature": 0.9, "seed": 7 + j,
                         "max_new_tokens": 12})
        assert choice.text == want.text
    assert len({ch.text for ch in c.choices}) > 1
    assert [ch.text for ch in oa.completions.create(**kw).choices] == [ch.text for ch in c.choices]


@pytest.mark.parametrize("kw,param,words", [
    ({"max_tokens": 100_000}, "max_tokens", "max_tokens must be <= 256"),
    ({"temperature": -1}, "temperature", "temperature must be >= 0"),
    ({"n": 0}, "n", "n must be between 1 and 32"),
    ({"extra_body": {"top_k": 1}}, "top_k", "top_k must be >= 2"),
    ({"extra_body": {"temprature": 0.5}}, "temprature", "did you mean 'temperature'"),
])
def test_a_bad_parameter_is_a_bad_request_naming_it(oa, kw, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=MODEL, prompt="hi", **kw)
    assert err.value.status_code == 400
    assert err.value.param == param and words in err.value.message
    assert err.value.type == "invalid_request_error"


@pytest.mark.parametrize("kw", [{"best_of": 2}, {"suffix": "end"}], ids=lambda kw: next(iter(kw)))
def test_fields_this_server_cannot_honour_are_refused(oa, kw):
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(model=MODEL, prompt="hi", max_tokens=4, **kw)
    assert err.value.param == next(iter(kw)) and err.value.code == "unsupported_parameter"


def test_what_clients_send_by_default_is_accepted(oa):
    """LangChain's OpenAI LLM sends these on every call."""
    c = oa.completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=0.7, top_p=1, frequency_penalty=0,
                              presence_penalty=0, n=1, best_of=1, logit_bias={}, seed=None, logprobs=None,
                              user="someone")
    assert c.usage.completion_tokens <= 4 and c.choices[0].finish_reason in ("length", "stop")


def test_a_wrong_key_is_refused(base_url, oa):
    wrong = openai.OpenAI(base_url=base_url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.BadRequestError) as err:  # TorchServe refuses keys with 400, not 401
        wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert err.value.status_code == 400 and err.value.body["type"] == "InvalidKeyException"
    with pytest.raises(openai.BadRequestError):
        wrong.models.list()


def test_without_the_version_in_the_url_torchserve_answers_404_itself(server, key):
    wrong = openai.OpenAI(base_url=f"{server.client.inference_url}/predictions/{MODEL}/v1", api_key=key,
                          max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:  # "v1" is read as the model's version
        wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert err.value.body["type"] != "invalid_request_error"  # TorchServe's shape, not the handler's


def test_chat_completions_say_to_use_completions(oa):
    with pytest.raises(openai.NotFoundError) as err:
        oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert "no chat template" in err.value.message and "completions" in err.value.message


def curl(*args: str) -> tuple[str, str]:
    """curl as a user runs it: (response headers, body)."""
    out = subprocess.run(["curl", "-sS", "-N", "-D", "-", *args], capture_output=True, timeout=120, check=True)
    head, _, body = out.stdout.decode("utf-8").partition("\r\n\r\n")
    return head, body


def test_curl_sees_sse_framing(base_url, key):
    head, body = curl("-X", "POST", f"{base_url}/completions", "-H", f"Authorization: Bearer {key}",
                      "-H", "Content-Type: application/json",
                      "--data", json.dumps({"model": MODEL, "prompt": "你是谁?", "max_tokens": 40, "temperature": 0,
                                            "stream": True}))
    assert head.startswith("HTTP/1.1 200")
    assert re.search(r"^content-type: text/event-stream\s*$", head, flags=re.I | re.M), head
    assert body.endswith("data: [DONE]\n\n")
    blocks = body[:-2].split("\n\n")
    assert len(blocks) >= 3 and blocks[-1] == "data: [DONE]"
    text = ""
    for block in blocks[:-1]:
        assert block.startswith("data: {") and "\n" not in block
        event = json.loads(block[len("data: "):])
        text += event["choices"][0]["text"]
    assert event["choices"][0]["finish_reason"] in ("length", "stop")
    _, plain = curl("-X", "POST", f"{base_url}/completions", "-H", f"Authorization: Bearer {key}",
                    "-H", "Content-Type: application/json",
                    "--data", json.dumps({"model": MODEL, "prompt": "你是谁?", "max_tokens": 40, "temperature": 0}))
    assert json.loads(plain)["choices"][0]["text"] == text


def test_curl_get_models_and_get_completions(base_url, key):
    head, body = curl(f"{base_url}/models", "-H", f"Authorization: Bearer {key}")
    assert head.startswith("HTTP/1.1 200") and json.loads(body)["data"][0]["id"] == MODEL
    head, body = curl(f"{base_url}/completions", "-H", f"Authorization: Bearer {key}")  # a GET has no body
    assert head.startswith("HTTP/1.1 400") and "POST" in json.loads(body)["error"]["message"]
    head, body = curl(f"{base_url}/chat/completions", "-H", f"Authorization: Bearer {key}")
    assert head.startswith("HTTP/1.1 404") and "no chat template" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("page", ["README.md", "docs/api.md"])
def test_the_readme_python_example_runs(server, page, tmp_path):
    """The official-client example of the README and docs/api.md, as written, with the session server for
    `make run`'s: run from another directory, it finds the key by $RUN_DIR (make run's: this checkout's run/)."""
    code = re.search(r"```python\n(.*?)```", (REPO / page).read_text(encoding="utf-8"), flags=re.S).group(1)
    assert "openai.OpenAI(" in code and "key_file.json" not in code
    code = code.replace("http://127.0.0.1:8080", server.client.inference_url)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**script_env(), "RUN_DIR": str(server.run_dir)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), "the example printed nothing"


def test_query_openai_prints_the_completion(server, expected):
    env = {**script_env(), "RUN_DIR": str(server.run_dir), "TS_CONFIG": str(server.config)}
    proc = subprocess.run([sys.executable, "scripts/query.py", "你好", "--openai", "--param", "temperature=0",
                           "--param", "max_tokens=12", "--json"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    answer = json.loads(proc.stdout)
    assert answer["choices"][0]["text"] == expected({"prompt": "你好", "decoding": "greedy", "max_new_tokens": 12}).text
    proc = subprocess.run([sys.executable, "scripts/query.py", "你好", "--openai", "--param", "top_k=1"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "top_k" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
