"""A slow and obviously correct reference for the decoding engine: no cache, no batch, no padding.

For every step of every prompt it recomputes the full forward with transformers'
own `GPT2LMHeadModel`, once for the sequence and once per candidate, and
follows the definitions literally (Su et al. 2022; transformers <= 4.55):

    score(v) = (1 - alpha) * p(v | x) - alpha * max_j cos(h_v, h_j)

Logits processing follows the definitions token by token, in the order the
engine documents (handler.engine.params): logit_bias added; repetition_penalty as
transformers' RepetitionPenaltyLogitsProcessor (each token of prompt and output
once: logit < 0 multiplied, else divided); frequency and presence penalties as
OpenAI defines them (logit -= frequency * count, then -= presence if count > 0,
over the output); end-of-text ids at -inf while the output is shorter than
min_tokens. Penalty values are float32, as a request's parameters are on the
device. Logprobs: log_softmax of the raw logits, or of the processed ones (divided
by the temperature for decoding="sample").

The random draws come from `handler.engine.sampling.gumbel`, so the reference and the
engine see the same noise; everything else here is written independently.
"""

from __future__ import annotations

from collections import Counter

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


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def process(logits: torch.Tensor, params: GenerationParams, prompt: list[int], out: list[int], eos_ids
            ) -> torch.Tensor:
    """The logits [V] after logit_bias, the penalties and min_tokens, one token at a time (module docstring)."""
    x = logits.clone()
    for token, bias in params.logit_bias:
        x[token] = x[token] + _f32(bias)
    if params.repetition_penalty != 1.0:
        rep = _f32(params.repetition_penalty)
        for token in set(prompt) | set(out):
            x[token] = x[token] * rep if x[token] < 0 else x[token] / rep
    for token, count in Counter(out).items():
        x[token] = x[token] - _f32(params.frequency_penalty) * count
        x[token] = x[token] - _f32(params.presence_penalty)
    if len(out) < params.min_tokens:
        for token in eos_ids:
            x[token] = float("-inf")
    return x


def _logprob_entry(dist: torch.Tensor, token: int, n: int) -> tuple[int, float, list[tuple[int, float]]]:
    lp = torch.log_softmax(dist, dim=-1)
    values, ids = lp.topk(n)
    return token, float(lp[token]), list(zip(ids.tolist(), values.tolist()))


@torch.no_grad()
def reference_prompt_logprobs(hf_model, prompt: list[int], n: int) -> list:
    """[None] + (token, logprob, top n) for each later prompt token, from the raw logits of the position before."""
    logits = hf_model.lm_head(_hidden(hf_model, prompt)).float()  # [T, V]
    return [None] + [_logprob_entry(logits[i - 1], prompt[i], n) for i in range(1, len(prompt))]


@torch.no_grad()
def reference_generate(hf_model, prompt: list[int], params: GenerationParams, eos_ids, seed: int = 0):
    """Continue `prompt` token by token; returns (tokens, finish_reason)."""
    tokens, reason, _ = reference_details(hf_model, prompt, params, eos_ids, seed)
    return tokens, reason


@torch.no_grad()
def reference_details(hf_model, prompt: list[int], params: GenerationParams, eos_ids, seed: int = 0):
    """(tokens, finish_reason, logprobs): logprobs is one (token, logprob, top n) per token when the params
    ask for them (else [])."""
    seq, out, logprobs = list(prompt), [], []
    for step in range(params.max_new_tokens):
        hidden = _hidden(hf_model, seq)
        raw = hf_model.lm_head(hidden[-1]).float()
        logits = process(raw, params, prompt, out, eos_ids)
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
        if params.logprobs is not None:
            dist = raw
            if params.logprobs_source == "processed":
                dist = logits / _f32(params.temperature) if params.decoding == "sample" else logits
            logprobs.append(_logprob_entry(dist, token, params.logprobs))
        out.append(token)
        seq.append(token)
        if token in eos_ids:
            return out, "eos", logprobs
    return out, "length", logprobs
