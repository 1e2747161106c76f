"""Running mixup and batched random erasing (SP-NGD recipe augmentations)."""

from __future__ import annotations

import pytest
import torch

from kfac_train.data.augment import BatchRandomErasing, RunningMixup

NUM_CLASSES = 5


def batch(value: float, label: int, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((size, 3, 4, 4), value), torch.full((size,), label)


def test_first_batch_passes_through_with_one_hot_targets() -> None:
    mixup = RunningMixup(0.4, NUM_CLASSES)
    images, labels = batch(1.0, 2)
    mixed, targets = mixup(images, labels)
    assert torch.equal(mixed, images)
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, NUM_CLASSES).float())


def test_second_batch_mixes_with_the_first_using_lambda_of_at_least_a_half() -> None:
    torch.manual_seed(0)
    mixup = RunningMixup(1.0, NUM_CLASSES)
    mixup(*batch(0.0, 0))
    mixed, targets = mixup(*batch(1.0, 1))
    lam = mixed[:, 0, 0, 0]  # lam·1 + (1 − lam)·0
    assert (lam >= 0.5).all() and (lam <= 1.0).all() and lam.std() > 0.05  # per-sample lambda
    assert torch.allclose(mixed, lam.view(-1, 1, 1, 1).expand_as(mixed))
    assert torch.allclose(targets[:, 1], lam) and torch.allclose(targets[:, 0], 1 - lam)
    assert torch.allclose(targets.sum(dim=1), torch.ones(64))


def test_running_mixup_mixes_with_the_previous_mixed_batch() -> None:
    torch.manual_seed(1)
    running, plain = RunningMixup(1.0, NUM_CLASSES), RunningMixup(1.0, NUM_CLASSES, running=False)
    outputs = {}
    for name, mixup in (("running", running), ("plain", plain)):
        torch.manual_seed(1)
        mixup(*batch(0.0, 0))
        second, _ = mixup(*batch(1.0, 1))
        third, targets = mixup(*batch(2.0, 2))
        outputs[name] = (second, third, targets)
    second, third, targets = outputs["running"]
    lam3 = targets[:, 2]
    assert torch.allclose(third[:, 0, 0, 0], lam3 * 2.0 + (1 - lam3) * second[:, 0, 0, 0])
    assert (targets[:, 0] > 0).all()  # class 0 survives from the first batch through the chain
    _, third_plain, targets_plain = outputs["plain"]
    lam3 = targets_plain[:, 2]
    assert torch.allclose(third_plain[:, 0, 0, 0], lam3 * 2.0 + (1 - lam3) * 1.0)
    assert (targets_plain[:, 0] == 0).all()


def test_a_batch_of_another_shape_restarts_the_chain() -> None:
    mixup = RunningMixup(0.4, NUM_CLASSES)
    mixup(*batch(0.0, 0))
    images, labels = batch(1.0, 1, size=3)
    mixed, _ = mixup(images, labels)
    assert torch.equal(mixed, images)


def test_mixup_rejects_a_non_positive_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        RunningMixup(0.0, NUM_CLASSES)


def erased_masks(images: torch.Tensor) -> torch.Tensor:
    return (images == 0).all(dim=1)  # (B, H, W): pixels zeroed in every channel


def test_random_erasing_zeroes_one_rectangle_of_the_configured_area_per_sample() -> None:
    torch.manual_seed(0)
    images = torch.rand(200, 3, 40, 40) + 0.5
    erased = BatchRandomErasing(p=1.0)(images)
    masks = erased_masks(erased)
    assert torch.equal(
        erased[~masks.unsqueeze(1).expand_as(images)], images[~masks.unsqueeze(1).expand_as(images)]
    )
    for mask in masks:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        height = int(rows.max() - rows.min() + 1)
        width = int(cols.max() - cols.min() + 1)
        assert int(mask.sum()) == height * width  # a filled rectangle
        assert 0.015 <= height * width / 1600 <= 0.26
        assert 0.3 - 0.1 <= height / width <= 1 / 0.3 + 0.5
    ratios = torch.tensor([float(m.any(dim=1).sum() / m.any(dim=0).sum()) for m in masks])
    assert (ratios > 1).any() and (ratios < 1).any()  # random height/width swap


def test_random_erasing_applies_with_probability_p_and_not_at_zero() -> None:
    torch.manual_seed(0)
    images = torch.rand(400, 3, 16, 16) + 0.5
    erased_fraction = erased_masks(BatchRandomErasing(p=0.5)(images)).flatten(1).any(1)
    assert 0.4 < erased_fraction.float().mean() < 0.6
    assert torch.equal(BatchRandomErasing(p=0.0)(images), images)


def test_random_erasing_keeps_channels_last_batches_valid() -> None:
    images = (torch.rand(4, 3, 8, 8) + 0.5).to(memory_format=torch.channels_last)
    erased = BatchRandomErasing(p=1.0)(images)
    assert erased.shape == images.shape and erased_masks(erased).flatten(1).any(1).all()
