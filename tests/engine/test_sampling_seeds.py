"""The sampling seed, checked without the engine's own sampler as the reference.

tests/engine/test_reference.py compares the engine with a reference decoder that draws from the same
sampler (handler.engine.sampling), so a bug in how the engine feeds the sampler its seed is shared by both.
These checks need no reference draws:

- distinct seeds give distinct draws, for rows that run side by side at the same step;
- one seed gives the same draws in any row of the pool, and joining mid-flight;
- the draws follow softmax(logits / T): the sampler's frequencies against the distribution computed here,
  and the engine's first tokens against transformers' own forward pass of the prompt.
"""

from __future__ import annotations

import pytest
import torch

from handler.engine import GenerationParams, PoolShape, Request
from handler.engine.sampling import allowed, gumbel, sample_tokens, to_unit_interval
from tests.engine.conftest import EOS

PROMPT = [464, 3290, 318, 257]
SAMPLING = {
    "sample": GenerationParams(decoding="sample", do_sample=True, temperature=1.5, max_new_tokens=8),
    "contrastive-sampling": GenerationParams(do_sample=True, temperature=1.5, top_k=8, penalty_alpha=0.6,
                                             max_new_tokens=8),
}
SEEDS = [0, 1, 2, 7, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1]  # neighbours, and seeds differing in one high bit


def prompt_for(model) -> list[int]:
    return [t % model.vocab_size for t in PROMPT]


def tokens_of(engine, requests: list[Request], join_after: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Run `requests` (some joining after a number of iterations); each one's tokens by id."""
    join_after = join_after or {}
    gens = {r.request_id: engine.submit(r) for r in requests if r.request_id not in join_after}
    iterations = 0
    late = sorted((n, r) for r in requests if (n := join_after.get(r.request_id)) is not None) \
        if join_after else []
    while engine.busy or late:
        while late and late[0][0] <= iterations:
            r = late.pop(0)[1]
            gens[r.request_id] = engine.submit(r)
        engine.iterate()
        iterations += 1
    return {rid: list(g.tokens) for rid, g in gens.items()}


@pytest.mark.parametrize("mode", list(SAMPLING))
def test_distinct_seeds_side_by_side_give_distinct_draws(fp32_model, make_engine, mode):
    _, model = fp32_model
    engine = make_engine(len(SEEDS), max_len=32)
    requests = [Request(f"seed-{s}", prompt_for(model), SAMPLING[mode], EOS, s) for s in SEEDS]
    got = tokens_of(engine, requests)  # all admitted together: every row at the same step
    sequences = [tuple(got[r.request_id]) for r in requests]
    assert len(set(sequences)) == len(SEEDS), sequences


@pytest.mark.parametrize("mode", list(SAMPLING))
def test_one_seed_gives_the_same_draws_in_any_row_and_any_time(fp32_model, make_engine, mode):
    _, model = fp32_model
    seed = 123_456_789
    alone = tokens_of(make_engine(1, max_len=32), [Request("alone", prompt_for(model), SAMPLING[mode], EOS, seed)])
    engine = make_engine(6, max_len=32)
    same = [Request(f"row-{i}", prompt_for(model), SAMPLING[mode], EOS, seed) for i in range(4)]
    others = [Request(f"other-{i}", prompt_for(model), SAMPLING[mode], EOS, 1000 + i) for i in range(2)]
    got = tokens_of(engine, [others[0], same[0], same[1], others[1], same[2], same[3]],
                    join_after={"row-2": 1, "row-3": 3})  # two join mid-flight, into other rows
    for r in same:
        assert got[r.request_id] == alone["alone"], r.request_id
    assert got["other-0"] != alone["alone"] and got["other-1"] != alone["alone"]


# ---- the draws follow the distribution they claim ----

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
DRAWS = 8000


def frequencies(tokens: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=n).double() / tokens.numel()


def tolerance(p: torch.Tensor, draws: int) -> torch.Tensor:
    return 5 * (p * (1 - p) / draws).sqrt() + 1e-3  # five standard deviations of a frequency


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.8)])
def test_the_sampler_draws_softmax_of_the_scaled_and_restricted_logits(temperature, top_k, top_p):
    V = LOGITS.numel()
    seeds = torch.arange(DRAWS, dtype=torch.long) * 7919  # one row per seed, all at step 5
    drawn = sample_tokens(LOGITS.expand(DRAWS, V).clone(), torch.full((DRAWS,), temperature),
                          torch.full((DRAWS,), top_k), torch.full((DRAWS,), top_p), seeds, torch.tensor(5))
    p = torch.softmax(LOGITS.double() / temperature, dim=0)  # sorted descending already
    keep = torch.ones(V, dtype=torch.bool)
    if top_k:
        keep[top_k:] = False
    mass_before = torch.cumsum(p, 0) - p
    keep &= mass_before < top_p  # nucleus: the tokens whose higher-ranked mass is below top_p
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    freq = frequencies(drawn, V)
    assert (freq[~keep] == 0).all(), freq
    assert ((freq - p).abs() <= tolerance(p, DRAWS)).all(), (freq, p)


# ---- the edges of the uniform draws and of top-p ----

def test_every_32_bit_hash_maps_inside_the_unit_interval_so_every_gumbel_draw_is_finite():
    edges = torch.tensor([0, 1, 2**9 - 1, 2**9, 2**31, 2**32 - 2**9 - 1, 2**32 - 2**9, 2**32 - 1])
    u = to_unit_interval(edges)
    assert ((u > 0) & (u < 1)).all(), u
    assert torch.isfinite(-torch.log(-torch.log(u))).all()
    # and through the whole hash, over many draws
    noise = gumbel(torch.arange(64), torch.tensor(3), torch.arange(4096).expand(64, 4096), 0x1B873593)
    assert torch.isfinite(noise).all()


def test_top_p_of_one_keeps_a_tail_below_float32_resolution():
    """One token holds all the mass but 1e-13: the float32 running sum is 1.0 from the second token on."""
    sorted_logits = torch.tensor([[30.0, 0.0, 0.0, -1.0]])
    assert float(torch.softmax(sorted_logits, -1)[0, 0]) == 1.0  # the premise
    keep = allowed(sorted_logits, torch.tensor([0]), torch.tensor([1.0]))
    assert keep.all(), keep
    # and top_p just below 1 is a real cut there
    assert allowed(sorted_logits, torch.tensor([0]), torch.tensor([0.999])).tolist() == [[True, False, False, False]]


def test_the_engines_first_draws_follow_transformers_distribution(fp32_model, make_engine):
    """The first sampled token of many seeds against softmax(logits / T) of transformers' own forward pass."""
    hf, model = fp32_model
    temperature, draws = 1.5, 160
    prompt = prompt_for(model)
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0, -1].double()
    p = torch.softmax(logits / temperature, dim=0)
    assert p.max() < 0.5  # the premise: the draws can disagree
    params = GenerationParams(decoding="sample", do_sample=True, temperature=temperature, top_k=0, max_new_tokens=1)
    engine = make_engine(8, max_len=16)
    first = torch.tensor([g.tokens[0] for g in engine.run_to_completion(
        [Request(f"s{s}", prompt, params, (), s) for s in range(draws)])])
    freq = frequencies(first, model.vocab_size)
    likely = p > 0.02
    assert likely.sum() >= 3
    assert ((freq - p).abs()[likely] <= tolerance(p, draws)[likely]).all(), \
        [(int(t), round(float(freq[t]), 3), round(float(p[t]), 3)) for t in likely.nonzero().flatten()]
    assert len(set(first.tolist())) > 5  # many tokens drawn, not one
