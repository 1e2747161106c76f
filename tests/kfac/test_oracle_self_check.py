"""The dense oracle itself follows kfac-math.md (checked against autograd and closed forms).

These tests do not touch the library: they make sure the reference the other K-FAC tests
trust is right, so a disagreement points at the library and not at the oracle.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from . import oracle

CONV_LAYERS = {
    "pad-stride-dilation-2x3": lambda: nn.Conv2d(
        3, 4, kernel_size=(2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)
    ),
    "reflect-no-bias": lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", bias=False),
    "same-even-kernel": lambda: nn.Conv2d(2, 3, kernel_size=(2, 3), padding="same"),
    "circular-stride": lambda: nn.Conv2d(2, 2, 3, stride=2, padding=2, padding_mode="circular"),
}


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("name", sorted(CONV_LAYERS))
def test_conv_patches_reproduce_the_autograd_weight_gradient(name: str) -> None:
    """Σ_rows g·[patch, 1] must equal [dW, db]: the patch layout and padding are right."""
    torch.manual_seed(0)
    conv = CONV_LAYERS[name]().double()
    inputs = torch.randn(2, conv.in_channels, 7, 8, dtype=torch.float64)
    output = conv(inputs)
    output_grads = torch.randn_like(output)
    output.backward(output_grads)

    patches = oracle.conv2d_patches(conv, inputs)
    rows = patches.reshape(-1, patches.shape[-1])
    if conv.bias is not None:
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], dim=1)
    g = output_grads.permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    assert patches.shape[1] == output.shape[2] * output.shape[3]
    torch.testing.assert_close(g.T @ rows, oracle.gradient_matrix(conv), rtol=1e-12, atol=1e-12)


def test_linear_rows_reproduce_the_autograd_gradient_for_3d_inputs() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    inputs = torch.randn(2, 4, 5, dtype=torch.float64)
    output = layer(inputs)
    output_grads = torch.randn_like(output)
    output.backward(output_grads)

    rows = torch.cat([inputs.reshape(-1, 5), torch.ones(8, 1, dtype=torch.float64)], dim=1)
    g = output_grads.reshape(-1, 3)
    torch.testing.assert_close(g.T @ rows, oracle.gradient_matrix(layer), rtol=1e-12, atol=1e-12)


def _random_spd(size: int, generator: torch.Generator) -> torch.Tensor:
    root = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return root @ root.T / size


def test_kronecker_solves_equal_the_factored_formulas_of_kfac_math() -> None:
    """vec stacks columns: (A ⊗ G) vec(X) = vec(G X Aᵀ), so the Kronecker solves equal
    V = Q_G[(Q_Gᵀ∇Q_A)/(d_G d_Aᵀ + λ)]Q_Aᵀ and V = (G + λI)⁻¹∇(A + λI)⁻¹."""
    generator = torch.Generator().manual_seed(0)
    A, G = _random_spd(5, generator), _random_spd(3, generator)
    grad = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    damping = 0.3

    d_A, Q_A = torch.linalg.eigh(A)
    d_G, Q_G = torch.linalg.eigh(G)
    eigen = Q_G @ ((Q_G.T @ grad @ Q_A) / (torch.outer(d_G, d_A) + damping)) @ Q_A.T
    inverse = (
        torch.linalg.inv(G + damping * torch.eye(3, dtype=torch.float64))
        @ grad
        @ torch.linalg.inv(A + damping * torch.eye(5, dtype=torch.float64))
    )
    torch.testing.assert_close(oracle.eigen_preconditioned(A, G, grad, damping), eigen)
    torch.testing.assert_close(oracle.inverse_preconditioned(A, G, grad, damping), inverse)
    torch.testing.assert_close(oracle.vec(G @ grad @ A.T), torch.kron(A, G) @ oracle.vec(grad))


def test_kl_clip_scale_follows_the_formula() -> None:
    v = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    g = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    # Σ lr²⟨V,∇⟩ = 0.25 · 1 = 0.25 → ν = sqrt(0.01 / 0.25) = 0.2
    assert oracle.kl_clip_scale([(v, g)], lr=0.5, kl_clip=0.01) == pytest.approx(0.2)
    assert oracle.kl_clip_scale([(v, g)], lr=0.5, kl_clip=10.0) == 1.0
    assert oracle.kl_clip_scale([(v, g)], lr=0.5, kl_clip=None) == 1.0
    assert oracle.kl_clip_scale([(v, torch.zeros_like(g))], lr=0.5, kl_clip=0.01) == 1.0
