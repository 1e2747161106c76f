"""Dice loss and the Dice similarity coefficient (DSC) over whole volumes.

Conventions: probabilities and masks are ``(B, 1, H, W)`` (or any shape, flattened) with values in
[0, 1]; the predicted mask is ``probability > threshold`` (0.5).

- :func:`dice_loss`: ``1 - (2 Σ p·y + s) / (Σ p + Σ y + s)`` over the whole batch, with smoothing
  ``s = 1`` (Buda et al.'s training loss).
- DSC of a volume: ``2 |P ∩ Y| / (|P| + |Y|)`` over all its slices' pixels; 1 when both ``P`` and
  ``Y`` are empty (a correct "no tumour"). The validation score is the mean DSC over volumes
  (patients), as reported for the LGG data.
- Buda et al.'s DSC (:class:`LargestComponentDice`, the metric behind KAISA's 91.0%): ``P`` is
  first reduced to its largest 3-D connected component (26-connectivity: voxels touching by a
  face, an edge or a corner, across neighbouring slices too) before the same formula.
  :class:`VolumeDice` keeps every predicted component.
"""

from __future__ import annotations

import numpy as np
import torch

from kfac_train.distributed import all_gather_objects, all_reduce_sum


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


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean 3-D mask ``(slices, H, W)``.

    An empty mask stays empty; among equally large components the first in raster order wins.
    """
    from scipy import ndimage

    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def volume_dice(predicted: np.ndarray, actual: np.ndarray, largest_only: bool = True) -> float:
    """DSC of boolean volumes ``(slices, H, W)``; the prediction reduced to its largest component
    first when `largest_only` (Buda et al.); 1 when both are empty."""
    if largest_only:
        predicted = largest_component(predicted)
    counts = [float((predicted & actual).sum()), float(predicted.sum()), float(actual.sum())]
    return float(dice_score(*torch.tensor(counts, dtype=torch.float64)))


class LargestComponentDice:
    """Collects each volume's predicted and true slice masks, then averages Buda et al.'s DSC.

    Slices are placed by ``(volume, slice)`` index; :meth:`compute` gathers every rank's slices
    (bit-packed) so that each volume is whole before its components are labelled.
    """

    def __init__(self, num_volumes: int, *, threshold: float = 0.5) -> None:
        if num_volumes < 1:
            raise ValueError(f"LargestComponentDice needs at least one volume, {num_volumes=}")
        self.num_volumes = num_volumes
        self.threshold = threshold
        self.slices: list[tuple[int, int, tuple[int, int], bytes, bytes]] = []

    def update(
        self,
        probabilities: torch.Tensor,
        masks: torch.Tensor,
        volume_ids: torch.Tensor,
        slice_ids: torch.Tensor,
    ) -> None:
        """Add a batch: probabilities and masks ``(B, 1, H, W)``, volume and slice ids ``(B,)``."""
        predicted = (probabilities.detach() > self.threshold)[:, 0].cpu().numpy()
        actual = (masks.detach() > 0.5)[:, 0].cpu().numpy()
        for k, (volume, position) in enumerate(
            zip(volume_ids.tolist(), slice_ids.tolist(), strict=True)
        ):
            shape = predicted[k].shape
            self.slices.append(
                (
                    int(volume),
                    int(position),
                    shape,
                    np.packbits(predicted[k]).tobytes(),
                    np.packbits(actual[k]).tobytes(),
                )
            )

    def per_volume(self) -> list[float]:
        """Buda et al.'s DSC of every volume (a collective in distributed runs)."""
        gathered = [entry for part in all_gather_objects(self.slices) for entry in part]
        scores = []
        for volume in range(self.num_volumes):
            entries = sorted((e for e in gathered if e[0] == volume), key=lambda e: e[1])
            if not entries:
                scores.append(1.0)  # no slice, nothing to find: as an empty prediction of nothing
                continue

            def unpack(data: bytes, shape: tuple[int, int]) -> np.ndarray:
                size = shape[0] * shape[1]
                return np.unpackbits(np.frombuffer(data, np.uint8))[:size].reshape(shape) > 0

            predicted = np.stack([unpack(e[3], e[2]) for e in entries])
            actual = np.stack([unpack(e[4], e[2]) for e in entries])
            scores.append(volume_dice(predicted, actual))
        return scores

    def compute(self) -> float:
        """Mean over volumes of Buda et al.'s DSC (the same on every rank)."""
        return float(np.mean(self.per_volume()))
