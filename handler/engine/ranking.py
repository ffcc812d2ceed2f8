"""Ranking of contrastive decoding: Su et al. 2022, "A Contrastive Framework for Neural Text Generation".

At each step the k most likely tokens v are candidates, and each gets

    score(v) = (1 - alpha) * p(v | x_<t) - alpha * max_j cos(h_v, h_j)

where h_v is the candidate's last-layer hidden state and h_j runs over the
hidden states of every earlier non-padding position of its sequence (prompt
included). Contrastive *search* takes the best score, exactly as transformers
<= 4.55 did (`_ranking_fast`). Contrastive *sampling* draws a candidate with
probability softmax(score / temperature) (Gumbel-max over the same scores), so
that as temperature -> 0 it becomes contrastive search.

Pure tensor functions: no I/O, no host synchronisation.
"""

from __future__ import annotations

import torch


def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ||x|| along the last dimension (what transformers' ranking does, no epsilon)."""
    return x / x.norm(dim=-1, keepdim=True)


def degeneration_penalty(cand_hidden: torch.Tensor, ctx_hidden: torch.Tensor, ctx_valid: torch.Tensor) -> torch.Tensor:
    """Max cosine similarity of each candidate to its row's context.

    cand_hidden [B, K, d] and ctx_hidden [B, S, d], both unit-normalised;
    ctx_valid [B, S] bool. Returns [B, K] float32.
    """
    cosine = torch.matmul(cand_hidden, ctx_hidden.transpose(1, 2)).float()  # [B, K, S]
    cosine = cosine.masked_fill(~ctx_valid[:, None, :], float("-inf"))
    return cosine.max(dim=-1).values


def contrastive_scores(cand_prob: torch.Tensor, penalty: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) * p - alpha * penalty. cand_prob, penalty [B, K]; alpha [B]. Returns [B, K]."""
    a = alpha[:, None]
    return (1.0 - a) * cand_prob - a * penalty


def choice_values(
    scores: torch.Tensor,
    cand_valid: torch.Tensor,
    sample: torch.Tensor,
    temperature: torch.Tensor,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """What each row's chosen candidate is the argmax of: the scores (Gumbel-perturbed on sampling rows), -inf
    where a candidate is not valid.

    scores [B, K]; cand_valid [B, K] bool (rows may use fewer than K candidates);
    sample [B] bool (contrastive sampling rows); temperature [B]; noise [B, K]
    Gumbel noise, or None when no row samples. Returns [B, K].
    """
    if noise is not None:
        sampled = scores / temperature[:, None] + noise
        scores = torch.where(sample[:, None], sampled, scores)
    return scores.masked_fill(~cand_valid, float("-inf"))


def select_candidates(scores, cand_valid, sample, temperature, noise) -> torch.Tensor:
    """Index [B] of the chosen candidate per row (see `choice_values`)."""
    return choice_values(scores, cand_valid, sample, temperature, noise).argmax(dim=-1)
