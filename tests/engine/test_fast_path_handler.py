"""The handler's decode step: which one serves, the self-check's verdict in describe_handle, the fallback.

The handler in-process through a TorchServe context (tests.ts_context), the tiny model on the CPU. With
`compile: on` it compiles the step of a pool equal to tests/engine/test_compiled.py's (Inductor's cache makes
that compile cheap after the first); a fast step that misbehaves is injected in place of `FastStep`.
"""

from __future__ import annotations

import json

import pytest

from gpt2ops.local_server import model_config
from handler.engine import Request
from handler.serving.fields import params_from_request
from handler.engine.core import Engine
from handler.gpt2_handler import ContrastiveGPT2Handler
from tests.engine.test_compiled import SHAPE, fake
from tests.ts_context import Frontend, make_context

# a pool of SHAPE: batchSize slots, max_prompt_tokens + max_new_tokens positions, max_top_k
LIMITS = {"max_prompt_tokens": 32, "max_new_tokens": SHAPE.max_len - 32, "max_top_k": SHAPE.max_top_k}


def start(model_dir, **handler_settings) -> ContrastiveGPT2Handler:
    config = model_config(batchSize=SHAPE.max_slots, limits=LIMITS, defaults={"max_new_tokens": 16}, **handler_settings)
    context = make_context(model_dir, config)
    h = ContrastiveGPT2Handler()
    h.initialize(context)
    h.frontend = Frontend(h, context)
    return h


def ask(h, bodies) -> tuple[list[int], list[dict]]:
    codes, texts, _ = h.frontend.serve(bodies)
    return codes, [json.loads([line for line in t.splitlines() if line.strip()][-1]) for t in texts]


def eager_tokens(h, prompt: str, **fields) -> list[int]:
    params = params_from_request(fields, defaults=h.settings.defaults, limits=h.settings.limits,
                                 vocab_size=h.loaded.model.vocab_size)
    engine = Engine(h.loaded.model, h.engine.shape)
    gen = engine.run_to_completion([Request("x", h.loaded.tokenizer.encode(prompt), params, h.loaded.eos_ids)])[0]
    return gen.tokens


BODIES = [{"prompt": "你好", "max_new_tokens": 12}, {"prompt": "hello", "decoding": "greedy", "max_new_tokens": 9},
          {"prompt": "abc", "top_k": 8, "penalty_alpha": 0.4, "max_new_tokens": 10}]
BODIES = [{**b, "return_token_ids": True} for b in BODIES]


def expected(h, body) -> list[int]:
    fields = {k: v for k, v in body.items() if k not in ("prompt", "return_token_ids")}
    return eager_tokens(h, body["prompt"], **fields)


def test_compile_on_serves_the_compiled_step_and_says_so(tiny_model_dir):
    h = start(tiny_model_dir, compile="on", warmup=True)
    step = json.loads(h.describe_handle())["decode_step"]
    assert step["live"] == step["path"] == "compiled" and step["setting"] == "on"
    assert step["step_check"]["passed"] is True and step["agreement"]["differing_tokens"] == 0
    assert step["fallback"] is None and step["healthy"] is True
    assert step["shapes"] == [[SHAPE.max_slots, SHAPE.candidates, True, False]]
    assert step["compile_s"] > 0 and step["graph_mib"] == 0.0 and step["error"] is None
    codes, answers = ask(h, BODIES)
    assert codes == [200, 200, 200]
    for body, answer in zip(BODIES, answers):
        assert answer["token_ids"] == expected(h, body) and len(answer["token_ids"]) > 0
    assert h.engine.step_path == "compiled"


def test_auto_on_the_cpu_serves_eager_and_says_why(tiny_model_dir):
    h = start(tiny_model_dir, warmup=False)  # the shipped setting: compile: auto
    step = json.loads(h.describe_handle())["decode_step"]
    assert step["setting"] == "auto" and step["live"] == step["path"] == "eager"
    assert "CPU" in step["reason"] and step["compile_s"] is None
    assert h.memory_report["gpu"] is False


@pytest.mark.parametrize("fault", ["mismatch", "raise", "prepare"])
def test_a_misbehaving_fast_step_is_refused_at_start_and_eager_serves(tiny_model_dir, monkeypatch, fault):
    import handler.engine.fast_path as fast_path

    monkeypatch.setattr(fast_path, "FastStep", fake(fault=fault))
    h = start(tiny_model_dir, compile="on", warmup=False)
    step = json.loads(h.describe_handle())["decode_step"]
    assert step["live"] == step["path"] == "eager"
    if fault == "mismatch":
        assert step["step_check"]["passed"] is False and step["reason"].startswith("self-check:")
        assert step["fallback"] == "self-check"
    else:
        assert "injected" in step["error"] and step["step_check"] is None and step["fallback"] == "error"
    codes, answers = ask(h, BODIES[:2])
    assert codes == [200, 200]
    assert [a["token_ids"] for a in answers] == [expected(h, b) for b in BODIES[:2]]


def test_a_fast_step_failing_while_serving_fails_its_step_then_eager_serves(tiny_model_dir, monkeypatch):
    import handler.engine.fast_path as fast_path

    monkeypatch.setattr(fast_path, "FastStep", fake())
    h = start(tiny_model_dir, compile="on", warmup=False)
    assert h.engine.step_path == "compiled"
    h.fast_path.fast_step.fail_after = h.fast_path.fast_step.calls  # from the next step on
    codes, answers = ask(h, BODIES[:1])
    assert codes == [500] and "RuntimeError" in answers[0]["message"]
    step = json.loads(h.describe_handle())["decode_step"]
    assert step["live"] == "eager" and "injected: replay failed" in step["dropped_while_serving"]
    assert step["fallback"] == "fault" and step["healthy"] is True and "device is healthy" in step["reason"]
    codes, _ = ask(h, BODIES)
    assert codes == [200, 200, 200]


def test_a_sticky_device_fault_in_a_replay_restarts_the_worker(tiny_model_dir, monkeypatch):
    """A replay that faults the device (a fake: the probe says the context is gone, as after an illegal address)
    must not leave a worker that fails every later request: it exits, so that TorchServe starts a fresh one."""
    import handler.engine.fast_path as fast_path

    monkeypatch.setattr(fast_path, "FastStep", fake())
    h = start(tiny_model_dir, compile="on", warmup=False)
    exits = []
    h.health_probe = lambda: False  # fake: the device's context is unusable
    h.exit_for_restart = exits.append  # fake: records the exit instead of ending the test process
    h.fast_path.fast_step.fail_after = h.fast_path.fast_step.calls
    codes, _ = ask(h, BODIES[:1])
    assert codes == [500]
    step = json.loads(h.describe_handle())["decode_step"]
    assert step["healthy"] is False and step["fallback"] == "fault" and "restarted" in step["reason"]
    assert len(exits) == 1
    codes, answers = ask(h, BODIES[:2])  # until the exit lands, nothing runs on the broken device
    assert codes == [500, 500] and all("RuntimeError" in a["message"] for a in answers)
    assert len(exits) == 1
