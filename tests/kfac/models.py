"""The small models the K-FAC tests share.

:class:`ConvHead` is the test CNN: one 3×3 convolution, an activation, a flatten and a linear
head, so one model exercises both factor conventions (conv patches with ``1/S`` scaling, linear
rows). Parameters are created conv first, then head, so a seed fixes them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class ConvHead(nn.Module):
    """conv (``in_channels → channels``, 3×3) → activation → flatten → linear (→ ``classes``).

    Input ``(B, in_channels, image, image)``; output ``(B, classes)``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        *,
        image: int,
        classes: int,
        stride: int = 1,
        padding: int = 0,
        activation: Callable[[torch.Tensor], torch.Tensor] = torch.relu,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=padding)
        side = (image + 2 * padding - 3) // stride + 1
        self.head = nn.Linear(channels * side * side, classes)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.activation(self.conv(x)).flatten(1))


def small_cnn() -> ConvHead:
    """conv (2→3, 3x3, padding 1) → relu → flatten → linear (3·5·5 → 4), for 5×5 inputs."""
    return ConvHead(2, 3, image=5, classes=4, padding=1, activation=torch.relu)


def strided_cnn() -> ConvHead:
    """conv (3→4, 3x3, stride 2) → tanh → flatten → linear (4·3·3 → 3), for 7×7 inputs."""
    return ConvHead(3, 4, image=7, classes=3, stride=2, activation=torch.tanh)
