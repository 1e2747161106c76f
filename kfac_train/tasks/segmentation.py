"""Binary segmentation of volumes slice by slice (the LGG U-Net): Dice loss, per-volume Dice.

Batches are ``(images, masks, volumes, slices)``: images ``(B, C, S, S)`` float, masks
``(B, 1, S, S)`` float in {0, 1}, volumes ``(B,)`` int64, the index of each slice's volume in the
evaluation set, and slices ``(B,)`` int64, the slice's position in its volume. The model returns
probabilities ``(B, 1, S, S)`` (its own sigmoid).

Training loss: soft Dice loss over the micro-batch (kfac_train/tasks/dice.py). Evaluation:
``dice``, Buda et al.'s metric, the one KAISA's U-Net target (0.910) refers to: the mean over
volumes of each volume's DSC after the prediction is reduced to its largest 3-D connected
component; ``dice_all_components``, the same without that reduction (every predicted pixel).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kfac_train.config import ModelConfig, TaskConfig
from kfac_train.errors import UserError
from kfac_train.registry import TASKS, BuildContext
from kfac_train.tasks.base import Evaluator, LossOutput, Task
from kfac_train.tasks.dice import LargestComponentDice, VolumeDice, dice_loss

# volumes that data=synthetic batches are spread over (real data sets the true count)
SYNTHETIC_VOLUMES = 4

SegmentationBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class SegmentationConfig(TaskConfig):
    """Attributes:
    threshold: a pixel is predicted foreground above this probability.
    smooth: the Dice loss smoothing constant.
    """

    name: str = "segmentation"
    threshold: float = 0.5
    smooth: float = 1.0


class DiceEvaluator(Evaluator):
    """Mean per-volume DSC, largest component only (``dice``) and all of it
    (``dice_all_components``), over every rank's slices."""

    def __init__(self, num_volumes: int, threshold: float, device: torch.device) -> None:
        self.all_components = VolumeDice(num_volumes, threshold=threshold, device=device)
        self.largest = LargestComponentDice(num_volumes, threshold=threshold)

    def update(self, model: nn.Module, batch: Any) -> None:
        images, masks, volumes, slices = batch
        probabilities = model(images).float()
        self.all_components.update(probabilities, masks, volumes)
        self.largest.update(probabilities, masks, volumes, slices)

    def compute(self) -> dict[str, float]:
        return {
            "dice": self.largest.compute(),
            "dice_all_components": self.all_components.compute(),
        }


@TASKS.register("segmentation", schema=SegmentationConfig)
class SegmentationTask(Task):
    """Dice-loss training and per-volume Dice evaluation (module doc)."""

    cfg: SegmentationConfig

    def __init__(self, cfg: SegmentationConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.num_eval_volumes = SYNTHETIC_VOLUMES

    def set_eval_volumes(self, num_volumes: int) -> None:
        """Number of volumes in the evaluation set (volume indices are 0..num_volumes-1)."""
        self.num_eval_volumes = num_volumes

    def set_eval_info(self, info: Mapping[str, Any]) -> None:
        """``num_eval_volumes``: volumes in the evaluation set (data=lgg); absent otherwise."""
        if "num_eval_volumes" in info:
            self.set_eval_volumes(int(info["num_eval_volumes"]))

    def training_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        images, masks = batch[:2]
        probabilities = model(images).float()
        return LossOutput(dice_loss(probabilities, masks, smooth=self.cfg.smooth))

    def evaluator(self) -> DiceEvaluator:
        return DiceEvaluator(self.num_eval_volumes, self.cfg.threshold, self.ctx.device)

    def synthetic_batch(
        self, model_cfg: ModelConfig, batch_size: int, generator: torch.Generator
    ) -> SegmentationBatch:
        """``model.image_size`` slices from `synthetic_segmentation_batch`."""
        size = getattr(model_cfg, "image_size", None)
        channels = getattr(model_cfg, "in_channels", None)
        if size is None or channels is None:
            raise UserError(
                f"data=synthetic with task=segmentation needs an image model; "
                f"model={model_cfg.name} is not one"
            )
        return synthetic_segmentation_batch(batch_size, channels, size, generator)


def synthetic_segmentation_batch(
    batch_size: int, channels: int, size: int, generator: torch.Generator
) -> SegmentationBatch:
    """Noise images with a brighter random square each, its mask, random volume ids (in
    ``[0, SYNTHETIC_VOLUMES)``) and slice positions ``0..B-1``."""
    images = torch.randn(batch_size, channels, size, size, generator=generator)
    masks = torch.zeros(batch_size, 1, size, size)
    corners = torch.randint(0, size // 2, (batch_size, 2), generator=generator).tolist()
    for k, (x, y) in enumerate(corners):
        masks[k, :, y : y + size // 4, x : x + size // 4] = 1.0
    images += 2.0 * masks
    volumes = torch.randint(SYNTHETIC_VOLUMES, (batch_size,), generator=generator)
    return images, masks, volumes, torch.arange(batch_size)
