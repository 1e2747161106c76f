"""scikit-learn's bundled handwritten digits: 1797 real 8x8 grayscale images, 10 classes.

A fixed stratified split (``test_fraction``, ``split_seed``) keeps the test set identical across
runs and ranks. Pixels (0..16) are standardised with the training split's mean and std.
Samples are ``(image (1, 8, 8) float32, label int64)``. Training images can be shifted at random
by up to ``shift`` pixels (zero padding, then a random 8x8 crop; torchvision's RandomCrop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from kfac_train.config import DataConfig
from kfac_train.data.base import DataBundle
from kfac_train.data.image_split import split_bundle, standardised_split
from kfac_train.registry import DATA, BuildContext


@dataclass
class DigitsConfig(DataConfig):
    name: str = "digits"
    test_fraction: float = 0.2
    split_seed: int = 0
    shift: int = 0


def digits_split(test_fraction: float, split_seed: int) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of standardised (N, 1, 8, 8) images and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    return standardised_split(images, labels, test_fraction, split_seed)


@DATA.register("digits", schema=DigitsConfig)
def build_digits(cfg: DigitsConfig, ctx: BuildContext) -> DataBundle:
    train, test = digits_split(cfg.test_fraction, cfg.split_seed)
    return split_bundle(train, test, cfg.shift, cfg.num_workers, ctx)
