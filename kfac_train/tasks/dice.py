"""Dice loss and the Dice similarity coefficient (DSC) over whole volumes.

Conventions: probabilities and masks are ``(B, 1, H, W)`` (or any shape, flattened) with values in
[0, 1]; the predicted mask is ``probability > threshold`` (0.5).

- :func:`dice_loss`: ``1 - (2 Σ p·y + s) / (Σ p + Σ y + s)`` over the whole batch, with smoothing
  ``s = 1`` (Buda et al.'s training loss).
- DSC of a volume: ``2 |P ∩ Y| / (|P| + |Y|)`` over all its slices' pixels; 1 when both ``P`` and
  ``Y`` are empty (a correct "no tumour"). The validation score is the mean DSC over volumes
  (patients), as reported for the LGG data.
"""

from __future__ import annotations

import torch

from kfac_train.distributed import all_reduce_sum


def dice_loss(
    probabilities: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """Soft Dice loss of probabilities against {0, 1} masks of the same shape (scalar)."""
    if probabilities.shape != masks.shape:
        raise ValueError(
            f"dice_loss needs matching shapes, got {tuple(probabilities.shape)} and "
            f"{tuple(masks.shape)}"
        )
    p = probabilities.reshape(-1)
    y = masks.reshape(-1).to(p.dtype)
    intersection = (p * y).sum()
    return 1.0 - (2.0 * intersection + smooth) / (p.sum() + y.sum() + smooth)


def dice_score(
    intersection: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor
) -> torch.Tensor:
    """DSC from pixel counts ``|P ∩ Y|``, ``|P|``, ``|Y|`` (elementwise; 1 where both are empty)."""
    total = predicted + actual
    return torch.where(total > 0, 2.0 * intersection / total.clamp(min=1), torch.ones_like(total))


class VolumeDice:
    """Accumulates per-volume pixel counts over slices, then averages the volumes' DSC.

    Slices of one volume may be seen on different ranks: :meth:`compute` all-reduces the counts
    first (a collective when ``torch.distributed`` is initialised), so every rank gets the same
    score. Counts live on ``device`` (the model's device: NCCL reduces CUDA tensors only).
    """

    def __init__(
        self, num_volumes: int, *, threshold: float = 0.5, device: torch.device | str = "cpu"
    ) -> None:
        if num_volumes < 1:
            raise ValueError(f"VolumeDice needs at least one volume, got {num_volumes=}")
        self.threshold = threshold
        # columns: |P ∩ Y|, |P|, |Y|; float64 keeps large pixel counts exact
        self.counts = torch.zeros(num_volumes, 3, dtype=torch.float64, device=device)

    def update(
        self, probabilities: torch.Tensor, masks: torch.Tensor, volume_ids: torch.Tensor
    ) -> None:
        """Add a batch: probabilities and masks ``(B, 1, H, W)``, ``volume_ids`` ``(B,)`` int."""
        predicted = (probabilities.detach() > self.threshold).flatten(1).to(torch.float64)
        actual = (masks.detach() > 0.5).flatten(1).to(torch.float64)
        per_slice = torch.stack(
            [(predicted * actual).sum(1), predicted.sum(1), actual.sum(1)], dim=1
        )
        self.counts.index_add_(
            0, volume_ids.to(self.counts.device, torch.int64), per_slice.to(self.counts.device)
        )

    def per_volume(self) -> torch.Tensor:
        """DSC of every volume, ``(num_volumes,)`` float64, counts summed over all ranks."""
        counts = all_reduce_sum(self.counts)
        return dice_score(counts[:, 0], counts[:, 1], counts[:, 2])

    def compute(self) -> float:
        """Mean DSC over the volumes (a collective in distributed runs)."""
        return float(self.per_volume().mean())
