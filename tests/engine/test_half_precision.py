"""Half precision on the CPU: float16 and bfloat16 through every mode, against float32.

What a GPU worker serves is float16; the CPU runs the same engine in float16 and bfloat16, so CI covers it:

- every mode runs without NaN or inf anywhere in the pool (cache, context states, logits);
- the compact forward's logits match float32's within a stated tolerance (TOLERANCE);
- the share of generated tokens that differ from float32 over a fixed prompt set is measured and printed
  (not hidden: a tiny random model has near ties that rounding flips); what is asserted is that every greedy
  divergence starts at a near tie of float32's own logits, i.e. is rounding, not a bug;
- contrastive ranking is float32 whatever the model's dtype (the known fp16 failures: transformers #21151,
  pytorch #69512): the pool keeps context states and logits in float32, and `rank` scores float32 copies of
  the candidates' states, so states whose norm overflows float16 still rank.
"""

from __future__ import annotations

import random

import pytest
import torch

from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.engine.model import load_gpt2
from handler.engine.ranking import unit
from handler.engine import step as step_module

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# logits of the compact forward against float32's, on the tiny model (logits of std ~1, max ~5): the largest
# absolute difference, and ||half - fp32|| / ||fp32||. Measured here: float16 0.0068 and 1.2e-3, bfloat16 0.073
# and 1.2e-2 (about 2**-11 and 2**-8 relative: each format's rounding, a few times over through the layers).
TOLERANCE = {"float16": (0.03, 5e-3), "bfloat16": (0.3, 4e-2)}
NEW = 20
MODES = {
    "contrastive": GenerationParams(max_new_tokens=NEW),
    "contrastive-sampling": GenerationParams(max_new_tokens=NEW, do_sample=True, temperature=0.7),
    "greedy": GenerationParams(decoding="greedy", max_new_tokens=NEW),
    "sample": GenerationParams(decoding="sample", do_sample=True, max_new_tokens=NEW, top_k=50, top_p=0.9),
}
SHAPE = PoolShape(max_slots=5, max_len=48, max_top_k=8)


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(2024)
    return [[rng.randrange(1, vocab) for _ in range(rng.randint(3, 20))] for _ in range(SHAPE.max_slots)]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    return {name: load_gpt2(tiny_model_dir, torch.device("cpu"), dtype)[1]
            for name, dtype in {"float32": torch.float32, **DTYPES}.items()}


def run(model, mode: str) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, SHAPE, sync_every=3)
    reqs = [Request(str(i), p, MODES[mode], (), seed=i) for i, p in enumerate(prompts(model.vocab_size))]
    return [g.tokens for g in engine.run_to_completion(reqs)], engine


@pytest.fixture(scope="module")
def runs(models):
    """{dtype: {mode: (tokens per prompt, engine after the run)}}"""
    return {name: {mode: run(model, mode) for mode in MODES} for name, model in models.items()}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_without_nan_or_inf(runs, dtype, mode):
    tokens, engine = runs[dtype][mode]
    pool = engine.pool
    assert pool.kv.dtype == DTYPES[dtype]
    assert all(len(t) == NEW for t in tokens)  # no end-of-text id given: every request runs to its length
    assert all(0 <= t < engine.model.vocab_size for row in tokens for t in row)
    for name in ("kv", "hidden", "logits"):
        assert torch.isfinite(getattr(pool, name).float()).all(), name


def logits_of(model, prompt: list[int]) -> torch.Tensor:
    T = len(prompt)
    kv = torch.zeros(2, model.n_layer, 1, model.n_head, T, model.head_dim, dtype=model.dtype)
    with torch.inference_mode():
        hidden = model.prefill(torch.tensor([prompt]), torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool), kv)
        return model.logits(hidden)[0]  # [T, V] float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_match_float32_within_the_stated_tolerance(models, dtype):
    max_abs, max_rel = TOLERANCE[dtype]
    worst_abs = worst_rel = 0.0
    for prompt in prompts(models["float32"].vocab_size):
        ref, half = logits_of(models["float32"], prompt), logits_of(models[dtype], prompt)
        assert half.dtype == torch.float32  # the LM head's output is widened before anything reads it
        worst_abs = max(worst_abs, (half - ref).abs().max().item())
        worst_rel = max(worst_rel, ((half - ref).norm() / ref.norm()).item())
    print(f"\n{dtype} logits vs float32: max |diff| {worst_abs:.4f} (tolerance {max_abs}), "
          f"relative {worst_rel:.2e} (tolerance {max_rel})")
    assert worst_abs <= max_abs and worst_rel <= max_rel


def differing(a: list[int], b: list[int]) -> int:
    return sum(1 for i in range(max(len(a), len(b))) if (a[i] if i < len(a) else None) != (b[i] if i < len(b) else None))


def test_token_disagreement_with_float32_is_measured_and_printed(runs, capsys):
    lines = ["tokens that differ from float32 (tiny model, CPU; a request that diverges once differs from "
             "there on):", f"{'dtype':<10}{'mode':<22}{'differ':>8}{'share':>8}{'requests identical':>20}"]
    shares = {}
    for dtype in DTYPES:
        for mode in MODES:
            ref, out = runs["float32"][mode][0], runs[dtype][mode][0]
            total = sum(len(r) for r in ref)
            diff = sum(differing(a, b) for a, b in zip(ref, out))
            same = sum(a == b for a, b in zip(ref, out))
            shares[dtype, mode] = diff / total
            lines.append(f"{dtype:<10}{mode:<22}{diff:>8}{diff / total:>8.3f}{f'{same}/{len(ref)}':>20}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert all(0.0 <= s <= 1.0 for s in shares.values())
    assert len(shares) == len(DTYPES) * len(MODES)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_greedy_divergence_starts_at_a_near_tie(models, runs, dtype):
    """Where greedy half precision first picks another token than float32, float32's own logits for the two
    tokens are within the logits' tolerance of each other: rounding chose, not a bug."""
    max_abs, _ = TOLERANCE[dtype]
    ref_model = models["float32"]
    for prompt, ref, out in zip(prompts(ref_model.vocab_size), runs["float32"]["greedy"][0], runs[dtype]["greedy"][0]):
        first = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), None)
        if first is None:
            continue
        logits = logits_of(ref_model, prompt + ref[:first])[-1]
        gap = (logits[ref[first]] - logits[out[first]]).item()
        assert 0 <= gap <= 2 * max_abs, (prompt, first, gap)


# ---- contrastive ranking in float32 ----


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_pool_keeps_context_states_and_logits_in_float32(runs, dtype):
    pool = runs[dtype]["contrastive"][1].pool
    assert pool.hidden.dtype == torch.float32 and pool.logits.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
def test_ranking_sees_float32_only(models, dtype, monkeypatch):
    """Spy on the ranking functions during half-precision contrastive steps: every input they get is float32."""
    seen = []
    real_penalty, real_scores = step_module.degeneration_penalty, step_module.contrastive_scores

    def penalty(cand, ctx, valid):
        seen.append(("penalty", cand.dtype, ctx.dtype))
        return real_penalty(cand, ctx, valid)

    def scores(prob, pen, alpha):
        seen.append(("scores", prob.dtype, pen.dtype, alpha.dtype))
        return real_scores(prob, pen, alpha)

    monkeypatch.setattr(step_module, "degeneration_penalty", penalty)
    monkeypatch.setattr(step_module, "contrastive_scores", scores)
    Engine(models[dtype], SHAPE).run_to_completion([Request("a", [5, 6, 7], GenerationParams(max_new_tokens=4), ())])
    assert len(seen) >= 8
    assert all(dt == torch.float32 for entry in seen for dt in entry[1:]), seen


def test_candidate_states_whose_norm_overflows_float16_still_rank(models):
    """The trap of transformers #21151: a float16 state whose norm passes float16's 65504 normalises to zeros
    in float16, and every candidate then looks equally (un)similar to the context. `rank` takes float32 copies:
    it picks the winner that float32 states give, which here is not the one a float16 cosine would give."""
    model = models["float16"]
    engine = Engine(model, PoolShape(2, 16, 4))
    for slot, prompt in enumerate(([5, 6, 7], [8, 9])):
        step_module.prefill_slot(model, engine.pool, slot, prompt, GenerationParams(max_new_tokens=4), (), 0)
    view = engine.pool.view(2)
    g = torch.Generator().manual_seed(0)
    cand_hidden = (torch.randn(2, 4, model.d_model, generator=g) * 12000).clamp(-50000, 50000).to(torch.float16)
    cand_hidden[:, :, :8] += view.hidden[:, :1, :8].to(torch.float16) * 60000  # some look like their context
    assert torch.isfinite(cand_hidden).all() and torch.isinf(cand_hidden.norm(dim=-1)).all()
    half_penalty = step_module.degeneration_penalty(unit(cand_hidden), view.hidden.half(), view.valid[:, :16])
    assert (half_penalty == 0).all()  # float16: every similarity is lost
    cand = torch.tensor([[10, 11, 12, 13], [14, 15, 16, 17]])
    cand_prob = torch.full((2, 4), 0.25)  # equally likely: the degeneration penalty alone decides
    with torch.inference_mode():
        sel = step_module.rank(view, cand, cand_prob, cand_hidden)
        reference = step_module.rank(view, cand, cand_prob, cand_hidden.float())
    penalty = step_module.degeneration_penalty(unit(cand_hidden.float()), view.hidden, view.valid[:, :16])
    assert torch.equal(sel, reference) and torch.equal(sel, penalty.argmin(dim=-1))
    assert penalty.std(dim=-1).min() > 0  # float32 tells the candidates apart
