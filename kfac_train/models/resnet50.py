"""torchvision's ResNet-50 (v1.5: stride in the 3x3 conv), never with downloaded weights."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from kfac_train.config import ClassifierConfig
from kfac_train.models import load_local_weights
from kfac_train.registry import MODELS, BuildContext


@dataclass
class ResNet50Config(ClassifierConfig):
    """`zero_init_residual`: start each block's last BN at zero (Goyal et al. large-batch trick)."""

    name: str = "resnet50"
    num_classes: int = 1000
    in_channels: int = 3
    image_size: int = 224
    zero_init_residual: bool = False


@MODELS.register("resnet50", schema=ResNet50Config)
def build_resnet50(cfg: ResNet50Config, ctx: BuildContext) -> nn.Module:
    """Input (B, 3, H, W) → logits (B, num_classes)."""
    from torchvision.models import resnet50

    model = resnet50(
        weights=None, num_classes=cfg.num_classes, zero_init_residual=cfg.zero_init_residual
    )
    if cfg.in_channels != 3:
        model.conv1 = nn.Conv2d(cfg.in_channels, 64, 7, 2, 3, bias=False)
    if cfg.weights:
        load_local_weights(model, cfg.weights)
    return model
