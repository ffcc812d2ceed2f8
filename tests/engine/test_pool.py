"""The slot pool: sized by one formula, allocated once, and the decode step works on views of it."""

from __future__ import annotations

import pytest

from handler.engine import Engine, GenerationParams, PoolShape, Request
from handler.engine.pool import CANDIDATE_BUCKETS, SlotPool, candidate_bucket, pool_bytes, slot_buckets


@pytest.mark.parametrize("slots,max_len,top_k", [(1, 16, 2), (3, 50, 4), (8, 160, 16), (5, 31, 9)])
def test_allocated_bytes_are_the_formula(fp32_model, slots, max_len, top_k):
    _, model = fp32_model
    shape = PoolShape(slots, max_len, top_k)
    pool = SlotPool.allocate(model, shape)
    expected = pool_bytes(n_layer=model.n_layer, n_embd=model.d_model, vocab_size=model.vocab_size, shape=shape,
                          dtype_bytes=4)
    assert pool.nbytes() == sum(expected.values())
    # 2 x layers x slots x (max_len + the largest candidate bucket) x d x 4 bytes, by hand
    assert expected["kv_cache"] == 2 * model.n_layer * slots * (max_len + candidate_bucket(top_k)) * model.d_model * 4
    assert pool.kv.shape == (2, model.n_layer, slots, model.n_head, max_len + candidate_bucket(top_k), model.head_dim)


def test_buckets():
    assert CANDIDATE_BUCKETS[0] == 4 and all(k % 4 == 0 for k in CANDIDATE_BUCKETS)
    assert [candidate_bucket(k) for k in (1, 2, 4, 5, 8, 9, 16)] == [4, 4, 4, 8, 8, 16, 16]
    assert slot_buckets(8) == (1, 2, 4, 8) and slot_buckets(6) == (1, 2, 4, 6) and slot_buckets(1) == (1,)


def test_nothing_is_allocated_per_request_and_steps_work_on_views(fp32_model):
    """Every buffer keeps its storage through admissions, steps and retirements (fixed addresses)."""
    _, model = fp32_model
    engine = Engine(model, PoolShape(4, 48, 8))
    pool = engine.pool
    addresses = {name: getattr(pool, name).data_ptr() for name in ("kv", "hidden", "valid", "tokens", "logits")}
    view = pool.view(2)
    assert view.kv.data_ptr() == pool.kv.data_ptr() and view.tokens.data_ptr() == pool.tokens.data_ptr()
    for i in range(6):
        engine.submit(Request(str(i), [1 + i, 2, 3], GenerationParams(max_new_tokens=5 + i), ()))
    while engine.busy:
        engine.iterate()
    assert {name: getattr(pool, name).data_ptr() for name in addresses} == addresses
    assert engine.pool is pool


@pytest.mark.parametrize("bad", [dict(max_slots=0, max_len=8, max_top_k=2), dict(max_slots=1, max_len=8, max_top_k=True)])
def test_pool_shape_checks_itself(bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        PoolShape(**bad)
