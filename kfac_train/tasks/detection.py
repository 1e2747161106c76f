"""Instance detection and segmentation (Mask R-CNN): the model's own losses, COCO AP evaluation.

Batches are ``(images, targets)`` lists (kfac_train/data/coco.py): ``images[i]`` a float
``(3, H_i, W_i)`` tensor in [0, 1], ``targets[i]`` a dict with ``boxes`` (N_i, 4) XYXY pixels,
``labels`` (N_i,) int64 category ids, ``masks`` (N_i, H_i, W_i) uint8 and ``image_id`` (int).

Training loss: the sum of torchvision Mask R-CNN's losses (RPN objectness and box regression, ROI
classification, box regression and mask BCE), each already averaged over its sampled anchors or
proposals; the parts are logged separately.

Evaluation (`CocoEvaluator`): every rank converts its predictions to COCO result records, the
records are gathered to rank 0, which runs pycocotools' COCOeval for ``bbox`` and ``segm`` and
sends the metrics to every rank (names in kfac_train/tasks/coco_eval.py, plus ``reached_target``:
1.0 once both box and mask AP reach the task's targets, MLPerf-style; stop on it with
``trainer.target_metric=reached_target trainer.target_value=1``). The ground truth is the
validation annotation file (handed over by ``data=coco``); with ``data=synthetic`` it is built
from the evaluation batches' targets.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kfac_train.config import ModelConfig, TaskConfig
from kfac_train.distributed import all_gather_objects, broadcast_object
from kfac_train.errors import UserError
from kfac_train.registry import TASKS, BuildContext
from kfac_train.tasks.base import Evaluator, LossOutput, Task

log = logging.getLogger(__name__)

DetectionBatch = tuple[list[torch.Tensor], list[dict[str, Any]]]


@dataclass
class DetectionConfig(TaskConfig):
    """Attributes:
    mask_threshold: a predicted mask pixel belongs to the object above this probability.
    target_bbox_ap, target_segm_ap: the AP pair ``reached_target`` checks (KAISA / MLPerf:
        0.377 and 0.342).
    """

    name: str = "detection"
    mask_threshold: float = 0.5
    target_bbox_ap: float = 0.377
    target_segm_ap: float = 0.342


def _is_main() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


class CocoEvaluator(Evaluator):
    """Collects COCO result records on each rank; `compute` scores them on rank 0 (module doc).

    Args:
        ground_truth: a pycocotools ``COCO`` of the evaluation set, or None to build one from the
            targets of the evaluated batches (synthetic data).
        cfg: the task config (mask threshold and AP targets).
    """

    def __init__(self, ground_truth: Any | None, cfg: DetectionConfig) -> None:
        self.ground_truth = ground_truth
        self.cfg = cfg
        self.bbox: list[dict[str, Any]] = []
        self.segm: list[dict[str, Any]] = []
        self.image_ids: list[int] = []
        self.targets: list[dict[str, Any]] = []  # only without a ground-truth file

    def update(self, model: nn.Module, batch: Any) -> None:
        from kfac_train.tasks.coco_eval import prediction_to_coco

        images, targets = batch
        predictions = model(images)
        for target, prediction in zip(targets, predictions, strict=True):
            image_id = int(target["image_id"])
            bbox, segm = prediction_to_coco(
                image_id, prediction, mask_threshold=self.cfg.mask_threshold
            )
            self.bbox += bbox
            self.segm += segm
            self.image_ids.append(image_id)
            if self.ground_truth is None:
                self.targets.append({k: _to_cpu(v) for k, v in target.items()})

    def compute(self) -> dict[str, float]:
        from kfac_train.tasks.coco_eval import coco_from_targets, evaluate_coco

        gathered = all_gather_objects((self.bbox, self.segm, self.image_ids, self.targets))
        metrics: dict[str, float] | None = None
        if _is_main():
            bbox = [r for part in gathered for r in part[0]]
            segm = [r for part in gathered for r in part[1]]
            image_ids = [i for part in gathered for i in part[2]]
            ground_truth = self.ground_truth
            if ground_truth is None:
                ground_truth = coco_from_targets([t for part in gathered for t in part[3]])
            metrics, printed = evaluate_coco(
                ground_truth, {"bbox": bbox, "segm": segm}, image_ids=image_ids
            )
            log.info("COCO evaluation on %d images:\n%s", len(set(image_ids)), printed)
            reached = (
                metrics["bbox_ap"] >= self.cfg.target_bbox_ap
                and metrics["segm_ap"] >= self.cfg.target_segm_ap
            )
            metrics["reached_target"] = float(reached)
        return broadcast_object(metrics)


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


@TASKS.register("detection", schema=DetectionConfig)
class DetectionTask(Task):
    """Mask R-CNN training and COCO evaluation (module doc)."""

    cfg: DetectionConfig

    def __init__(self, cfg: DetectionConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.ground_truth: Any | None = None

    def set_ground_truth(self, coco: Any) -> None:
        """Use this pycocotools ``COCO`` (the validation annotations) for evaluation."""
        self.ground_truth = coco

    def set_eval_info(self, info: Mapping[str, Any]) -> None:
        """``coco_ground_truth``: the validation annotations (data=coco); absent otherwise."""
        if "coco_ground_truth" in info:
            self.set_ground_truth(info["coco_ground_truth"])

    def batch_size(self, batch: Any) -> int:
        images, _ = batch
        return len(images)

    def training_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        images, targets = batch
        losses: dict[str, torch.Tensor] = model(images, targets)
        total = torch.stack(list(losses.values())).sum()
        return LossOutput(total, {name: value.detach() for name, value in losses.items()})

    def evaluator(self) -> CocoEvaluator:
        return CocoEvaluator(self.ground_truth, self.cfg)

    def synthetic_batch(
        self, model_cfg: ModelConfig, batch_size: int, generator: torch.Generator
    ) -> DetectionBatch:
        """Square ``model.min_size`` images from `synthetic_detection_batch`."""
        size = getattr(model_cfg, "min_size", None)
        num_classes = getattr(model_cfg, "num_classes", None)
        if size is None or num_classes is None:
            raise UserError(
                f"data=synthetic with task=detection needs a detection model; "
                f"model={model_cfg.name} is not one"
            )
        return synthetic_detection_batch(batch_size, (size, size), num_classes, generator)


def synthetic_detection_batch(
    batch_size: int, size: tuple[int, int], num_classes: int, generator: torch.Generator
) -> DetectionBatch:
    """Random ``(3, H, W)`` images with 1-3 painted rectangles each, and their targets.

    Boxes (XYXY), masks (the rectangles) and labels in ``[1, num_classes)``; image ids are drawn
    at random (distinct with overwhelming probability).
    """
    height, width = size
    images, targets = [], []
    image_id = int(torch.randint(2**30, (1,), generator=generator))
    for offset in range(batch_size):
        image = torch.rand(3, height, width, generator=generator) * 0.2
        count = int(torch.randint(1, 4, (1,), generator=generator))
        x0 = torch.randint(0, width // 2, (count, 1), generator=generator)
        y0 = torch.randint(0, height // 2, (count, 1), generator=generator)
        w = torch.randint(max(1, width // 8), max(2, width // 2), (count, 1), generator=generator)
        h = torch.randint(max(1, height // 8), max(2, height // 2), (count, 1), generator=generator)
        boxes = torch.cat([x0, y0, x0 + w, y0 + h], dim=1).to(torch.float32)
        labels = torch.randint(1, num_classes, (count,), generator=generator)
        masks = torch.zeros(count, height, width, dtype=torch.uint8)
        for k, (left, top, right, bottom) in enumerate(boxes.to(torch.int64).tolist()):
            masks[k, top:bottom, left:right] = 1
            image[:, top:bottom, left:right] = (labels[k] % 3 + 1).to(torch.float32) / 3
        images.append(image)
        targets.append(
            {"image_id": image_id + offset, "boxes": boxes, "labels": labels, "masks": masks}
        )
    return images, targets
