"""Contrastive ranking (Su et al. 2022) on tensors small enough to work out by hand."""

from __future__ import annotations

import math

import torch

from handler.engine.ranking import contrastive_scores, degeneration_penalty, select_candidates, unit


def test_degeneration_penalty_is_the_max_cosine_over_valid_context():
    ctx = unit(torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]))  # [B=1, S=3, d=2]
    cand = unit(torch.tensor([[[1.0, 0.0], [0.0, -1.0]]]))  # [1, K=2, 2]
    valid = torch.tensor([[True, True, False]])  # the third slot (cos 0.707 with cand 0) is padding
    penalty = degeneration_penalty(cand, ctx, valid)
    assert torch.allclose(penalty, torch.tensor([[1.0, 0.0]]))  # cand 0 = ctx 0; cand 1: max(0, -1) = 0
    valid_all = torch.tensor([[True, True, True]])
    assert torch.allclose(degeneration_penalty(cand, ctx, valid_all), torch.tensor([[1.0, 0.0]]))
    valid_last = torch.tensor([[False, False, True]])
    assert torch.allclose(degeneration_penalty(cand, ctx, valid_last), torch.tensor([[math.sqrt(0.5), -math.sqrt(0.5)]]))


def test_contrastive_score_and_selection_worked_by_hand():
    prob = torch.tensor([[0.5, 0.3, 0.2]])
    penalty = torch.tensor([[0.9, 0.1, 0.0]])
    # alpha 0.6: 0.4*0.5-0.6*0.9 = -0.34; 0.4*0.3-0.6*0.1 = 0.06; 0.4*0.2-0 = 0.08 -> candidate 2
    scores = contrastive_scores(prob, penalty, torch.tensor([0.6]))
    assert torch.allclose(scores, torch.tensor([[-0.34, 0.06, 0.08]]))
    no_sample = torch.tensor([False])
    every = torch.tensor([[True, True, True]])
    assert select_candidates(scores, every, no_sample, torch.tensor([1.0]), None).tolist() == [2]
    # only two candidates for this row (k=2): candidate 1
    assert select_candidates(scores, torch.tensor([[True, True, False]]), no_sample, torch.tensor([1.0]),
                             None).tolist() == [1]
    # alpha 0 is greedy: the most probable candidate
    assert select_candidates(contrastive_scores(prob, penalty, torch.tensor([0.0])), every, no_sample,
                             torch.tensor([1.0]), None).tolist() == [0]


def test_contrastive_sampling_follows_softmax_of_score_over_temperature():
    scores = torch.tensor([[0.0, math.log(3.0)]])  # softmax at T=1: [0.25, 0.75]
    valid, sample = torch.tensor([[True, True]]), torch.tensor([True])
    picks = []
    for seed in range(4000):
        g = -torch.log(-torch.log(torch.rand(1, 2, generator=torch.Generator().manual_seed(seed))))
        picks.append(int(select_candidates(scores, valid, sample, torch.tensor([1.0]), g)))
    assert abs(sum(picks) / len(picks) - 0.75) < 0.03
    # temperature -> 0 becomes the argmax whatever the noise
    g = torch.tensor([[5.0, -5.0]])
    assert select_candidates(scores, valid, sample, torch.tensor([1e-4]), g).tolist() == [1]
