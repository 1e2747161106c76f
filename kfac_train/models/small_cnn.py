"""A small convolutional network for tiny grayscale images (scikit-learn's 8x8 digits)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from kfac_train.config import ClassifierConfig
from kfac_train.errors import UserError
from kfac_train.models import load_local_weights
from kfac_train.registry import MODELS, BuildContext


@dataclass
class SmallCNNConfig(ClassifierConfig):
    """3x3 conv stages (two conv-BN-ReLU each, then 2x2 max-pool) and a two-layer classifier.

    Attributes:
        channels: output channels of each stage (the image size must be divisible by
            2 ** number of stages).
        hidden: width of the hidden fully connected layer.
        batch_norm: BatchNorm after every convolution.
        dropout: dropout before the last layer.
    """

    name: str = "small_cnn"
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 8
    channels: list[int] = field(default_factory=lambda: [16, 32])
    hidden: int = 64
    batch_norm: bool = True
    dropout: float = 0.0


class SmallCNN(nn.Module):
    """Input (B, in_channels, S, S), S divisible by 4 → logits (B, num_classes)."""

    def __init__(self, cfg: SmallCNNConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = cfg.in_channels
        for out_channels in cfg.channels:
            for conv_in in (in_channels, out_channels):
                layers.append(nn.Conv2d(conv_in, out_channels, 3, padding=1))
                if cfg.batch_norm:
                    layers.append(nn.BatchNorm2d(out_channels))
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.MaxPool2d(2))
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        spatial = cfg.image_size // 2 ** len(cfg.channels)
        if spatial == 0 or cfg.image_size % 2 ** len(cfg.channels):
            raise UserError(
                f"model.image_size={cfg.image_size} is not divisible by 2 ** "
                f"{len(cfg.channels)} (one 2x2 pooling per entry of model.channels)"
            )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * spatial * spatial, cfg.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.num_classes),
        )

    def forward(self, x):  # noqa: ANN001, ANN201 - (B, C, S, S) -> (B, classes)
        return self.classifier(self.features(x))


@MODELS.register("small_cnn", schema=SmallCNNConfig)
def build_small_cnn(cfg: SmallCNNConfig, ctx: BuildContext) -> nn.Module:
    model = SmallCNN(cfg)
    if cfg.weights:
        load_local_weights(model, cfg.weights)
    return model
