"""Dice loss, the per-volume Dice coefficient and Buda et al.'s largest-component Dice against
values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kfac_train.tasks.dice import (
    LargestComponentDice,
    VolumeDice,
    dice_loss,
    dice_score,
    largest_component,
    volume_dice,
)


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


# A 3-slice 4x4 volume. Prediction: component A = (s0, r0, c0), (s0, r0, c1), (s1, r1, c1) — one
# 26-connected component (the last voxel touches the first by a corner, the second by an edge),
# three pieces under face connectivity; component B = (s2, r3, c2), (s2, r3, c3). Truth:
# (s0, r0, c0), (s1, r1, c1), (s2, r3, c3).
PREDICTED = [(0, 0, 0), (0, 0, 1), (1, 1, 1), (2, 3, 2), (2, 3, 3)]
ACTUAL = [(0, 0, 0), (1, 1, 1), (2, 3, 3)]


def volume_of(voxels: list[tuple[int, int, int]]) -> np.ndarray:
    volume = np.zeros((3, 4, 4), dtype=bool)
    for voxel in voxels:
        volume[voxel] = True
    return volume


def test_largest_component_is_26_connected_across_slices():
    kept = largest_component(volume_of(PREDICTED))
    assert sorted(map(tuple, np.argwhere(kept).tolist())) == PREDICTED[:3]
    assert not largest_component(np.zeros((2, 3, 3), dtype=bool)).any()


def test_buda_dice_keeps_the_largest_component_and_the_old_dice_keeps_all():
    predicted, actual = volume_of(PREDICTED), volume_of(ACTUAL)
    # largest component A: |A ∩ Y| = 2, |A| = 3, |Y| = 3 -> 2·2 / 6
    assert volume_dice(predicted, actual) == pytest.approx(4 / 6)
    # all components: |P ∩ Y| = 3, |P| = 5, |Y| = 3 -> 2·3 / 8
    assert volume_dice(predicted, actual, largest_only=False) == pytest.approx(6 / 8)
    empty = np.zeros_like(predicted)
    assert volume_dice(empty, empty) == 1.0 and volume_dice(empty, actual) == 0.0


def slices_of(voxels: list[tuple[int, int, int]]) -> torch.Tensor:
    return torch.from_numpy(volume_of(voxels)).float()[:, None]  # (3, 1, 4, 4)


def test_the_evaluator_reassembles_volumes_from_shuffled_slices():
    dice = LargestComponentDice(num_volumes=2)
    probabilities = slices_of(PREDICTED) * 0.9
    masks = slices_of(ACTUAL)
    # volume 1 is empty in prediction and truth; slices of volume 0 come in the order 2, 0, 1
    dice.update(probabilities[[2]], masks[[2]], torch.tensor([0]), torch.tensor([2]))
    dice.update(
        torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.tensor([1, 1]), torch.tensor([0, 1])
    )
    dice.update(probabilities[[0, 1]], masks[[0, 1]], torch.tensor([0, 0]), torch.tensor([0, 1]))
    assert dice.per_volume() == pytest.approx([4 / 6, 1.0])
    assert dice.compute() == pytest.approx((4 / 6 + 1.0) / 2)


def _largest_component_dice_on_two_ranks() -> list[float]:
    rank = torch.distributed.get_rank()
    dice = LargestComponentDice(num_volumes=1)
    own = [rank, 2] if rank == 0 else [1]  # the volume's slices are split over the ranks
    dice.update(
        slices_of(PREDICTED)[own], slices_of(ACTUAL)[own], torch.zeros(len(own)), torch.tensor(own)
    )
    return dice.per_volume()


def test_ranks_holding_parts_of_a_volume_get_the_whole_volumes_dice():
    from tests.kfac.dist_utils import run_distributed

    per_rank = run_distributed(_largest_component_dice_on_two_ranks, 2, timeout=60)
    assert per_rank[0] == per_rank[1] == pytest.approx([4 / 6])
