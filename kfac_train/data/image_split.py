"""Shared pieces of the small in-memory image datasets (`digits`, `mnist5k`).

- :func:`standardised_split`: a fixed stratified train/test split (identical across runs and
  ranks) with pixels standardised by the training split's mean and std;
- :class:`ShiftedImages`: random translations of training images by up to ``shift`` pixels;
- :func:`split_bundle`: the loaders of such a split.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from kfac_train.data.base import DataBundle, make_eval_loader, make_train_loader
from kfac_train.errors import UserError
from kfac_train.registry import BuildContext


def standardised_split(
    images: torch.Tensor, labels: torch.Tensor, test_fraction: float, split_seed: int
) -> tuple[TensorDataset, TensorDataset]:
    """``(train, test)`` datasets of ``images`` (``(N, C, H, W)`` float32) and ``labels``
    (``(N,)`` int64), split with stratification by label; both standardised with the training
    images' mean and std (one scalar each)."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=split_seed,
        stratify=labels.numpy(),
    )
    train_images = images[train_idx]
    mean, std = train_images.mean(), train_images.std()
    return (
        TensorDataset((train_images - mean) / std, labels[train_idx]),
        TensorDataset((images[test_idx] - mean) / std, labels[test_idx]),
    )


class ShiftedImages(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Training images (``(C, H, W)``) shifted by up to `shift` pixels: zero padding, then a
    random crop back to ``H × W`` (torchvision's RandomCrop; drawn from the global torch RNG)."""

    def __init__(self, base: TensorDataset, shift: int) -> None:
        from torchvision.transforms import v2

        self.base = base
        self.crop = v2.RandomCrop(tuple(base.tensors[0].shape[-2:]), padding=shift)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.base[index]
        return self.crop(image), label


def split_bundle(
    train: TensorDataset, test: TensorDataset, shift: int, num_workers: int, ctx: BuildContext
) -> DataBundle:
    """Training loader (images shifted by up to `shift` pixels when `shift` > 0) and
    evaluation loader (batches of 256) of a split; a negative `shift` is a one-line error."""
    if shift < 0:
        raise UserError(f"data.shift={shift} must be >= 0")
    training: Dataset[tuple[torch.Tensor, torch.Tensor]] = (
        ShiftedImages(train, shift) if shift else train
    )
    return DataBundle(
        train=make_train_loader(training, ctx, num_workers=num_workers),
        eval=make_eval_loader(test, ctx, batch_size=256),
        num_train_samples=len(train),
        image_channels=train.tensors[0].shape[1],
    )
