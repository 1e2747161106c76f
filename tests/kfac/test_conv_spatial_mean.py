"""Ba et al.'s cheaper convolution factor (``conv_factor="spatial_mean"``) against float64 algebra.

Reference: ``ā_n = [mean over output positions of the im2col patches, 1] / S`` per example,
``A = Σ_n ā_n ā_nᵀ / B``; ``G`` exactly as in the default convention; the update is the dense
``(A ⊗ G + λI)⁻¹ vec(∇)``.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_train.kfac import KFACPreconditioner as _KFACPreconditioner

# Setup: these expectations are built in kfac-math.md's "mean" convention (the library default
# before issue 10); the per-example default is tested in test_convention.py.
KFACPreconditioner = partial(_KFACPreconditioner, grad_scaling="mean")

DAMPING = 1e-4


@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(2, 3, (2, 3), stride=2, padding=1, dilation=(1, 2)),
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False),
    ],
)
def test_spatial_mean_factor_update_matches_the_dense_solve(conv) -> None:
    torch.manual_seed(0)
    layer = conv().double()
    x = torch.randn(5, 2, 7, 8, dtype=torch.float64)
    pre = KFACPreconditioner(
        layer,
        conv_factor="spatial_mean",
        factor_decay=0.0,
        damping=DAMPING,
        kl_clip=None,
        factor_dtype=torch.float64,
        inv_dtype=torch.float64,
    )
    out = layer(x)
    out.retain_grad()
    (out.square().mean() + out.sum() * 0.1).backward()

    padded = F.pad(
        x,
        layer._reversed_padding_repeated_twice,
        mode=layer.padding_mode if layer.padding_mode != "zeros" else "constant",
    )
    patches = F.unfold(padded, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
    spatial = patches.shape[-1]
    mean = patches.mean(dim=2)  # (B, C·kh·kw)
    if layer.bias is not None:
        mean = torch.cat([mean, torch.ones(5, 1, dtype=torch.float64)], dim=1)
    a = mean / spatial
    A = a.T @ a / 5
    g = out.grad.permute(0, 2, 3, 1).reshape(-1, 3) / spatial
    G = g.T @ g / g.shape[0]
    grad = layer.weight.grad.reshape(3, -1)
    if layer.bias is not None:
        grad = torch.cat([grad, layer.bias.grad[:, None]], dim=1)
    eye = torch.eye(A.shape[0] * 3, dtype=torch.float64)
    expected = torch.linalg.solve(torch.kron(A, G) + DAMPING * eye, grad.T.reshape(-1))
    expected = expected.reshape(grad.shape[1], 3).T

    pre.step()
    got = layer.weight.grad.reshape(3, -1)
    if layer.bias is not None:
        got = torch.cat([got, layer.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_spatial_mean_is_exact_for_spatially_constant_patches() -> None:
    """With a 1×1 conv on a spatially constant input both conventions give the same A."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 1, 1, dtype=torch.float64).expand(4, 3, 5, 5).contiguous()
    factors = {}
    for mode in ("patches", "spatial_mean"):
        layer = nn.Conv2d(3, 2, 1).double()
        pre = KFACPreconditioner(
            layer,
            conv_factor=mode,
            factor_decay=0.0,
            kl_clip=None,
            factor_dtype=torch.float64,
            inv_dtype=torch.float64,
        )
        layer(x).sum().backward()
        pre.step()
        factors[mode] = pre.state_dict()["layers"]["<root>"]["A"]
    # exact: Σ_t p pᵀ / S³ over S identical rows equals the spatial-mean form p̄ p̄ᵀ / S²
    torch.testing.assert_close(factors["patches"], factors["spatial_mean"], rtol=1e-12, atol=0)
