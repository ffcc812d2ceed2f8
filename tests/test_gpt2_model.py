"""Our compact GPT-2 forward against transformers' GPT2LMHeadModel, on the same weights."""

from __future__ import annotations

import pytest
import torch

from handler.engine.decoding import left_pad
from handler.engine.model import load_gpt2
from handler.engine.kv_cache import DecodeBuffers


def hf_logits(hf, ids, valid):
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    out = hf(input_ids=ids, attention_mask=valid.long(), position_ids=positions)
    return out.logits


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_prefill_logits_match_transformers(tiny_model_dir, dtype, atol):
    hf, model = load_gpt2(tiny_model_dir, torch.device("cpu"), dtype)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [300, 301, 302, 303]]
    ids, valid = left_pad(prompts, "cpu")
    buffers = DecodeBuffers.allocate(model, len(prompts), ids.shape[1] + 4, contrastive=False)
    with torch.no_grad():
        ours = model.logits(model.prefill(ids, (valid.long().cumsum(1) - 1).clamp(min=0), valid, buffers.kv))
        theirs = hf_logits(hf, ids, valid).float()
    assert torch.allclose(ours[valid], theirs[valid], atol=atol, rtol=0)
    assert (ours[valid].argmax(-1) == theirs[valid].argmax(-1)).float().mean() >= (1.0 if dtype == torch.float32
                                                                                     else 0.9)


def test_candidates_see_their_context_and_themselves_only(tiny_model_dir):
    """K candidates in one forward = K separate full forwards of prompt + candidate."""
    hf, model = load_gpt2(tiny_model_dir, torch.device("cpu"), torch.float32)
    prompts = [[5, 6, 7, 8], [40, 41]]
    cands = torch.tensor([[100, 200, 300], [7, 8, 9]])
    ids, valid = left_pad(prompts, "cpu")
    T, K = ids.shape[1], cands.shape[1]
    buffers = DecodeBuffers.allocate(model, 2, T + K + 1, contrastive=False)
    with torch.no_grad():
        model.prefill(ids, (valid.long().cumsum(1) - 1).clamp(min=0), valid, buffers.kv)
        buffers.valid[:, :T] = valid
        hidden = model.candidates(cands, valid.long().sum(1), T + torch.arange(K), buffers.valid, buffers.kv)
        for b, prompt in enumerate(prompts):
            for j in range(K):
                full = hf.transformer(input_ids=torch.tensor([prompt + [int(cands[b, j])]])).last_hidden_state
                assert torch.allclose(hidden[b, j], full[0, -1], atol=1e-5)


def test_weights_are_shared_with_the_hf_module_not_copied(tiny_model_dir):
    hf, model = load_gpt2(tiny_model_dir, torch.device("cpu"), torch.float32)
    assert model.wte.data_ptr() == hf.transformer.wte.weight.data_ptr()
    assert model.lm_head.data_ptr() == model.wte.data_ptr()  # tied, as in GPT-2
    assert model.layers[0].attn_w.data_ptr() == hf.transformer.h[0].attn.c_attn.weight.data_ptr()


def test_loads_straight_into_the_target_dtype(tiny_model_dir):
    hf, model = load_gpt2(tiny_model_dir, torch.device("cpu"), torch.float16)
    assert {p.dtype for p in hf.parameters()} == {torch.float16}
    assert model.dtype == torch.float16 and model.device == torch.device("cpu")
