"""CIFAR-style ResNets (He et al. 2016, §4.2): 3 stages of n basic blocks, depth 6n + 2.

Written here because torchvision ships only the ImageNet variants. Projection shortcuts
(1x1 conv + BN) where the shape changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kfac_train.config import ClassifierConfig
from kfac_train.errors import UserError
from kfac_train.models import load_local_weights
from kfac_train.registry import MODELS, BuildContext


@dataclass
class ResNet20Config(ClassifierConfig):
    """`depth` = 6n + 2 (20, 32, 44, 56, 110); `width` = channels of the first stage."""

    name: str = "resnet20"
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    depth: int = 20
    width: int = 16


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; (B, C_in, H, W) → (B, C_out, H/s, W/s)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Input (B, in_channels, H, W) → logits (B, num_classes)."""

    def __init__(self, cfg: ResNet20Config) -> None:
        super().__init__()
        if (cfg.depth - 2) % 6 != 0 or cfg.depth < 8:
            raise UserError(f"model.depth={cfg.depth}: a CIFAR ResNet needs depth = 6n + 2")
        blocks_per_stage = (cfg.depth - 2) // 6
        widths = [cfg.width, 2 * cfg.width, 4 * cfg.width]
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_channels = widths[0]
        for index, width in enumerate(widths):
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                stages.append(BasicBlock(in_channels, width, stride))
                in_channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, cfg.num_classes)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


@MODELS.register("resnet20", schema=ResNet20Config)
def build_resnet20(cfg: ResNet20Config, ctx: BuildContext) -> nn.Module:
    model = CifarResNet(cfg)
    if cfg.weights:
        load_local_weights(model, cfg.weights)
    return model
