"""task=imagenet: mixup/erasing in the training loss, weight rescaling after optimizer steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kfac_train.config import ClassifierConfig, ModelConfig, RunConfig
from kfac_train.data.imagenet import ImageNetDataConfig
from kfac_train.distributed import DistInfo
from kfac_train.errors import UserError
from kfac_train.registry import BuildContext
from kfac_train.tasks.imagenet_classification import (
    ImageNetClassificationConfig,
    ImageNetClassificationTask,
)
from kfac_train.tasks.weight_rescaling import WeightRescaler

NUM_CLASSES = 4


def make_task(model_cfg: object | None = None, **settings: object) -> ImageNetClassificationTask:
    cfg = ImageNetClassificationConfig(**settings)  # type: ignore[arg-type]
    model = model_cfg or ClassifierConfig(name="tiny", num_classes=NUM_CLASSES, image_size=8)
    config = RunConfig(model=model, data=ImageNetDataConfig(), task=cfg)  # type: ignore[arg-type]
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    ctx = BuildContext(config=config, dist=dist, micro_batch=8, accumulation_steps=1)
    return ImageNetClassificationTask(cfg, ctx)


class Recorder(nn.Module):
    """Logits from a linear layer; remembers the last input batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.norm = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 6 * 6, NUM_CLASSES)
        self.seen: torch.Tensor | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen = images
        return self.fc(self.norm(self.conv(images)).flatten(1))


def batch(value: float, label: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((8, 3, 8, 8), value), torch.full((8,), label)


def test_default_task_is_plain_classification_with_top5() -> None:
    task = make_task()
    model = Recorder()
    images, labels = batch(1.0, 2)
    out = task.training_loss(model, (images, labels))
    assert model.seen is images
    expected = nn.functional.cross_entropy(model(images), labels)
    assert torch.allclose(out.loss, expected)
    assert list(task.cfg.topk) == [1, 5]


def test_mixup_feeds_mixed_images_and_soft_targets_to_the_loss() -> None:
    torch.manual_seed(0)
    task = make_task(mixup_alpha=1.0)
    model = Recorder()
    task.training_loss(model, batch(0.0, 0))
    second = task.training_loss(model, batch(1.0, 1))
    assert model.seen is not None
    lam = model.seen[:, 0, 0, 0]
    assert (lam >= 0.5).all() and (lam < 1).any()
    logits = model(model.seen)
    soft = torch.stack([1 - lam, lam, torch.zeros(8), torch.zeros(8)], dim=1)
    assert torch.allclose(second.loss, nn.functional.cross_entropy(logits, soft), atol=1e-6)


def test_random_erasing_zeroes_part_of_every_image_when_p_is_one() -> None:
    task = make_task(random_erasing=1.0)
    model = Recorder()
    task.training_loss(model, batch(1.0, 1))
    assert model.seen is not None
    assert ((model.seen == 0).all(dim=1).flatten(1).any(dim=1)).all()


def test_weight_rescaling_runs_after_each_optimizer_step_when_enabled() -> None:
    model = Recorder()
    with torch.no_grad():
        model.conv.weight.mul_(50.0)
    bn_weight = model.norm.weight.detach().clone()
    make_task().after_optimizer_step(model)
    assert model.conv.weight.detach().norm() > 10  # off by default
    make_task(weight_rescaling=True).after_optimizer_step(model)
    assert math.isclose(float(model.conv.weight.detach().norm()), math.sqrt(2 * 2), rel_tol=1e-5)
    assert torch.equal(model.norm.weight, bn_weight)


def test_mixup_needs_a_classifier_model() -> None:
    with pytest.raises(UserError, match="mixup_alpha needs an image classifier"):
        make_task(model_cfg=ModelConfig(name="bert"), mixup_alpha=0.4)


def test_rescaler_shrinks_large_weights_to_sqrt_2_dout_and_leaves_small_ones() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():
        model[0].weight.mul_(100.0)
        model[3].weight.mul_(1e-3)
    small = model[3].weight.detach().clone()
    WeightRescaler(model)()
    assert math.isclose(float(model[0].weight.detach().norm()), math.sqrt(2 * 4), rel_tol=1e-5)
    assert torch.equal(model[3].weight, small)
    WeightRescaler(model, only_shrink=False)()
    assert math.isclose(float(model[3].weight.detach().norm()), math.sqrt(2 * 5), rel_tol=1e-5)


def test_rescaler_attached_to_an_optimizer_runs_after_its_step() -> None:
    model = nn.Linear(10, 3)
    with torch.no_grad():
        model.weight.fill_(5.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    WeightRescaler(model).attach(optimizer)
    model(torch.ones(1, 10)).sum().backward()
    optimizer.step()
    assert math.isclose(float(model.weight.detach().norm()), math.sqrt(6), rel_tol=1e-5)
