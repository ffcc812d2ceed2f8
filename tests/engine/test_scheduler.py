"""The engine's scheduling promises: joins, slot reuse, cancellation, queueing, stopping (tiny model, fp32, CPU)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from handler.engine import FinishReason, GenerationParams, Request, generate
from handler.engine.text import detokenizer
from tests.engine.conftest import EOS, alone, requests_for

GREEDY = GenerationParams(decoding="greedy", max_new_tokens=20)


def random_requests(model, n, rng, params=None):
    specs = params or [
        GenerationParams(max_new_tokens=rng.randint(5, 30)),
        GenerationParams(decoding="greedy", max_new_tokens=rng.randint(5, 30)),
        GenerationParams(top_k=rng.choice([2, 5, 9]), penalty_alpha=0.3, max_new_tokens=rng.randint(5, 30)),
        GenerationParams(do_sample=True, temperature=0.7, max_new_tokens=rng.randint(5, 30)),
        GenerationParams(decoding="sample", do_sample=True, top_p=0.9, max_new_tokens=rng.randint(5, 30)),
    ]
    out = []
    for i in range(n):
        prompt = [rng.randrange(1, model.vocab_size) for _ in range(rng.randint(1, 20))]
        out.append(Request(f"r{i}", prompt, specs[i % len(specs)], EOS, rng.randrange(2**32)))
    return out


# ---- against transformers ----

def test_alpha_zero_is_transformers_greedy_generate(fp32_model):
    hf, model = fp32_model
    rng = random.Random(3)
    for _ in range(4):
        prompt = [rng.randrange(1, model.vocab_size) for _ in range(rng.randint(2, 10))]
        params = GenerationParams(penalty_alpha=0.0, top_k=4, max_new_tokens=24)
        ours = generate(model, requests_for([prompt], params))[0].tokens
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(prompt):].tolist()
        if 0 in theirs:  # transformers stops at the config's eos; ours stops at EOS too
            theirs = theirs[: theirs.index(0) + 1]
        assert ours == theirs


def test_greedy_mode_is_transformers_greedy_generate(fp32_model):
    hf, model = fp32_model
    prompt = [5, 77, 300, 12]
    ours = generate(model, requests_for([prompt], GenerationParams(decoding="greedy", max_new_tokens=30)))[0]
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=0)
    theirs = theirs[0, len(prompt):].tolist()
    assert ours.tokens == theirs[: len(ours.tokens)]
    assert len(ours.tokens) == 30 or ours.finish_reason is FinishReason.EOS


# ---- continuous batching ----

def test_requests_joining_mid_flight_get_their_tokens_alone(fp32_model, make_engine):
    """Requests submitted while others are generating, into reused slots, get the tokens they get alone."""
    _, model = fp32_model
    rng = random.Random(5)
    requests = random_requests(model, 12, rng)
    engine = make_engine(max_slots=4, sync_every=3)
    for i, request in enumerate(requests):
        engine.submit(request)
        for _ in range(i % 3):  # a few iterations between arrivals: joins land mid-generation
            engine.iterate(return_on_events=False, until=time.monotonic())
    while engine.busy:
        engine.iterate()
    for request in requests:
        gen = engine.get(request.request_id)
        assert gen.done and gen.tokens == alone(model, request), request.request_id
    slots_used = {engine.get(r.request_id).slot for r in requests}
    assert slots_used <= set(range(4)) and len(slots_used) == 4  # 12 requests through 4 reused slots


def test_a_finished_request_frees_its_slot_at_once_for_a_waiting_one(fp32_model, make_engine):
    _, model = fp32_model
    engine = make_engine(max_slots=2, sync_every=2)
    short = engine.submit(Request("short", [1, 2, 3], GenerationParams(decoding="greedy", max_new_tokens=2), ()))
    long = engine.submit(Request("long", [4, 5, 6], GenerationParams(decoding="greedy", max_new_tokens=60), ()))
    queued = engine.submit(Request("queued", [7, 8], GenerationParams(decoding="greedy", max_new_tokens=4), ()))
    assert engine.stats().waiting == 3
    changed = engine.iterate()  # admits two, decodes until the short one finishes
    assert short.done and short.finish_reason is FinishReason.LENGTH and short in changed
    assert not long.done
    assert queued.slot == short.slot  # took the freed slot in the same iteration
    while not queued.done:
        engine.iterate()
    assert not long.done  # the queued request did not wait for the long one
    assert len(long.tokens) < 60


def test_a_full_pool_queues_and_then_serves_everyone(fp32_model, make_engine):
    _, model = fp32_model
    engine = make_engine(max_slots=2)
    requests = random_requests(model, 7, random.Random(9))
    gens = [engine.submit(r) for r in requests]
    engine.iterate()
    stats = engine.stats()
    assert stats.slots_in_use == 2 and stats.waiting + stats.slots_in_use + sum(g.done for g in gens) == 7
    while engine.busy:
        engine.iterate()
    assert all(g.done and g.finish_reason in (FinishReason.LENGTH, FinishReason.EOS) for g in gens)
    assert [g.tokens for g in gens] == [alone(model, r) for r in requests]


def test_cancelled_requests_free_their_slots_and_change_no_one(fp32_model, make_engine):
    _, model = fp32_model
    engine = make_engine(max_slots=3, sync_every=2)
    stay = Request("stay", [9, 8, 7], GenerationParams(max_new_tokens=30), ())  # no end-of-text: it stays
    go = engine.submit(Request("go", [1, 2], GenerationParams(decoding="greedy", max_new_tokens=60), ()))
    waiting = engine.submit(Request("waiting", [3], GenerationParams(decoding="greedy", max_new_tokens=60), ()))
    stayed = engine.submit(stay)
    engine.submit(Request("filler", [5], GenerationParams(decoding="greedy", max_new_tokens=60), ()))
    engine.iterate()
    assert go.slot is not None and waiting.slot is not None and engine.stats().waiting == 1
    freed = go.slot
    engine.cancel("go")
    assert go.finish_reason is FinishReason.CANCELLED and engine.stats().slots_in_use == 2
    assert bool(engine.pool.state.finished[freed])  # the device stops changing it
    engine.iterate()
    assert engine.get("filler").slot == freed  # the waiting request took the cancelled one's slot
    engine.cancel("waiting")
    while engine.busy:
        engine.iterate()
    assert stayed.tokens == alone(model, stay)
    assert engine.stats().slots_in_use == 0 and sorted(engine.scheduler.free) == [0, 1, 2]


def test_a_cancelled_waiting_request_never_takes_a_slot(make_engine):
    engine = make_engine(max_slots=1)
    engine.submit(Request("a", [1], GenerationParams(decoding="greedy", max_new_tokens=8), ()))
    b = engine.submit(Request("b", [2], GenerationParams(decoding="greedy", max_new_tokens=8), ()))
    engine.cancel("b")
    while engine.busy:
        engine.iterate()
    assert b.slot is None and b.finish_reason is FinishReason.CANCELLED


def test_a_failing_prefill_fails_its_request_alone(fp32_model, make_engine):
    _, model = fp32_model
    engine = make_engine(max_slots=2)

    def boom():
        raise torch.OutOfMemoryError("simulated")

    good = Request("good", [4, 5], GenerationParams(max_new_tokens=10), EOS)
    bad = engine.submit(Request("bad", [1, 2], GenerationParams(max_new_tokens=10), EOS, on_admit=boom))
    ok = engine.submit(good)
    while engine.busy:
        engine.iterate()
    assert bad.finish_reason is FinishReason.ERROR and isinstance(bad.error, torch.OutOfMemoryError)

def test_a_request_failing_after_its_first_tokens_fails_alone_and_frees_its_slot(fp32_model, make_engine):
    _, model = fp32_model
    engine = make_engine(max_slots=2)
    looks = []

    def fail_at_second_look(tokens):
        looks.append(tokens)
        if len(looks) > 1:
            raise RuntimeError("simulated")

    good = Request("good", [4, 5], GenerationParams(decoding="greedy", max_new_tokens=30), EOS)
    bad = engine.submit(Request("bad", [1, 2], GenerationParams(decoding="greedy", max_new_tokens=30), EOS,
                                on_tokens=fail_at_second_look))
    ok = engine.submit(good)
    while not bad.done:
        engine.iterate()
    assert bad.finish_reason is FinishReason.ERROR and isinstance(bad.error, RuntimeError)
    assert 1 <= looks[0] < len(bad.tokens) < 30  # it had tokens before it failed, and stopped early
    assert not ok.done and engine.stats().slots_in_use == 1  # its slot is free, its neighbour goes on
    while engine.busy:
        engine.iterate()
    assert ok.tokens == alone(model, good)
    assert ok.tokens == alone(model, good)


# ---- stopping ----

def test_per_request_max_new_tokens_and_eos(fp32_model):
    _, model = fp32_model
    prompt = [11, 22, 33]
    free = generate(model, requests_for([prompt], GenerationParams(decoding="greedy", max_new_tokens=20)))[0].tokens
    eos_token = free[6]
    requests = [
        Request("short", prompt, GenerationParams(decoding="greedy", max_new_tokens=5), EOS),
        Request("eos", prompt, GenerationParams(decoding="greedy", max_new_tokens=20), (eos_token,)),
        Request("full", prompt, GenerationParams(decoding="greedy", max_new_tokens=20), EOS),
    ]
    short, stopped, full = generate(model, requests, sync_every=3)
    assert (short.tokens, short.finish_reason) == (free[:5], FinishReason.LENGTH)
    assert stopped.tokens == free[: free.index(eos_token) + 1] and stopped.finish_reason is FinishReason.EOS
    assert full.tokens == free


def test_stop_string_ends_its_request_and_the_others_carry_on(fp32_model, tokenizer):
    _, model = fp32_model
    detok = detokenizer(tokenizer)
    prompts = [tokenizer.encode("Hello there"), tokenizer.encode("你好")]
    free = [g.tokens for g in generate(model, requests_for(prompts, GREEDY, eos=()), detokenize=detok)]
    text = detok(free[0])
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stopped_params = GenerationParams(decoding="greedy", max_new_tokens=20, stop=(stop,))
    stopped, other = generate(model, requests_for(prompts, [stopped_params, GREEDY], eos=()), detokenize=detok,
                              sync_every=4)
    assert stopped.finish_reason is FinishReason.STOP
    assert stopped.text.text() == text[: text.find(stop)]
    assert stopped.tokens == free[0][: len(stopped.tokens)] and len(stopped.tokens) < len(free[0])
    assert other.tokens == free[1] and other.finish_reason is FinishReason.LENGTH


def test_deadline_ends_a_request_as_timeout_with_what_it_made(make_engine):
    engine = make_engine(max_slots=2, sync_every=2)
    late = engine.submit(Request("late", [1, 2], GenerationParams(max_new_tokens=50), EOS, deadline=0.0))
    on_time = engine.submit(Request("on-time", [3], GenerationParams(decoding="greedy", max_new_tokens=6), ()))
    while engine.busy:
        engine.iterate()
    assert late.finish_reason is FinishReason.TIMEOUT and len(late.tokens) == 2
    assert on_time.finish_reason is FinishReason.LENGTH and len(on_time.tokens) == 6


def test_the_text_sees_every_token_once_in_order(fp32_model, tokenizer):
    _, model = fp32_model
    engine_gens = generate(model, requests_for([[3, 4, 5]], GenerationParams(max_new_tokens=13), eos=()),
                           sync_every=5, detokenize=detokenizer(tokenizer))
    assert len(engine_gens[0].tokens) == 13
    assert engine_gens[0].text.text() == detokenizer(tokenizer)(engine_gens[0].tokens)


def test_finished_slots_stop_changing(fp32_model, make_engine):
    engine = make_engine(max_slots=2, sync_every=1)
    short = engine.submit(Request("s", [8, 9], GenerationParams(decoding="greedy", max_new_tokens=3), EOS))
    engine.submit(Request("l", [8, 9], GenerationParams(max_new_tokens=15), EOS))
    while not short.done:
        engine.iterate()
    slot = short.slot
    assert int(engine.pool.state.generated[slot]) == 3
    snapshot = (engine.pool.tokens[slot].clone(), int(engine.pool.state.generated[slot]),
                int(engine.pool.state.next_pos[slot]))
    while engine.busy:
        engine.iterate()
    assert torch.equal(engine.pool.tokens[slot], snapshot[0])
    assert (int(engine.pool.state.generated[slot]), int(engine.pool.state.next_pos[slot])) == snapshot[1:]


@pytest.mark.parametrize("bad,words", [
    (Request("x", [], GREEDY), "no tokens"),
    (Request("x", [1] * 90, GREEDY), "exceeds the slots' 96 positions"),
    (Request("x", [1], GenerationParams(top_k=16)), None),
])
def test_the_engine_refuses_what_its_pool_cannot_hold(make_engine, bad, words):
    engine = make_engine(max_slots=1, max_top_k=8)
    with pytest.raises(ValueError, match=words or "top_k 16 exceeds the pool's 8"):
        engine.submit(bad)
