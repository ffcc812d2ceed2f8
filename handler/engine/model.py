"""A compact GPT-2 forward pass over a static KV cache, on the weights of a Hugging Face `GPT2LMHeadModel`.

The model is loaded with `from_pretrained` (see `load_gpt2`); this module only
*reads* its parameters (no copy) and runs the same arithmetic as transformers'
GPT-2 (Radford et al. 2019), with two entry points shaped for decoding:

- `prefill`: a left-padded batch of prompts, K/V written to cache slots [0, T).
- `candidates`: K candidate tokens per row at the next position, each attending
  to its row's cached context and to itself only; candidate j's K/V is written
  to slot t + j. This is what contrastive search needs (Su et al. 2022): all
  B*K candidates in one forward that shares the cache instead of copying it k
  times.

Shapes are fixed for a given batch (no host synchronisation, positions come in
as device tensors), so the candidate step can be captured in a CUDA graph.
`tests/engine/test_model.py` checks the logits against transformers'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Every matmul of the decode step runs with a multiple of this many rows. The CPU's sgemm (MKL) gives a row
# other bits below 4 rows (another kernel), and for 5-7 or 9-11 rows some positions go through a tail kernel;
# with 4, 8 or any multiple of 4 rows, each row's result is the same whatever else is in the matmul and
# wherever it sits (tests/engine/test_batch_invariance.py checks this on the machine that runs the tests).
# The candidate buckets are multiples of 4 for the same reason.
MATMUL_ROW_MULTIPLE = 4


@dataclass(frozen=True)
class Layer:
    ln_1_w: torch.Tensor
    ln_1_b: torch.Tensor
    attn_w: torch.Tensor  # [d, 3d] (Conv1D: x @ W + b)
    attn_b: torch.Tensor
    proj_w: torch.Tensor  # [d, d]
    proj_b: torch.Tensor
    ln_2_w: torch.Tensor
    ln_2_b: torch.Tensor
    fc_w: torch.Tensor  # [d, inner]
    fc_b: torch.Tensor
    fc_proj_w: torch.Tensor  # [inner, d]
    fc_proj_b: torch.Tensor
    scaling: float  # attention scale of this layer


class CompactGPT2:
    """GPT-2 forward functions over the parameters of a `GPT2LMHeadModel` (shared, not copied)."""

    def __init__(self, hf_model):
        config = hf_model.config
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 checkpoints with cross-attention are not supported")
        from transformers.activations import ACT2FN

        self.hf_model = hf_model
        self.config = config
        self.n_layer = config.n_layer
        self.n_head = config.n_head
        self.d_model = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.n_positions = config.n_positions
        self.vocab_size = config.vocab_size
        self.eps = config.layer_norm_epsilon
        self.act = ACT2FN[config.activation_function]
        t = hf_model.transformer
        self.wte = t.wte.weight  # [V, d]
        self.wpe = t.wpe.weight  # [P, d]
        self.lm_head = hf_model.lm_head.weight  # [V, d], tied to wte in GPT-2
        self.ln_f_w, self.ln_f_b = t.ln_f.weight, t.ln_f.bias
        self.layers = []
        for i, block in enumerate(t.h):
            scaling = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                scaling /= float(i + 1)
            self.layers.append(
                Layer(
                    block.ln_1.weight, block.ln_1.bias,
                    block.attn.c_attn.weight, block.attn.c_attn.bias,
                    block.attn.c_proj.weight, block.attn.c_proj.bias,
                    block.ln_2.weight, block.ln_2.bias,
                    block.mlp.c_fc.weight, block.mlp.c_fc.bias,
                    block.mlp.c_proj.weight, block.mlp.c_proj.bias,
                    scaling,
                )
            )

    @property
    def device(self) -> torch.device:
        return self.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.dtype

    # ---- building blocks ----

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # index_select, not wpe[positions]: no host synchronisation inside a captured graph
        shape = (*ids.shape, self.d_model)
        tok = self.wte.index_select(0, ids.reshape(-1))
        pos = self.wpe.index_select(0, positions.reshape(-1))
        return (tok + pos).view(shape)

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, (self.d_model,), layer.ln_2_w, layer.ln_2_b, self.eps)
        h = self.act(_conv1d(h, layer.fc_w, layer.fc_b))
        return _conv1d(h, layer.fc_proj_w, layer.fc_proj_b)

    def _qkv(self, layer: Layer, x: torch.Tensor):
        """x [B, N, d] -> q, k, v each [B, H, N, Dh]."""
        h = F.layer_norm(x, (self.d_model,), layer.ln_1_w, layer.ln_1_b, self.eps)
        qkv = _conv1d(h, layer.attn_w, layer.attn_b)  # [B, N, 3d]
        B, N, _ = qkv.shape
        qkv = qkv.view(B, N, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # [3, B, H, N, Dh]
        return qkv[0], qkv[1], qkv[2]

    def _attend(self, layer, q, k, v, mask) -> torch.Tensor:
        """q [B, H, N, Dh], k/v [B, H, S, Dh], mask [B, 1, N, S] (True attends) -> [B, N, d]."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scaling)
        B, _, N, _ = out.shape
        out = out.transpose(1, 2).reshape(B, N, self.d_model)
        return _conv1d(out, layer.proj_w, layer.proj_b)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.d_model,), self.ln_f_w, self.ln_f_b, self.eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., d] (after the final layer norm) -> logits [..., V] in float32.

        The rows are padded with zero rows to a multiple of MATMUL_ROW_MULTIPLE: each row's
        logits then come from the same matmul kernel however many slots a step runs.
        """
        flat = hidden.reshape(-1, self.d_model)  # [N, d]
        n = flat.shape[0]
        pad = -n % MATMUL_ROW_MULTIPLE
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad, self.d_model)])
        return F.linear(flat, self.lm_head)[:n].float().view(*hidden.shape[:-1], self.vocab_size)

    # ---- entry points ----

    def prefill(self, ids, positions, valid, kv) -> torch.Tensor:
        """Run left-padded prompts and fill the cache.

        ids, positions [B, T] long; valid [B, T] bool (False on left padding);
        kv [2, L, B, H, S, Dh] with S >= T. Returns the final-norm hidden states [B, T, d].
        """
        B, T = ids.shape
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        eye = torch.eye(T, dtype=torch.bool, device=ids.device)
        # a padding query attends to itself only: its output is unused, but never NaN
        mask = (causal & valid[:, None, None, :]) | eye  # [B, 1, T, T]
        x = self._embed(ids, positions)  # [B, T, d]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x)
            kv[0, i, :, :, :T] = k
            kv[1, i, :, :, :T] = v
            x = x + self._attend(layer, q, k, v, mask)
            x = x + self._mlp(layer, x)
        return self.final_norm(x)

    def candidates(self, tokens, positions, slots, ctx_valid, kv) -> torch.Tensor:
        """Run K candidate tokens per row at the next position.

        tokens [B, K] long; positions [B] long (position id of the new token);
        slots [K] long (cache slots t..t+K-1, a device tensor); ctx_valid [B, S] bool
        (cached context each row may attend to); kv [2, L, B, H, S, Dh].
        Candidate j attends to its row's context and to slot t + j only.
        Returns the final-norm hidden states [B, K, d].
        """
        B, K = tokens.shape
        S = kv.shape[4]
        own_slot = torch.arange(S, device=slots.device)[None, :] == slots[:, None]  # [K, S]
        mask = ctx_valid[:, None, None, :] | own_slot[None, None]  # [B, 1, K, S]
        x = self._embed(tokens, positions[:, None].expand(B, K))  # [B, K, d]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x)
            kv[0, i].index_copy_(2, slots, k)
            kv[1, i].index_copy_(2, slots, v)
            x = x + self._attend(layer, q, kv[0, i], kv[1, i], mask)
            x = x + self._mlp(layer, x)
        return self.final_norm(x)


def _conv1d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """transformers' Conv1D: x [..., n_in] @ w [n_in, n_out] + b."""
    out = torch.addmm(b, x.reshape(-1, x.shape[-1]), w)
    return out.view(*x.shape[:-1], w.shape[1])


def load_gpt2(model_dir: str | Path, device: torch.device, dtype: torch.dtype):
    """Load a saved GPT-2 folder straight onto `device` in `dtype`; returns (hf_model, CompactGPT2).

    `device_map` makes transformers materialise each tensor on the device in the
    target dtype: no float32 copy, no CPU-then-GPU double residency.
    """
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = GPT2LMHeadModel.from_pretrained(
        str(model_dir), dtype=dtype, device_map={"": str(device)}, local_files_only=True
    )
    model.eval()
    model.requires_grad_(False)
    return model, CompactGPT2(model)
