"""A slow and obviously correct reference for the decoding engine: no cache, no batch, no padding.

For every step of every prompt it recomputes the full forward with transformers'
own `GPT2LMHeadModel`, once for the sequence and once per candidate, and
follows the definitions literally (Su et al. 2022; transformers <= 4.55):

    score(v) = (1 - alpha) * p(v | x) - alpha * max_j cos(h_v, h_j)

The random draws come from `handler.engine.sampling.gumbel`, so the reference and the
engine see the same noise; everything else here is written independently.
"""

from __future__ import annotations

import torch

from handler.engine.params import GenerationParams
from handler.engine.sampling import STREAM_CONTRASTIVE, STREAM_SAMPLE, gumbel


def _hidden(hf_model, seq: list[int]) -> torch.Tensor:
    """Final-norm hidden states [n, d] of the whole sequence."""
    return hf_model.transformer(input_ids=torch.tensor([seq])).last_hidden_state[0]


def _noise(seed: int, step: int, token_ids: list[int], stream: int) -> list[float]:
    return gumbel(
        torch.tensor([seed]), torch.tensor(step), torch.tensor([token_ids]), stream
    )[0].tolist()


def _sample(logits: torch.Tensor, params: GenerationParams, seed: int, step: int) -> int:
    probs = torch.softmax(logits / params.temperature, dim=-1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    if params.top_k:
        order = order[: params.top_k]
    kept, mass = [], 0.0
    total = sum(probs[i] for i in order)
    for i in order:  # the smallest prefix whose mass reaches top_p (renormalised after top-k)
        kept.append(i)
        mass += probs[i] / total
        if mass >= params.top_p and params.top_p < 1.0:  # top_p = 1 is off: every token stays
            break
    scaled = (logits / params.temperature).tolist()
    noise = _noise(seed, step, kept, STREAM_SAMPLE)
    return max(zip(kept, noise), key=lambda kn: scaled[kn[0]] + kn[1])[0]


@torch.no_grad()
def reference_generate(hf_model, prompt: list[int], params: GenerationParams, eos_ids, seed: int = 0):
    """Continue `prompt` token by token; returns (tokens, finish_reason)."""
    seq, out = list(prompt), []
    for step in range(params.max_new_tokens):
        hidden = _hidden(hf_model, seq)
        logits = hf_model.lm_head(hidden[-1]).float()
        if params.decoding == "greedy":
            token = int(logits.argmax())
        elif params.decoding == "sample":
            token = _sample(logits, params, seed, step)
        else:
            probs = torch.softmax(logits, dim=-1)
            top_p, top_i = probs.topk(params.top_k)
            context = [h / h.norm() for h in hidden]
            scores = []
            for p, v in zip(top_p.tolist(), top_i.tolist()):
                h_v = _hidden(hf_model, seq + [v])[-1]
                h_v = h_v / h_v.norm()
                penalty = max(float(torch.dot(h_v, h_j)) for h_j in context)
                scores.append((1 - params.penalty_alpha) * p - params.penalty_alpha * penalty)
            if params.do_sample:
                noise = _noise(seed, step, top_i.tolist(), STREAM_CONTRASTIVE)
                scores = [s / params.temperature + g for s, g in zip(scores, noise)]
            token = top_i.tolist()[max(range(len(scores)), key=scores.__getitem__)]
        out.append(token)
        seq.append(token)
        if token in eos_ids:
            return out, "eos"
    return out, "length"
