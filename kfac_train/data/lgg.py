"""The Kaggle "LGG MRI segmentation" data (Buda et al.) as 2-D slices grouped into volumes.

Layout (the Kaggle archive unpacked; ``data.root`` may be the ``kaggle_3m`` folder or any folder
above it)::

    root/<patient_dir>/<patient_dir>_<i>.tif       # (H, W, 3) uint8: pre-contrast, FLAIR, post
    root/<patient_dir>/<patient_dir>_<i>_mask.tif  # (H, W) uint8: 0 background, 255 abnormality

One folder holds one patient's volume; ``<i>`` is the 1-based slice number. Patients (not
slices) are split into training and validation sets with a seeded shuffle (KAISA: 100 / 10), so
no patient appears in both.

Preprocessing follows Buda et al.'s pipeline (the one KAISA's U-Net fork trains with), per
volume: voxels darker than 10% of the volume's maximum are set to 0 and the volume is cropped to
the bounding box (slices, rows, columns) of what remains, the brain (`crop_to_brain`); the
slices are zero-padded to squares and resized to ``S`` (images bilinearly, masks by nearest
neighbour); each channel is clipped to its 10th..99th percentile over the volume and then
standardised (zero mean, unit variance over the volume).

Samples are ``(image, mask, volume, slice)``: ``image`` float32 ``(3, S, S)``, ``mask`` float32
``(1, S, S)`` in {0, 1}, ``volume`` the int index of the slice's volume within the dataset and
``slice`` its position in the (cropped) volume (for the per-volume 3-D Dice). ``S`` is
``image_size`` (256 by default). Training samples get random horizontal flips, scaling and
rotation, applied alike to image and mask.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from kfac_train.config import DataConfig
from kfac_train.data.base import DataBundle, make_eval_loader, make_train_loader, require_dir
from kfac_train.errors import UserError
from kfac_train.registry import DATA, BuildContext

MASK_SUFFIX = "_mask"
_SLICE_NAME = re.compile(r"^(?P<stem>.+)_(?P<index>\d+)$")


@dataclass(frozen=True)
class LggVolume:
    """One patient: the ordered ``(image_path, mask_path)`` pairs of its slices."""

    patient: str
    slices: tuple[tuple[Path, Path], ...]


def find_lgg_volumes(root: str | Path) -> list[LggVolume]:
    """Every patient folder under ``root`` (searched recursively), sorted by folder name.

    Raises ValueError when ``root`` does not exist, holds no ``*_mask.tif`` file, or a mask has no
    image next to it.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(
            f"LGG data folder not found: {str(base)!r}; set data.root to the unpacked Kaggle "
            "'lgg-mri-segmentation' folder (see docs/unet.md)"
        )
    by_folder: dict[Path, list[tuple[int, Path, Path]]] = {}
    for mask_path in base.rglob(f"*{MASK_SUFFIX}.tif"):
        image_path = mask_path.with_name(mask_path.name.replace(f"{MASK_SUFFIX}.tif", ".tif"))
        match = _SLICE_NAME.match(image_path.stem)
        if match is None:
            raise UserError(f"LGG slice name without a slice number: {str(image_path)!r}")
        if not image_path.is_file():
            raise UserError(f"LGG mask {str(mask_path)!r} has no image {image_path.name!r}")
        by_folder.setdefault(mask_path.parent, []).append(
            (int(match["index"]), image_path, mask_path)
        )
    if not by_folder:
        raise UserError(
            f"no LGG slices (*{MASK_SUFFIX}.tif) under {str(base)!r}; set data.root to the "
            "unpacked Kaggle 'lgg-mri-segmentation' folder (see docs/unet.md)"
        )
    volumes = []
    for folder in sorted(by_folder, key=lambda f: f.name):
        ordered = sorted(by_folder[folder])
        volumes.append(LggVolume(folder.name, tuple((img, msk) for _, img, msk in ordered)))
    return volumes


def split_patients(
    volumes: Sequence[LggVolume], num_val: int, seed: int
) -> tuple[list[LggVolume], list[LggVolume]]:
    """Seeded patient-level split: ``num_val`` validation volumes, the rest for training."""
    if not 0 < num_val < len(volumes):
        raise UserError(
            f"data.num_val_patients={num_val} must be between 1 and {len(volumes) - 1} "
            f"(found {len(volumes)} patients)"
        )
    order = list(range(len(volumes)))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:num_val])
    train = [v for i, v in enumerate(volumes) if i not in val_ids]
    val = [v for i, v in enumerate(volumes) if i in val_ids]
    return train, val


def _read_slice(image_path: Path, mask_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One slice as uint8 tensors: image ``(3, H, W)``, mask ``(1, H, W)`` in {0, 1}."""
    import tifffile

    image = np.asarray(tifffile.imread(image_path))
    mask = np.asarray(tifffile.imread(mask_path))
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"LGG image {str(image_path)!r} is not (H, W, 3), got {image.shape}")
    if mask.ndim == 3:
        mask = mask[..., 0]
    if mask.shape != image.shape[:2]:
        raise UserError(
            f"LGG mask {str(mask_path)!r} has shape {mask.shape}, its image {image.shape[:2]}"
        )
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.uint8))
    mask_t = torch.from_numpy((mask > 0).astype(np.uint8))[None]
    return image_t, mask_t


def crop_to_brain(
    images: torch.Tensor, masks: torch.Tensor, fraction: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Buda et al.'s brain crop of one volume: images ``(N, C, H, W)``, masks ``(N, 1, H, W)``.

    Voxels below ``fraction`` x the volume's maximum (all channels) become 0; the volume is cut to
    the bounding box, over slices, rows and columns, of the voxels left non-zero in any channel.
    """
    images = torch.where(images < fraction * images.max(), torch.zeros_like(images), images)
    brain = images.amax(dim=1) > 0  # (N, H, W)
    if not brain.any():
        return images, masks
    bounds = []
    for dims in ((1, 2), (0, 2), (0, 1)):
        nonzero = brain.any(dim=dims[1]).any(dim=dims[0]).nonzero().flatten()
        bounds.append(slice(int(nonzero[0]), int(nonzero[-1]) + 1))
    depth, rows, cols = bounds
    return images[depth, :, rows, cols], masks[depth, :, rows, cols]


def pad_to_square(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad the shorter side of ``(N, C, H, W)`` slices (half before, half after)."""
    height, width = images.shape[-2:]
    diff = abs(height - width)
    if diff == 0:
        return images, masks
    before, after = diff // 2, diff - diff // 2
    padding = [before, after, 0, 0] if height > width else [0, 0, before, after]
    return torch.nn.functional.pad(images, padding), torch.nn.functional.pad(masks, padding)


def intensity_statistics(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per channel of a volume ``(N, C, H, W)``: 10th and 99th percentiles, and the mean and std
    of the volume clipped to them (each ``(C,)`` float32)."""
    values = images.transpose(0, 1).reshape(images.shape[1], -1).to(torch.float64).numpy()
    low, high = (torch.from_numpy(np.percentile(values, q, axis=1)) for q in (10, 99))
    clipped = torch.from_numpy(values).clamp(low[:, None], high[:, None])
    mean, std = clipped.mean(dim=1), clipped.std(dim=1).clamp(min=1e-6)
    return tuple(t.to(torch.float32) for t in (low, high, mean, std))


class LggSlices(Dataset):
    """All slices of the given volumes, held in memory as uint8 at ``image_size`` (module doc).

    Args:
        volumes: the patients to include (e.g. one side of :func:`split_patients`).
        image_size: side ``S`` of the square slices the model sees (a multiple of 16).
        train: apply the random augmentation.
        flip: probability of a horizontal flip (training).
        scale: scale jitter; the scale factor is drawn from ``[1 - scale, 1 + scale]`` (training).
        rotate: maximal rotation in degrees (training).
    """

    def __init__(
        self,
        volumes: Sequence[LggVolume],
        *,
        image_size: int = 256,
        train: bool = False,
        flip: float = 0.5,
        scale: float = 0.05,
        rotate: float = 15.0,
    ) -> None:
        if image_size < 16 or image_size % 16:
            raise UserError(f"data.image_size must be a multiple of 16, got {image_size}")
        if not volumes:
            raise UserError("LggSlices needs at least one volume")
        self.volumes = list(volumes)
        images, masks, volume_ids, slice_ids = [], [], [], []
        statistics = []
        for index, volume in enumerate(self.volumes):
            pairs = [_read_slice(img, msk) for img, msk in volume.slices]
            volume_images, volume_masks = pad_to_square(
                *crop_to_brain(
                    torch.stack([image for image, _ in pairs]),
                    torch.stack([mask for _, mask in pairs]),
                )
            )
            if volume_images.shape[-1] != image_size or volume_images.shape[-2] != image_size:
                volume_images = v2.functional.resize(
                    volume_images, [image_size, image_size], antialias=True
                )
                volume_masks = v2.functional.resize(
                    tv_tensors.Mask(volume_masks), [image_size, image_size]
                ).as_subclass(torch.Tensor)
            statistics.append(intensity_statistics(volume_images))
            images.append(volume_images)
            masks.append(volume_masks)
            volume_ids += [index] * len(volume_images)
            slice_ids += range(len(volume_images))
        self.images = torch.cat(images)  # (N, 3, S, S) uint8
        self.masks = torch.cat(masks)  # (N, 1, S, S) uint8 in {0, 1}
        self.volume_ids = torch.tensor(volume_ids, dtype=torch.int64)  # (N,)
        self.slice_ids = torch.tensor(slice_ids, dtype=torch.int64)  # (N,)
        # (V, 3) each: 10th / 99th percentiles, mean and std of the clipped volume
        stacked = (torch.stack(t) for t in zip(*statistics, strict=True))
        self.low, self.high, self.mean, self.std = stacked
        self.augment = (
            v2.Compose(
                [
                    v2.RandomHorizontalFlip(p=flip),
                    v2.RandomAffine(degrees=rotate, scale=(1.0 - scale, 1.0 + scale)),
                ]
            )
            if train
            else None
        )

    @property
    def num_volumes(self) -> int:
        return len(self.volumes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        volume = int(self.volume_ids[index])
        clipped = (
            self.images[index]
            .to(torch.float32)
            .clamp(self.low[volume, :, None, None], self.high[volume, :, None, None])
        )
        image = (clipped - self.mean[volume, :, None, None]) / self.std[volume, :, None, None]
        mask = self.masks[index]
        if self.augment is not None:
            image, mask = self.augment(tv_tensors.Image(image), tv_tensors.Mask(mask))
            image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        return image, mask.to(torch.float32), volume, int(self.slice_ids[index])


@dataclass
class LggDataConfig(DataConfig):
    """The Kaggle LGG MRI segmentation data (module doc); slices are resized to model.image_size.

    Attributes:
        num_val_patients: patients held out for validation (KAISA: 10 of 110).
        split_seed: seed of the patient split (kept apart from ``seed`` so that runs with
            different seeds validate on the same patients).
        flip, scale, rotate: training augmentation (probability, relative scale jitter, degrees).
    """

    name: str = "lgg"
    num_val_patients: int = 10
    split_seed: int = 0
    flip: float = 0.5
    scale: float = 0.05
    rotate: float = 15.0


@DATA.register("lgg", schema=LggDataConfig)
def build_lgg(cfg: LggDataConfig, ctx: BuildContext) -> DataBundle:
    """Sharded loaders of ``(images, masks, volumes)`` and the number of validation volumes."""
    from kfac_train.tasks.segmentation import SegmentationTask

    if not isinstance(ctx.task, SegmentationTask):
        raise UserError(f"data=lgg needs task=segmentation, got task={ctx.config.task.name}")
    image_size = getattr(ctx.config.model, "image_size", None)
    if image_size is None:
        raise UserError(
            f"data=lgg needs a model with image_size, got model={ctx.config.model.name}"
        )
    root = require_dir(cfg.root, "data.root", "/path/to/lgg-mri-segmentation")
    train_volumes, val_volumes = split_patients(
        find_lgg_volumes(root), cfg.num_val_patients, cfg.split_seed
    )
    train = LggSlices(
        train_volumes,
        image_size=image_size,
        train=True,
        flip=cfg.flip,
        scale=cfg.scale,
        rotate=cfg.rotate,
    )
    val = LggSlices(val_volumes, image_size=image_size)
    return DataBundle(
        train=make_train_loader(train, ctx, num_workers=cfg.num_workers),
        eval=make_eval_loader(val, ctx, num_workers=cfg.num_workers),
        num_train_samples=len(train),
        eval_info={"num_eval_volumes": val.num_volumes},
        image_channels=3,  # _read_slice: (H, W, 3) images, grayscale slices repeated
    )
