"""The U-Net follows Buda et al.'s description: widths, blocks, upsampling, skips, sigmoid."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_train.errors import UserError
from kfac_train.models.unet import UNet


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if type(m) is nn.Conv2d]


def test_encoder_widths_double_from_32_to_256_with_a_512_bottleneck():
    model = UNet()
    assert [block[0].out_channels for block in model.encoders] == [32, 64, 128, 256]
    assert model.encoders[0][0].in_channels == 3
    assert model.bottleneck[0].out_channels == 512
    assert [block[0].out_channels for block in model.decoders] == [256, 128, 64, 32]
    # the decoder sees the upsampled features concatenated with the encoder's skip output
    assert [block[0].in_channels for block in model.decoders] == [512, 256, 128, 64]
    assert model.head.kernel_size == (1, 1) and model.head.out_channels == 1


def test_every_block_is_two_3x3_conv_bn_relu_layers_and_upsampling_is_transposed_conv():
    model = UNet()
    for block in [*model.encoders, model.bottleneck, *model.decoders]:
        kinds = [type(layer) for layer in block]
        assert kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
        assert all(conv.kernel_size == (3, 3) and conv.padding == (1, 1) for conv in _convs(block))
    for upsample in model.upsamplers:
        assert isinstance(upsample, nn.ConvTranspose2d)
        assert upsample.kernel_size == (2, 2) and upsample.stride == (2, 2)
    assert len(_convs(model)) == 2 * 9 + 1  # 9 double-conv blocks + the 1x1 head


def test_output_is_a_probability_map_of_the_input_size():
    model = UNet(init_features=4).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 48, 32))
    assert out.shape == (2, 1, 48, 32)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_input_sizes_not_divisible_by_16_are_rejected_with_the_setting_to_change():
    with pytest.raises(UserError, match="divisible by 16.*image_size"):
        UNet(init_features=4)(torch.randn(1, 3, 40, 32))
