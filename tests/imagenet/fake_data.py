"""Generated ImageNet-layout trees for the ImageNet tests.

Every image is one solid colour that encodes its id (red = 20 + 3·id), so an image can be
identified after any crop/resize/flip: see `image_ids`. Sizes vary so that resizing and
cropping are exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kfac_train.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

CLASSES = ("n01440764", "n01443537", "n01484850")
TRAIN_PER_CLASS = 7
VAL_PER_CLASS = 5  # 15 validation images: odd, so 2 shards differ in size


def _colour(image_id: int) -> tuple[int, int, int]:
    assert 0 <= image_id < 75
    return (20 + 3 * image_id, 128, 235 - 3 * image_id)


def image_ids(images: torch.Tensor) -> list[int]:
    """Ids of normalised solid-colour images (B, 3, H, W) (any memory format)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    red = (images.float().cpu() * std + mean)[:, 0].mean(dim=(1, 2)) * 255.0
    return [round((r - 20.0) / 3.0) for r in red.tolist()]


def write_tree(root: Path, *, corrupt_in: str | None = None) -> dict[str, dict[int, int]]:
    """Write train/ and val/ trees; returns split → {image id: class index}.

    `corrupt_in="train"` or `"val"` adds one undecodable ``.JPEG`` to that split's 2nd class.
    """
    labels: dict[str, dict[int, int]] = {"train": {}, "val": {}}
    next_id = 0
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for class_index, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                size = (24 + 4 * (k % 3), 20 + 6 * (k % 2))  # (width, height), varied
                pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
                pixels[:] = _colour(next_id)
                Image.fromarray(pixels).save(folder / f"{wnid}_{next_id}.JPEG", quality=95)
                labels[split][next_id] = class_index
                next_id += 1
    if corrupt_in is not None:
        (root / corrupt_in / CLASSES[1] / "broken.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    return labels
