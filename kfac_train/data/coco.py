"""COCO-format instance data for Mask R-CNN: torchvision's CocoDetection + transforms v2.

Layout under ``data.root`` (2017 shown; 2014 is the same with ``2014``)::

    root/train2017/*.jpg
    root/val2017/*.jpg
    root/annotations/instances_train2017.json
    root/annotations/instances_val2017.json

Each sample is ``(image, target)``: ``image`` a float32 ``(3, H, W)`` tensor in [0, 1] at the
file's own size (Mask R-CNN resizes internally, so predictions come back in original pixels), and
``target`` a dict with ``boxes`` (N, 4) float32 XYXY pixels, ``labels`` (N,) int64 COCO category
ids (torchvision's convention: label = category id, 0 = background), ``masks`` (N, H, W) uint8
instance masks decoded from polygons or RLE, and ``image_id`` (int). Crowd annotations and
degenerate boxes are dropped from the targets (COCOeval still sees crowd regions through the
annotation file). Batches are lists (images differ in size): see :func:`collate_detection`.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, Subset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.transforms import v2

from kfac_train.config import DataConfig
from kfac_train.data.base import DataBundle, make_eval_loader, make_train_loader, require_dir
from kfac_train.errors import UserError
from kfac_train.registry import DATA, BuildContext

log = logging.getLogger(__name__)

TARGET_KEYS = ("image_id", "boxes", "labels", "masks", "iscrowd")

DetectionTarget = dict[str, Any]


@dataclass(frozen=True)
class CocoSplit:
    """Where one split lives: an image folder and its instances JSON (absolute paths)."""

    images: Path
    annotations: Path


def resolve_coco_split(
    root: str | Path, images: str, annotations: str, split: str = "train"
) -> CocoSplit:
    """Resolve ``images`` / ``annotations`` (relative to ``root`` unless absolute) and check them.

    Raises `UserError` naming the missing path and the settings that place it
    (``data.root``, ``data.<split>_images`` / ``data.<split>_annotations``).
    """
    base = Path(root).expanduser()
    resolved = CocoSplit(images=base / images, annotations=base / annotations)
    where = (
        f"set data.root to the folder holding {images}/ and {annotations}, or data.{split}_images"
        f" / data.{split}_annotations (see docs/maskrcnn.md)"
    )
    if not resolved.images.is_dir():
        raise UserError(f"COCO image folder not found: {str(resolved.images)!r}; {where}")
    if not resolved.annotations.is_file():
        raise UserError(f"COCO annotation file not found: {str(resolved.annotations)!r}; {where}")
    return resolved


class CompleteTarget:
    """Give every target all of ``boxes``/``labels``/``masks``/``iscrowd``, empty when needed.

    torchvision's wrapper returns only ``image_id`` for an image without annotations.
    """

    def __call__(self, image: Any, target: DetectionTarget) -> tuple[Any, DetectionTarget]:
        if "boxes" in target:
            target["iscrowd"] = torch.as_tensor(target["iscrowd"], dtype=torch.bool)
            return image, target
        height, width = v2.functional.get_size(image)
        target = {
            "image_id": target["image_id"],
            "boxes": tv_tensors.BoundingBoxes(
                torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8)),
            "iscrowd": torch.zeros(0, dtype=torch.bool),
        }
        return image, target


class DropCrowd:
    """Remove crowd instances (``iscrowd=1``) from a target: they are not training targets."""

    def __call__(self, image: Any, target: DetectionTarget) -> tuple[Any, DetectionTarget]:
        keep = ~target.pop("iscrowd")
        target["boxes"] = tv_tensors.wrap(target["boxes"][keep], like=target["boxes"])
        target["labels"] = target["labels"][keep]
        target["masks"] = tv_tensors.wrap(target["masks"][keep], like=target["masks"])
        return image, target


class ToPlainTarget:
    """Unwrap tv_tensors into plain tensors with the dtypes Mask R-CNN expects."""

    def __call__(self, image: Any, target: DetectionTarget) -> tuple[torch.Tensor, DetectionTarget]:
        plain = {
            "image_id": int(target["image_id"]),
            "boxes": target["boxes"].as_subclass(torch.Tensor).to(torch.float32),
            "labels": target["labels"].to(torch.int64),
            "masks": target["masks"].as_subclass(torch.Tensor).to(torch.uint8),
        }
        return image.as_subclass(torch.Tensor), plain


def detection_transforms(train: bool, horizontal_flip: float = 0.5) -> v2.Compose:
    """The per-sample pipeline: flips in training (as in the MLPerf reference), nothing else.

    Resizing and normalisation happen inside Mask R-CNN (``model.min_size`` / ``max_size``).
    """
    steps: list[Any] = [CompleteTarget(), DropCrowd(), v2.ToImage()]
    if train and horizontal_flip > 0:
        steps.append(v2.RandomHorizontalFlip(p=horizontal_flip))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        ToPlainTarget(),
    ]
    return v2.Compose(steps)


def _has_training_target(coco: Any, image_id: int) -> bool:
    """An image is useful for training when it has a non-crowd box wider and taller than 1 px."""
    annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
    return any(a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in annotations)


@dataclass(frozen=True)
class CocoData:
    """A built split: the Dataset of ``(image, target)`` and its pycocotools ground truth."""

    dataset: Dataset
    coco: Any  # pycocotools.coco.COCO

    @property
    def max_category_id(self) -> int:
        """Largest category id declared in the annotation file (0 when there are none)."""
        return max(self.coco.getCatIds(), default=0)


def build_coco_dataset(split: CocoSplit, *, train: bool, horizontal_flip: float = 0.5) -> CocoData:
    """A COCO split as a Dataset of ``(image, target)`` (see module doc) plus its COCO index.

    In training, images without a usable instance are left out (Mask R-CNN learns nothing from
    them), as the torchvision and MLPerf references do; evaluation keeps every image.
    pycocotools' progress prints go to the ``kfac_train.data.coco`` logger.
    """
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        base = CocoDetection(
            str(split.images),
            str(split.annotations),
            transforms=detection_transforms(train, horizontal_flip),
        )
    log.debug("pycocotools: %s", printed.getvalue().strip())
    dataset: Dataset = wrap_dataset_for_transforms_v2(base, target_keys=TARGET_KEYS)
    if train:
        keep = [
            i for i, image_id in enumerate(base.ids) if _has_training_target(base.coco, image_id)
        ]
        if not keep:
            raise UserError(
                f"no image in {str(split.annotations)!r} has a non-crowd instance to train on"
            )
        dataset = Subset(dataset, keep)
    return CocoData(dataset=dataset, coco=base.coco)


def collate_detection(
    batch: list[tuple[torch.Tensor, DetectionTarget]],
) -> tuple[list[torch.Tensor], list[DetectionTarget]]:
    """Keep variable-size images as lists: ``([image_i], [target_i])``."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


@dataclass
class CocoDataConfig(DataConfig):
    """COCO-format detection data (see the module doc for the layout).

    Attributes:
        year: 2017 or 2014; the default folder and file names below follow it.
        train_images, train_annotations, val_images, val_annotations: paths relative to
            ``data.root`` (or absolute) of the image folders and instances JSON files.
        horizontal_flip: probability of flipping a training image.
        max_eval_images: evaluate on the first N validation images only (None: all).
    """

    name: str = "coco"
    year: int = 2017
    train_images: str = "train${.year}"
    train_annotations: str = "annotations/instances_train${.year}.json"
    val_images: str = "val${.year}"
    val_annotations: str = "annotations/instances_val${.year}.json"
    horizontal_flip: float = 0.5
    max_eval_images: Optional[int] = None


@DATA.register("coco", schema=CocoDataConfig)
def build_coco(cfg: CocoDataConfig, ctx: BuildContext) -> DataBundle:
    """Sharded training and evaluation loaders of ``(list of images, list of targets)``.

    Returns the validation ground truth (``eval_info["coco_ground_truth"]``), against which
    the detection task evaluates AP.
    """
    from kfac_train.tasks.detection import DetectionTask

    if not isinstance(ctx.task, DetectionTask):
        raise UserError(f"data=coco needs task=detection, got task={ctx.config.task.name}")
    root = require_dir(cfg.root, "data.root", "/path/to/coco")
    train = build_coco_dataset(
        resolve_coco_split(root, cfg.train_images, cfg.train_annotations),
        train=True,
        horizontal_flip=cfg.horizontal_flip,
    )
    val = build_coco_dataset(
        resolve_coco_split(root, cfg.val_images, cfg.val_annotations, "val"), train=False
    )
    num_classes = getattr(ctx.config.model, "num_classes", None)
    largest = max(train.max_category_id, val.max_category_id)
    if num_classes is not None and largest >= num_classes:
        raise UserError(
            f"model.num_classes={num_classes} but the annotations use category id {largest}: "
            f"set model.num_classes={largest + 1} (labels are COCO category ids)"
        )
    eval_set = val.dataset
    if cfg.max_eval_images is not None:
        eval_set = Subset(eval_set, range(min(cfg.max_eval_images, len(eval_set))))
    return DataBundle(
        train=make_train_loader(
            train.dataset, ctx, num_workers=cfg.num_workers, collate_fn=collate_detection
        ),
        eval=make_eval_loader(
            eval_set, ctx, num_workers=cfg.num_workers, collate_fn=collate_detection
        ),
        num_train_samples=len(train.dataset),
        eval_info={"coco_ground_truth": val.coco},
    )
