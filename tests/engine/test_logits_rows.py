"""`CompactGPT2.logits` gives each row the same bits however many rows it is asked for.

Batch invariance rests on the logits matmul running with a multiple of `MATMUL_ROW_MULTIPLE` rows (the
model pads with zero rows): a 1-slot step and a full pool's step must give a request the same logits, bit
for bit. tests/engine/test_batch_invariance.py checks tokens and context states; this checks the logits
themselves, for every row count up to two multiples, and wherever the row sits.
"""

from __future__ import annotations

import pytest
import torch

from handler.engine.model import MATMUL_ROW_MULTIPLE

ROWS = 2 * MATMUL_ROW_MULTIPLE + 1


@pytest.fixture(scope="module")
def hidden(fp32_model):
    """Final-norm hidden states of real tokens (the logits' real inputs): [ROWS, d]."""
    _, model = fp32_model
    g = torch.Generator().manual_seed(25)
    x = torch.randn(ROWS, model.d_model, generator=g)
    return model.final_norm(x)


@pytest.mark.parametrize("rows", range(1, ROWS + 1))
def test_a_row_gets_the_same_logit_bits_whatever_the_row_count(fp32_model, hidden, rows):
    _, model = fp32_model
    full = model.logits(hidden)  # [ROWS, V]
    part = model.logits(hidden[:rows])  # [rows, V]
    assert part.shape == (rows, model.vocab_size) and part.dtype == torch.float32
    assert torch.equal(part, full[:rows])


@pytest.mark.parametrize("rows", [1, 2, 3, MATMUL_ROW_MULTIPLE, MATMUL_ROW_MULTIPLE + 1])
def test_a_row_gets_the_same_logit_bits_wherever_it_sits(fp32_model, hidden, rows):
    _, model = fp32_model
    alone = model.logits(hidden[:1])[0]
    for at in range(rows):
        others = hidden[1:rows]
        batch = torch.cat([others[:at], hidden[:1], others[at:]])  # row 0 of `hidden` at position `at`
        assert torch.equal(model.logits(batch)[at], alone), at


def test_logits_keep_the_leading_shape(fp32_model, hidden):
    _, model = fp32_model
    cand = hidden[:6].view(2, 3, -1)  # [B, K, d], as the candidates' forward gives them
    assert torch.equal(model.logits(cand), model.logits(hidden[:6]).view(2, 3, -1))
