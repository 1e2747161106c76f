"""Dice loss and the per-volume Dice coefficient against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from kfac_train.tasks.dice import VolumeDice, dice_loss, dice_score


def test_dice_loss_matches_the_hand_computed_value():
    probabilities = torch.tensor([[[[0.9, 0.2], [0.6, 0.4]]]])
    masks = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    # Σp·y = 0.9 + 0.6 + 0.4 = 1.9, Σp = 2.1, Σy = 3: 1 - (2·1.9 + 1) / (2.1 + 3 + 1)
    assert dice_loss(probabilities, masks).item() == pytest.approx(1 - 4.8 / 6.1)


def test_dice_loss_is_zero_for_a_perfect_prediction_and_differentiable():
    masks = (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert dice_loss(masks, masks).item() == pytest.approx(0.0, abs=1e-7)
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    dice_loss(torch.sigmoid(logits), masks).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_dice_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="matching shapes"):
        dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))


def test_dice_score_from_counts_and_the_empty_case():
    scores = dice_score(
        torch.tensor([2.0, 0.0, 0.0]), torch.tensor([2.0, 0.0, 3.0]), torch.tensor([3.0, 0.0, 0.0])
    )
    assert scores.tolist() == pytest.approx([0.8, 1.0, 0.0])


def test_volume_dice_pools_each_volumes_slices_before_averaging_volumes():
    dice = VolumeDice(num_volumes=2)
    # volume 0, slice A: P = {0, 1}, Y = {0}         -> |P∩Y| = 1, |P| = 2, |Y| = 1
    # volume 0, slice B: P = {},     Y = {2, 3}      -> 0, 0, 2
    # volume 1, slice C: P = {3},    Y = {3}         -> 1, 1, 1
    probabilities = torch.tensor([[0.9, 0.8, 0.1, 0.2], [0.1, 0.1, 0.4, 0.5], [0.0, 0.0, 0.0, 0.7]])
    masks = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]])
    volumes = torch.tensor([0, 0, 1])
    dice.update(probabilities[:2].reshape(2, 1, 2, 2), masks[:2].reshape(2, 1, 2, 2), volumes[:2])
    dice.update(probabilities[2:].reshape(1, 1, 2, 2), masks[2:].reshape(1, 1, 2, 2), volumes[2:])
    # volume 0: 2·1 / (2 + 3) = 0.4; volume 1: 1.0; mean 0.7 (pooled over all pixels: 4/7)
    assert dice.per_volume().tolist() == pytest.approx([0.4, 1.0])
    assert dice.compute() == pytest.approx(0.7)
