"""Writers of small data sets in the real on-disk formats.

- `write_coco_split`: a COCO-2017-layout folder (``train2017/``, ``val2017/``, ``annotations/``) of
  PNG images with filled rectangles (category 1, polygon annotations) and filled ellipses
  (category 3, compressed-RLE annotations), one crowd region and one image without objects.
  The exact instance masks painted into each image are returned for comparison.
- `write_lgg_tree`: a Kaggle-LGG-layout tree of TIFF slices (bright ellipse "lesions" on a noisy
  background) with ``_mask.tif`` masks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

RECTANGLE, ELLIPSE = 1, 3  # category ids; deliberately not contiguous
COCO_SIZE = (96, 128)  # (height, width)


@dataclass
class DrawnInstance:
    """One painted object: its category, XYXY box and exact (H, W) mask."""

    category_id: int
    box_xyxy: tuple[float, float, float, float]
    mask: np.ndarray
    crowd: bool = False


@dataclass
class CocoSet:
    root: Path
    images: str
    annotations: str
    drawn: dict[int, list[DrawnInstance]] = field(default_factory=dict)  # image_id → objects


def _rectangle(rng: np.random.Generator, cell: tuple[int, int, int, int], height: int, width: int):
    x0, y0, x1, y1 = cell
    left, top = rng.integers(x0 + 2, x0 + 10), rng.integers(y0 + 2, y0 + 10)
    right, bottom = rng.integers(left + 12, x1 - 2), rng.integers(top + 12, y1 - 2)
    polygon = [float(v) for v in (left, top, right, top, right, bottom, left, bottom)]
    rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
    return [polygon], mask_utils.decode(rle)


def _ellipse(rng: np.random.Generator, cell: tuple[int, int, int, int], height: int, width: int):
    x0, y0, x1, y1 = cell
    left, top = rng.integers(x0 + 2, x0 + 8), rng.integers(y0 + 2, y0 + 8)
    right, bottom = rng.integers(left + 14, x1 - 2), rng.integers(top + 14, y1 - 2)
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).ellipse([left, top, right, bottom], fill=1)
    mask = np.asarray(canvas, dtype=np.uint8)
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle, mask


def write_coco_split(
    root: Path, split: str, num_images: int, seed: int, first_image_id: int = 1
) -> CocoSet:
    """Write ``root/<split>/*.png`` and ``root/annotations/instances_<split>.json``."""
    rng = np.random.default_rng(seed)
    height, width = COCO_SIZE
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    cells = [(0, 0, 64, 48), (64, 0, 128, 48), (0, 48, 64, 96), (64, 48, 128, 96)]
    colours = {RECTANGLE: (230, 40, 40), ELLIPSE: (40, 230, 40)}
    images, annotations, drawn = [], [], {}
    for n in range(num_images):
        image_id = first_image_id + n
        pixels = rng.integers(0, 60, size=(height, width, 3), dtype=np.uint8)
        objects: list[DrawnInstance] = []
        num_objects = 0 if n == num_images - 1 else 3 - n % 3  # 3, 2, 1, ...; last: none
        for k, cell in enumerate(rng.permutation(len(cells))[:num_objects]):
            category = RECTANGLE if (n + k) % 2 == 0 else ELLIPSE
            if category == RECTANGLE:
                segmentation, mask = _rectangle(rng, cells[cell], height, width)
            else:
                segmentation, mask = _ellipse(rng, cells[cell], height, width)
            x, y, w, h = mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))).tolist()
            crowd = n == 0 and k == 0  # one crowd region in the first image
            pixels[mask.astype(bool)] = colours[category]
            objects.append(DrawnInstance(category, (x, y, x + w, y + h), mask, crowd))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": segmentation,
                    "area": float(mask.sum()),
                    "bbox": [x, y, w, h],
                    "iscrowd": int(crowd),
                }
            )
        file_name = f"{image_id:012d}.png"
        Image.fromarray(pixels).save(root / split / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        drawn[image_id] = objects
    categories = [
        {"id": RECTANGLE, "name": "rectangle", "supercategory": "shape"},
        {"id": ELLIPSE, "name": "ellipse", "supercategory": "shape"},
    ]
    annotation_file = f"annotations/instances_{split}.json"
    (root / annotation_file).write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return CocoSet(root, split, annotation_file, drawn)


def lgg_slice(
    rng: np.random.Generator, size: int, with_lesion: bool
) -> tuple[np.ndarray, np.ndarray]:
    """An (H, W, 3) uint8 "MRI" slice and its (H, W) 0/255 mask: a bright ellipse, or nothing."""
    image = rng.normal(70, 12, size=(size, size, 3))
    mask = np.zeros((size, size), dtype=np.uint8)
    if with_lesion:
        cx, cy = rng.uniform(0.3 * size, 0.7 * size, size=2)
        rx, ry = rng.uniform(0.08 * size, 0.2 * size, size=2)
        yy, xx = np.mgrid[:size, :size]
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        image[inside, 1] += 90  # FLAIR-like hyperintensity
        image[inside, 0] += 30
        mask[inside] = 255
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_lgg_tree(root: Path, num_patients: int, slices: int, size: int, seed: int) -> Path:
    """``root/kaggle_3m/TCGA_XX_<p>_19990101/..._<i>.tif`` and ``..._<i>_mask.tif``."""
    rng = np.random.default_rng(seed)
    base = root / "kaggle_3m"
    for p in range(num_patients):
        patient = f"TCGA_XX_{p:04d}_19990101"
        folder = base / patient
        folder.mkdir(parents=True)
        for i in range(1, slices + 1):
            image, mask = lgg_slice(rng, size, with_lesion=i % 4 != 1)
            tifffile.imwrite(folder / f"{patient}_{i}.tif", image)
            tifffile.imwrite(folder / f"{patient}_{i}_mask.tif", mask)
    (base / "data.csv").write_text("Patient,RNASeqCluster\n")  # the archive's extra files
    return root


def write_calibrated_resnet50(path: Path, images: list) -> Path:
    """A randomly initialised ResNet-50 state dict whose BatchNorm statistics were measured on
    `images` ((3, H, W) tensors in [0, 1]), standing in for ImageNet weights: frozen in Mask
    R-CNN's backbone, it gives well-scaled features like a pretrained one.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration batch
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    batch = torch.stack([(image - mean) / std for image in images])
    model.train()
    with torch.no_grad():
        model(batch)
    torch.save(model.state_dict(), path)
    return path
