"""Our compact GPT-2 forward against transformers' GPT2LMHeadModel, on the same weights."""

from __future__ import annotations

import pytest
import torch

from handler.engine.model import load_gpt2


def empty_cache(model, rows: int, positions: int) -> torch.Tensor:
    return torch.zeros(2, model.n_layer, rows, model.n_head, positions, model.head_dim, dtype=model.dtype)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 0.15)])
def test_prefill_logits_match_transformers(tiny_model_dir, dtype, atol):
    hf, model = load_gpt2(tiny_model_dir, torch.device("cpu"), dtype)
    for prompt in ([5, 6, 7, 8, 9, 10], [11, 12], [300, 301, 302, 303]):
        ids = torch.tensor([prompt])
        T = len(prompt)
        with torch.no_grad():
            ours = model.logits(model.prefill(ids, torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool),
                                              empty_cache(model, 1, T + 4)))
            theirs = hf(input_ids=ids).logits.float()
        assert torch.allclose(ours, theirs, atol=atol, rtol=0)
        assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= (1.0 if dtype == torch.float32 else 0.9)


def test_candidates_see_their_context_and_themselves_only(tiny_model_dir):
    """K candidates in one forward = K separate full forwards of prompt + candidate."""
    hf, model = load_gpt2(tiny_model_dir, torch.device("cpu"), torch.float32)
    prompts = [[5, 6, 7, 8], [40, 41]]
    cands = torch.tensor([[100, 200, 300, 5], [7, 8, 9, 10]])
    K, P = cands.shape[1], 8  # positions [0, 4) context, [4, 8) the candidates' scratch
    kv = empty_cache(model, 2, P)
    valid = torch.zeros(2, P, dtype=torch.bool)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            T = len(prompt)
            model.prefill(torch.tensor([prompt]), torch.arange(T)[None], torch.ones(1, T, dtype=torch.bool),
                          kv[:, :, row:row + 1])
            valid[row, :T] = True
        positions = torch.tensor([len(p) for p in prompts])
        hidden = model.candidates(cands, positions, 4 + torch.arange(K), valid, kv)
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
