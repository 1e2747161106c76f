"""The brain-MRI U-Net of Buda et al. (2019), the segmentation model KAISA trained with K-FAC.

Written from the paper's description: four encoder levels whose widths double from
``init_features`` (32 → 64 → 128 → 256), a bottleneck of ``16 * init_features`` (512) channels,
four decoder levels that upsample with a 2x2 stride-2 transposed convolution and concatenate the
encoder output of the same level, and a 1x1 convolution with a sigmoid on top. Every block is two
3x3 convolutions (no bias, padding 1), each followed by BatchNorm and ReLU.

Input ``(B, in_channels, H, W)`` with H and W divisible by 16; output ``(B, out_channels, H, W)``
probabilities in [0, 1] (the sigmoid is part of the model, as in the original, so the Dice loss
and the metric consume probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kfac_train.config import ModelConfig
from kfac_train.errors import UserError
from kfac_train.models import load_local_weights
from kfac_train.registry import MODELS, BuildContext

NUM_LEVELS = 4


class DoubleConv(nn.Sequential):
    """Two (3x3 conv without bias → BatchNorm → ReLU) layers; keeps the spatial size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Buda et al.'s U-Net for FLAIR abnormality segmentation.

    Args:
        in_channels: image channels (3 for the LGG data: pre-contrast, FLAIR, post-contrast).
        out_channels: mask channels (1: tumour probability).
        init_features: width of the first encoder level; level ``i`` has
            ``init_features * 2**i`` channels and the bottleneck ``init_features * 16``.
    """

    def __init__(
        self, in_channels: int = 3, out_channels: int = 1, init_features: int = 32
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("init_features", init_features),
        ):
            if value < 1:
                raise UserError(f"UNet needs a positive {name}, got {value}")
        widths = [init_features * 2**level for level in range(NUM_LEVELS)]
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.encoders.append(DoubleConv(previous, width))
            previous = width
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = DoubleConv(widths[-1], widths[-1] * 2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(widths):
            self.upsamplers.append(nn.ConvTranspose2d(width * 2, width, kernel_size=2, stride=2))
            self.decoders.append(DoubleConv(width * 2, width))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``(B, C_in, H, W)`` images to ``(B, C_out, H, W)`` probabilities."""
        height, width = images.shape[-2:]
        divisor = 2**NUM_LEVELS
        if height % divisor or width % divisor:
            raise UserError(
                f"UNet input height and width must be divisible by {divisor}, got "
                f"{height}x{width}; resize the images (data.image_size) to a multiple of 16"
            )
        skips = []
        features = images
        for encoder in self.encoders:
            features = encoder(features)
            skips.append(features)
            features = self.pool(features)
        features = self.bottleneck(features)
        for upsample, decoder, skip in zip(
            self.upsamplers, self.decoders, reversed(skips), strict=True
        ):
            features = decoder(torch.cat([upsample(features), skip], dim=1))
        return torch.sigmoid(self.head(features))


@dataclass
class UNetConfig(ModelConfig):
    """Buda et al.'s U-Net.

    Attributes:
        in_channels, out_channels: image and mask channels (3 and 1 for the LGG data).
        init_features: width of the first level (32 in the paper; widths double per level).
        image_size: side of the square slices the model is trained on; ``data=lgg`` resizes to
            it and ``data=synthetic`` draws it (a multiple of 16).
    """

    name: str = "unet"
    baseline_optim: str = "adam"
    in_channels: int = 3
    out_channels: int = 1
    init_features: int = 32
    image_size: int = 256


@MODELS.register("unet", schema=UNetConfig)
def build_unet(cfg: UNetConfig, ctx: BuildContext) -> UNet:
    """Images (B, in_channels, S, S) → mask probabilities (B, out_channels, S, S)."""
    if cfg.image_size < 16 or cfg.image_size % 16:
        raise UserError(f"model.image_size={cfg.image_size}: must be a multiple of 16")
    model = UNet(cfg.in_channels, cfg.out_channels, cfg.init_features)
    if cfg.weights:
        load_local_weights(model, cfg.weights)
    return model
