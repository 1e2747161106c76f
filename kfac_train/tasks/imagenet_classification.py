"""``task=imagenet``: classification with the large-batch ImageNet recipes' extras.

Adds to ``task=classification`` (cross-entropy, optional label smoothing, top-k evaluation;
top-1 and top-5 by default here):

- running mixup (``mixup_alpha`` > 0) and random erasing (``random_erasing`` > 0), applied on the
  device to each training micro-batch after the input pipeline, in that order, as in Osawa et
  al.'s SP-NGD code (see :mod:`kfac_train.data.augment`); soft targets then go to the
  cross-entropy;
- weight rescaling instead of weight decay (``weight_rescaling``), run after every optimizer
  step (see :mod:`kfac_train.tasks.weight_rescaling`).

All switches default to off, so ``task=imagenet`` alone equals ``task=classification`` with
top-5; the SP-NGD recipes (``conf/recipe/resnet50_<batch>.yaml``) turn them on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kfac_train.config import ClassifierConfig
from kfac_train.data.augment import BatchRandomErasing, RunningMixup
from kfac_train.errors import UserError
from kfac_train.registry import TASKS, BuildContext
from kfac_train.tasks.base import LossOutput
from kfac_train.tasks.classification import ClassificationConfig, ClassificationTask
from kfac_train.tasks.weight_rescaling import WeightRescaler


@dataclass
class ImageNetClassificationConfig(ClassificationConfig):
    """Schema of ``task=imagenet``.

    Attributes:
        mixup_alpha: Beta(α, α) of running mixup; 0 = no mixup.
        mixup_running: mix with the previous *mixed* batch (SP-NGD) rather than the previous
            input batch.
        random_erasing: probability of erasing a rectangle per sample; 0 = off.
        random_erasing_area: (min, max) erased fraction of the image area.
        random_erasing_min_aspect: aspect h/w ~ U(min, 1), then h and w swap with prob. 1/2.
        weight_rescaling: rescale conv/linear weights to norm ≤ sqrt(2·d_out) after each step.
        weight_rescaling_only_shrink: only scale down (the authors' code) instead of both ways.
    """

    name: str = "imagenet"
    topk: list[int] = field(default_factory=lambda: [1, 5])
    mixup_alpha: float = 0.0
    mixup_running: bool = True
    random_erasing: float = 0.0
    random_erasing_area: list[float] = field(default_factory=lambda: [0.02, 0.25])
    random_erasing_min_aspect: float = 0.3
    weight_rescaling: bool = False
    weight_rescaling_only_shrink: bool = True


@TASKS.register("imagenet", schema=ImageNetClassificationConfig)
class ImageNetClassificationTask(ClassificationTask):
    """Classification + running mixup, random erasing and weight rescaling (all optional)."""

    cfg: ImageNetClassificationConfig

    def __init__(self, cfg: ImageNetClassificationConfig, ctx: BuildContext) -> None:
        super().__init__(cfg, ctx)
        self.mixup: RunningMixup | None = None
        if cfg.mixup_alpha > 0:
            model_cfg = ctx.config.model
            if not isinstance(model_cfg, ClassifierConfig):
                raise UserError(
                    f"task.mixup_alpha needs an image classifier; model={model_cfg.name} is not one"
                )
            self.mixup = RunningMixup(
                cfg.mixup_alpha, model_cfg.num_classes, running=cfg.mixup_running
            )
        self.erasing: BatchRandomErasing | None = None
        if cfg.random_erasing > 0:
            if len(cfg.random_erasing_area) != 2:
                raise UserError(
                    f"task.random_erasing_area needs [min, max], got {cfg.random_erasing_area}"
                )
            low, high = cfg.random_erasing_area
            self.erasing = BatchRandomErasing(
                p=cfg.random_erasing,
                area=(low, high),
                min_aspect=cfg.random_erasing_min_aspect,
            )
        self._rescaler: WeightRescaler | None = None
        self._rescaled_model: nn.Module | None = None

    def training_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        images, labels = batch
        if self.mixup is not None:
            images, labels = self.mixup(images, labels)
        if self.erasing is not None:
            images = self.erasing(images)
        return super().training_loss(model, (images, labels))

    def after_optimizer_step(self, model: nn.Module) -> None:
        if not self.cfg.weight_rescaling:
            return
        if self._rescaled_model is not model:
            self._rescaler = WeightRescaler(
                model, only_shrink=self.cfg.weight_rescaling_only_shrink
            )
            self._rescaled_model = model
        assert self._rescaler is not None
        self._rescaler()
