"""Image classification: cross-entropy on logits, top-k accuracy and mean loss on evaluation.

Batches are ``(images (B, C, H, W) float, labels (B,) int64)``; labels may also be class
probabilities (B, num_classes) (mixup-style soft targets) for training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kfac_train.config import ClassifierConfig, ModelConfig, TaskConfig
from kfac_train.errors import UserError
from kfac_train.registry import TASKS, BuildContext
from kfac_train.tasks.base import LossOutput, SumEvaluator, Task, sample_categorical


@dataclass
class ClassificationConfig(TaskConfig):
    """`label_smoothing`: as in torch's cross_entropy; `topk`: accuracies reported as top<k>."""

    name: str = "classification"
    label_smoothing: float = 0.0
    topk: list[int] = field(default_factory=lambda: [1])


class ClassificationEvaluator(SumEvaluator):
    """Top-k accuracies (``top1``, ``top5``, ...) and mean cross-entropy (``loss``)."""

    def __init__(self, topk: list[int]) -> None:
        ratios = {f"top{k}": (f"correct{k}", "count") for k in topk}
        ratios["loss"] = ("loss_sum", "count")
        super().__init__(ratios)
        self.topk = topk

    def update(self, model: nn.Module, batch: Any) -> None:
        images, labels = batch
        logits = model(images).float()
        self.add("loss_sum", F.cross_entropy(logits, labels, reduction="sum"))
        self.add("count", torch.tensor(float(labels.shape[0]), device=labels.device))
        top = logits.topk(min(max(self.topk), logits.shape[1]), dim=1).indices
        hits = top == labels.unsqueeze(1)
        for k in self.topk:
            self.add(f"correct{k}", hits[:, :k].any(dim=1).sum())


@TASKS.register("classification", schema=ClassificationConfig)
class ClassificationTask(Task):
    cfg: ClassificationConfig

    def __init__(self, cfg: ClassificationConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.channels_last = ctx.config.trainer.channels_last

    def move_batch(self, batch: Any, device: torch.device) -> Any:
        images, labels = batch
        images = images.to(device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels.to(device, non_blocking=True)

    def training_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        images, labels = batch
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        logs = {}
        if labels.dim() == 1:
            logs["top1"] = (logits.detach().argmax(dim=1) == labels).float().mean()
        return LossOutput(loss, logs, output=logits)

    def sample_fisher_loss(self, output: Any, batch: Any) -> torch.Tensor:
        """Cross-entropy (no smoothing) of labels drawn from ``softmax(logits)``."""
        return F.cross_entropy(output, sample_categorical(output))

    def evaluator(self) -> ClassificationEvaluator:
        return ClassificationEvaluator(list(self.cfg.topk))

    def synthetic_batch(
        self, model_cfg: ModelConfig, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Standard-normal images (B, C, S, S) and uniform labels, shaped by `model_cfg`."""
        if not isinstance(model_cfg, ClassifierConfig):
            raise UserError(
                f"data=synthetic with task=classification needs an image classifier; "
                f"model={model_cfg.name} is not one"
            )
        size = model_cfg.image_size
        images = torch.randn(batch_size, model_cfg.in_channels, size, size, generator=generator)
        labels = torch.randint(model_cfg.num_classes, (batch_size,), generator=generator)
        return images, labels
