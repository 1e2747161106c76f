"""scikit-learn's bundled handwritten digits: 1797 real 8x8 grayscale images, 10 classes.

A fixed stratified split (``test_fraction``, ``split_seed``) keeps the test set identical across
runs and ranks. Pixels (0..16) are standardised with the training split's mean and std.
Samples are ``(image (1, 8, 8) float32, label int64)``. Training images can be shifted at random
by up to ``shift`` pixels (zero padding, then a random 8x8 crop; torchvision's RandomCrop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, TensorDataset

from kfac_train.config import DataConfig
from kfac_train.data.base import DataBundle, make_eval_loader, make_train_loader
from kfac_train.errors import UserError
from kfac_train.registry import DATA, BuildContext


@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    test_fraction: float = 0.2
    split_seed: int = 0
    shift: int = 0


class ShiftedDigits(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Training digits shifted by up to `shift` pixels (drawn from the global torch RNG)."""

    def __init__(self, base: TensorDataset, shift: int) -> None:
        from torchvision.transforms import v2

        self.base = base
        self.crop = v2.RandomCrop(8, padding=shift)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.base[index]
        return self.crop(image), label


def digits_split(test_fraction: float, split_seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of standardised (N, 1, 8, 8) images and int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(),
        test_size=test_fraction,
        random_state=split_seed,
        stratify=labels.numpy(),
    )
    train_images = images[train_idx]
    mean, std = train_images.mean(), train_images.std()
    normalise = lambda x: (x - mean) / std  # noqa: E731
    return (
        TensorDataset(normalise(train_images), labels[train_idx]),
        TensorDataset(normalise(images[test_idx]), labels[test_idx]),
    )


@DATA.register("digits", schema=DigitsConfig)
def build_digits(cfg: DigitsConfig, ctx: BuildContext) -> DataBundle:
    train, test = digits_split(cfg.test_fraction, cfg.split_seed)
    if cfg.shift < 0:
        raise UserError(f"data.shift={cfg.shift} must be >= 0")
    training: Dataset[tuple[torch.Tensor, torch.Tensor]] = (
        ShiftedDigits(train, cfg.shift) if cfg.shift else train
    )
    return DataBundle(
        train=make_train_loader(training, ctx, num_workers=cfg.num_workers),
        eval=make_eval_loader(test, ctx, batch_size=256),
        num_train_samples=len(train),
    )
