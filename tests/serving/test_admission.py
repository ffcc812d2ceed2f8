"""Admission's memory bound: a request fits its slot exactly or is refused with 507 (the mutation check found no
test of the boundary: `pool-length-check-off-by-one` survived the whole suite)."""

import pytest

from handler.engine.params import GenerationParams
from handler.engine.pool import PoolShape
from handler.serving.admission import Admission
from handler.serving.errors import RequestError
from handler.serving.limits import RequestLimits

MAX_LEN = 40  # positions of one slot; the model has more, so only the pool can refuse


@pytest.fixture
def admission():
    return Admission(RequestLimits(), n_positions=1024, pool=PoolShape(max_slots=2, max_len=MAX_LEN, max_top_k=4),
                     position_bytes=1024, request_budget_s=60.0)


@pytest.mark.parametrize("prompt_tokens, new_tokens", [(10, MAX_LEN - 10), (1, MAX_LEN - 1), (MAX_LEN - 1, 1)])
def test_a_request_that_fills_its_slot_exactly_is_admitted(admission, prompt_tokens, new_tokens):
    admission.admit(prompt_tokens, GenerationParams(max_new_tokens=new_tokens))


@pytest.mark.parametrize("prompt_tokens, new_tokens", [(10, MAX_LEN - 9), (1, MAX_LEN), (MAX_LEN, 1)])
def test_one_position_more_than_a_slot_holds_is_refused_with_507(admission, prompt_tokens, new_tokens):
    with pytest.raises(RequestError) as refused:
        admission.admit(prompt_tokens, GenerationParams(max_new_tokens=new_tokens))
    assert refused.value.status == 507 and refused.value.field == "max_new_tokens"
    assert f"slots hold {MAX_LEN} positions" in str(refused.value)
    assert f"at most {MAX_LEN - prompt_tokens})" in str(refused.value)
