"""COCO box and mask AP with pycocotools: result conversion and COCOeval, no distribution.

Predictions follow torchvision's detection output for one image: ``boxes`` (N, 4) XYXY pixels,
``labels`` (N,) category ids, ``scores`` (N,) and ``masks`` (N, 1, H, W) probabilities. They are
converted into COCO result records (``bbox`` as XYWH; ``segmentation`` as RLE of the mask
thresholded at ``mask_threshold``, with its ``counts`` decoded to str so it is JSON-able and
picklable) and scored with ``COCOeval`` (iouType ``bbox`` and ``segm``).

Metrics are named ``{bbox,segm}_{ap,ap50,ap75,ap_small,ap_medium,ap_large}`` and hold COCOeval's
``stats[0:6]``: AP averaged over IoU 0.50:0.95 (and at 0.50, 0.75, and per object size), in
[0, 1]; COCO reports -1 for a size range without ground truth.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pycocotools.coco import COCO

import numpy as np
import torch

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")

CocoResult = dict[str, Any]


@contextlib.contextmanager
def capture_stdout() -> Iterator[io.StringIO]:
    """Collect what pycocotools prints (it writes its tables to stdout) into a buffer."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield buffer


def prediction_to_coco(
    image_id: int, prediction: dict[str, torch.Tensor], *, mask_threshold: float = 0.5
) -> tuple[list[CocoResult], list[CocoResult]]:
    """Convert one image's prediction to COCO ``bbox`` and ``segm`` result records."""
    from pycocotools import mask as mask_utils

    boxes = prediction["boxes"].detach().cpu().to(torch.float64)
    if boxes.numel() == 0:
        return [], []
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = prediction["scores"].detach().cpu().tolist()
    labels = prediction["labels"].detach().cpu().tolist()
    bbox_results = [
        {"image_id": int(image_id), "category_id": int(c), "bbox": b, "score": float(s)}
        for b, c, s in zip(xywh, labels, scores, strict=True)
    ]
    segm_results: list[CocoResult] = []
    if "masks" in prediction:
        binary = (prediction["masks"].detach()[:, 0] > mask_threshold).cpu().numpy()
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0).astype(np.uint8)))
        for rle, c, s in zip(rles, labels, scores, strict=True):
            rle["counts"] = rle["counts"].decode("ascii")
            segm_results.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(c),
                    "segmentation": rle,
                    "score": float(s),
                }
            )
    return bbox_results, segm_results


def coco_from_targets(targets: Sequence[dict[str, Any]]) -> COCO:
    """A ground-truth ``COCO`` index built from targets (``image_id``, ``boxes`` XYXY, ``labels``,
    ``masks`` (N, H, W)), e.g. of synthetic data; areas are mask pixel counts, nothing is crowd.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    images, annotations, category_ids = [], [], set()
    for target in targets:
        masks = target["masks"].cpu().numpy().astype(np.uint8)
        height, width = masks.shape[-2:]
        images.append({"id": int(target["image_id"]), "height": height, "width": width})
        boxes = target["boxes"].cpu().to(torch.float64)
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, label, mask in zip(xywh, target["labels"].tolist(), masks, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            category_ids.add(int(label))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": int(target["image_id"]),
                    "category_id": int(label),
                    "bbox": box,
                    "area": float(mask.sum()),
                    "segmentation": rle,
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in sorted(category_ids)],
    }
    with capture_stdout():
        coco.createIndex()
    return coco


def evaluate_coco(
    coco_gt: COCO,
    results: dict[str, Sequence[CocoResult]],
    *,
    image_ids: Sequence[int] | None = None,
) -> tuple[dict[str, float], str]:
    """Run COCOeval for each iou type in ``results`` (keys ``bbox`` / ``segm``).

    ``image_ids`` restricts the evaluation to those images (default: all of ``coco_gt``).
    Returns the metrics (see module doc; all zero for an iou type without any detection, which
    COCOeval itself cannot load) and the text COCOeval printed.
    """
    from pycocotools.cocoeval import COCOeval

    metrics: dict[str, float] = {}
    printed = []
    for iou_type, records in results.items():
        if iou_type not in IOU_TYPES:
            raise ValueError(f"unknown COCO iou type {iou_type!r}; expected one of {IOU_TYPES}")
        if not records:
            metrics.update({f"{iou_type}_{name}": 0.0 for name in STAT_NAMES})
            printed.append(f"{iou_type}: no detections, AP = 0")
            continue
        with capture_stdout() as buffer:
            coco_dt = coco_gt.loadRes(list(records))
            evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            if image_ids is not None:
                evaluator.params.imgIds = sorted({int(i) for i in image_ids})
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        printed.append(f"{iou_type}:\n{buffer.getvalue()}")
        for name, value in zip(STAT_NAMES, evaluator.stats[: len(STAT_NAMES)], strict=True):
            metrics[f"{iou_type}_{name}"] = float(value)
    return metrics, "\n".join(printed)
