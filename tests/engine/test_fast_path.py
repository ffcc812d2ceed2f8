"""The self-check of the fast step (handler.engine.fast_path.check_steps): it passes what is only rounding, in
float16 and bfloat16, and catches a wrong step.

- A real compiled half-precision step (Inductor on the CPU) of a model made of near ties (every token's
  embedding one vector plus a little noise, so candidates tie in probability and in context similarity):
  end to end its tokens differ from eager's (the check before this one, which required every token equal,
  rejected it and served eager), and the step-by-step check passes it, counting the near ties.
- Mutants, each a fake fast step (the eager step with one deliberate bug, named as fakes, no compile): a
  dropped bias, a wrong position, a stale cache row. Each is caught, in float16, with the part that shows it.
- The eager step itself as the "fast" step: compared, nothing differs (the check can pass).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from handler.engine import Engine, PoolShape
from handler.engine.fast_path import TOLERANCE, check_steps, enable_fast_path, tolerance
from handler.engine.model import CompactGPT2, load_gpt2
from handler.engine.step import decode_one_token

SHAPE = PoolShape(max_slots=2, max_len=64, max_top_k=8)  # tests/engine/test_compiled.py's: Inductor's cache serves
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def near_tie_model(model_dir, dtype: torch.dtype, noise: float = 0.002) -> CompactGPT2:
    """The tiny model with every token embedding (tied to the LM head) one vector plus `noise`: near ties."""
    hf, _ = load_gpt2(model_dir, torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        wte = hf.transformer.wte.weight
        wte.copy_(wte[1].clone() + torch.randn(wte.shape, generator=g).to(dtype) * noise)
    return CompactGPT2(hf)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_compiled_half_step_that_the_token_check_rejected_now_serves(tiny_model_dir, dtype):
    engine = Engine(near_tie_model(tiny_model_dir, HALF[dtype]), SHAPE, sync_every=3)
    report = enable_fast_path(engine, "on")
    assert report.error is None, report.error
    agreement, check = report.agreement, report.step_check
    print(f"\n{dtype}: end to end {agreement['tokens'] - agreement['differing_tokens']}/{agreement['tokens']} tokens "
          f"as eager; step by step {check}")
    # end to end the fast tokens differ from eager's: the check before this one (every token equal) rejected it
    assert agreement["differing_tokens"] > 0
    # step by step, from the same state, the fast step is eager within the dtype's tolerance
    assert check["passed"] is True and check["failures"] == 0 and check["compared"] > 0
    assert max(check["worst"].values()) <= tolerance(HALF[dtype])
    assert report.path == engine.step_path == "compiled" and report.fallback is None


# ---- mutants: fake fast steps, each the eager step with one bug ----


class FakeShiftedPositions:
    """Fake: the model with every candidate one position late (a wrong position id in the step)."""

    def __init__(self, model):
        self._model = model

    def __getattr__(self, name):
        return getattr(self._model, name)

    def candidates(self, tokens, positions, slots, ctx_valid, kv):
        return self._model.candidates(tokens, (positions + 1).clamp(max=self._model.n_positions - 1), slots,
                                      ctx_valid, kv)


def fake_without_bias(model):
    """Fake: the model with the first layer's MLP output bias dropped."""
    out = copy.copy(model)
    first = model.layers[0]
    out.layers = [dataclasses.replace(first, fc_proj_b=torch.zeros_like(first.fc_proj_b)), *model.layers[1:]]
    return out


class FakeMutantStep:
    """Stands in for a fast step: the eager step over the pool, with one deliberate bug."""

    def __init__(self, model, pool, mutation: str | None):
        self.model, self.pool, self.mutation = model, pool, mutation

    def __call__(self, rows, k, sampling, extras=False):
        view = self.pool.view(rows)
        if self.mutation == "dropped bias":
            decode_one_token(fake_without_bias(self.model), view, k, sampling, extras)
        elif self.mutation == "wrong position":
            decode_one_token(FakeShiftedPositions(self.model), view, k, sampling, extras)
        elif self.mutation == "stale cache row":  # the winner's keys and values never reach the slot's position
            ar = torch.arange(rows)
            pos = view.state.next_pos.clamp(max=view.scratch - 1)
            stale = view.kv[:, :, ar, :, pos].clone()
            decode_one_token(self.model, view, k, sampling, extras)
            view.kv[:, :, ar, :, pos] = stale
        else:
            decode_one_token(self.model, view, k, sampling, extras)


@pytest.fixture(scope="module")
def fp16_model(tiny_model_dir):
    return load_gpt2(tiny_model_dir, torch.device("cpu"), torch.float16)[1]


@pytest.mark.parametrize("mutation,part", [
    ("dropped bias", "logits"),
    ("wrong position", "logits"),
    ("stale cache row", "kv_at_pos"),
])
def test_the_self_check_catches_a_wrong_step(fp16_model, mutation, part):
    engine = Engine(fp16_model, SHAPE)
    check = check_steps(engine, FakeMutantStep(fp16_model, engine.pool, mutation), [(2, 8, True, False)])
    assert check.passed is False and check.failures > 0
    assert any(part in why for why in check.first_failure["why"]), check.first_failure
    assert check.worst[part] > TOLERANCE[torch.float16]
    assert engine.pool.state.finished.all()  # the slots are free again


def test_the_eager_step_against_itself_passes_with_nothing_to_forgive(fp16_model):
    engine = Engine(fp16_model, SHAPE)
    check = check_steps(engine, FakeMutantStep(fp16_model, engine.pool, None), [(2, 8, True, False), (1, 8, True, False)])
    assert check.passed is True and check.compared > 10
    assert check.near_ties == 0 and check.failures == 0 and set(check.worst.values()) == {0.0}


def test_a_mutant_is_rejected_by_enable_fast_path_and_eager_serves(fp16_model):
    class FakeBuild(FakeMutantStep):
        path = "compiled"

        def __init__(self, model, pool, shapes, **_):
            super().__init__(model, pool, "wrong position")
            self.shapes = shapes

        def prepare(self):
            from handler.engine.compiled import PrepareReport

            return PrepareReport("none", list(self.shapes), [], 0.0, 0.0, 0, 0)

    engine = Engine(fp16_model, SHAPE)
    report = enable_fast_path(engine, "on", build=FakeBuild)
    assert report.path == engine.step_path == "eager" and report.fallback == "self-check"
    assert "self-check:" in report.reason and report.step_check["passed"] is False


@pytest.mark.parametrize("dtype,eps", [(torch.float16, 2**-10), (torch.bfloat16, 2**-7)])
def test_the_tolerance_is_a_fixed_number_of_the_formats_eps(dtype, eps):
    assert tolerance(dtype) == 16 * eps
    assert tolerance(torch.float32) == 1e-4
