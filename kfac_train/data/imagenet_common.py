"""What the two ImageNet pipelines share: layout check, constants, common options, error type.

``data=imagenet`` (torchvision, :mod:`kfac_train.data.imagenet`) and ``data=imagenet_dali``
(NVIDIA DALI, :mod:`kfac_train.data.imagenet_dali`) read the same folders
(``root/train/<wnid>/*.JPEG``, ``root/val/<wnid>/*.JPEG``) with the same crops, labels and
normalisation; the pieces both need live here, so that neither imports the other (and this module
imports neither torchvision nor DALI).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from kfac_train.config import AT_LEAST_ONE, FRACTION, DataConfig, within
from kfac_train.errors import UserError

if TYPE_CHECKING:
    from kfac_train.context import BuildContext

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class CorruptImageError(UserError):
    """An image file could not be decoded; the message names the file (or the tool) and the fix."""


@dataclass
class ImageNetFoldersConfig(DataConfig):
    """Options of both ImageNet pipelines.

    Attributes:
        image_size: crop size S (None = ``model.image_size``, else 224).
        eval_resize: evaluation short-side resize (None = ceil(S / 0.875), 256 for 224).
        min_crop_area: lower bound of the random-resized-crop area fraction (0.08 standard).
        eval_batch_size: evaluation batch per rank (None = the training micro-batch).
        skip_corrupt: skip undecodable images with a counted warning instead of stopping
            (``data=imagenet`` only: DALI aborts on an undecodable file, so it must be false).
    """

    image_size: Optional[int] = within(None, AT_LEAST_ONE)
    eval_resize: Optional[int] = within(None, AT_LEAST_ONE)
    min_crop_area: float = within(0.08, FRACTION)
    eval_batch_size: Optional[int] = within(None, AT_LEAST_ONE)
    skip_corrupt: bool = False


def default_resize_size(image_size: int) -> int:
    """The evaluation resize for a crop of ``image_size``: 256 for 224 (ratio 0.875)."""
    return math.ceil(image_size / 0.875)


def resolve_image_size(cfg_size: int | None, ctx: BuildContext) -> int:
    """``data.image_size``, else the model's ``image_size`` when it has one, else 224."""
    if cfg_size is not None:
        return cfg_size
    model_size = getattr(ctx.config.model, "image_size", None)
    return int(model_size) if model_size is not None else 224


def check_imagenet_root(root: str | Path | None) -> tuple[Path, Path]:
    """``(root/train, root/val)``; a one-line :class:`UserError` naming what is missing."""
    if root is None or str(root) == "":
        raise UserError("data.root is not set: pass data.root=/path/to/imagenet")
    root_path = Path(os.path.expanduser(str(root)))
    for split_dir in (root_path / "train", root_path / "val"):
        if not split_dir.is_dir():
            raise UserError(
                f"ImageNet folder {str(split_dir)!r} not found: set data.root=/path/to/imagenet "
                "(a folder with train/<wnid>/ and val/<wnid>/; see scripts/prepare_imagenet.py)"
            )
    return root_path / "train", root_path / "val"
