"""Factored (π) Tikhonov damping against a dense float64 reference.

With ``factored_damping=True`` both compute methods must apply
``vec(V) = ((A + π√λ·I) ⊗ (G + (√λ/π)·I))⁻¹ vec(∇)`` with ``π = sqrt((tr A / a) / (tr G / g))``
from the running factors (Ba et al. Eq. 3, SP-NGD Eq. 12; the running averages start from the
identity, so the trace of ``G`` stays near its identity share). The layer's input is scaled so
that ``tr A / a`` is over 10³ times ``tr G / g`` (π ≈ 50): swapping π and 1/π, or dropping π,
moves the damping between the factors and changes the result by far more than the tolerance
(asserted below, so the test cannot pass by accident).
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner as _KFACPreconditioner

from . import oracle

# Setup: expectations built in kfac-math.md's "mean" convention (the library default before
# issue 10); the per-example default is tested in test_convention.py.
KFACPreconditioner = partial(_KFACPreconditioner, grad_scaling="mean")

DAMPING = 1e-2
DECAY = 0.5


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            30.0 * torch.randn(8, 5, dtype=torch.float64, generator=generator),
            torch.randint(0, 3, (8,), generator=generator),
        )
        for _ in range(2)
    ]


def factored_reference(A: torch.Tensor, G: torch.Tensor, grad: torch.Tensor, pi: float):
    """``((A + π√λ I) ⊗ (G + √λ/π I))⁻¹ vec(grad)``, densely."""
    root = math.sqrt(DAMPING)
    damped_A = A + pi * root * torch.eye(A.shape[0], dtype=torch.float64)
    damped_G = G + root / pi * torch.eye(G.shape[0], dtype=torch.float64)
    solved = torch.linalg.solve(torch.kron(damped_A, damped_G), oracle.vec(grad))
    return oracle.unvec(solved, G.shape[0])


def _running_factors_and_last_grad(model: nn.Sequential):
    """The running ``A``, ``G`` after both batches (from the identity, decay ``DECAY``) and the
    gradient of the last batch, all built by the oracle on a hook-free copy."""
    reference = _model()
    reference.load_state_dict(model.state_dict())
    A = G = None
    for x, y in _batches():
        reference.zero_grad()
        seen = oracle.capture_layers(
            reference, ["0"], lambda m, x=x, y=y: nn.functional.cross_entropy(m(x), y).backward()
        )
        batch_A, batch_G = oracle.linear_factors(reference[0], seen["0"])
        A = oracle.running_average(A, batch_A, DECAY)
        G = oracle.running_average(G, batch_G, DECAY)
    return A, G, oracle.gradient_matrix(reference[0])


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_factored_damping_splits_lambda_with_pi_from_the_traces(method: str) -> None:
    model = _model()
    A, G, grad = _running_factors_and_last_grad(model)
    pi = math.sqrt((float(A.trace()) / A.shape[0]) / (float(G.trace()) / G.shape[0]))
    assert pi > 10  # very different traces: the split is far from symmetric
    expected = factored_reference(A, G, grad, pi)
    swapped = factored_reference(A, G, grad, 1.0 / pi)
    unsplit = factored_reference(A, G, grad, 1.0)
    for wrong in (swapped, unsplit):
        assert oracle.relative_error(wrong, expected) > 1e-2

    pre = KFACPreconditioner(
        model,
        compute_method=method,
        factored_damping=True,
        damping=DAMPING,
        factor_decay=DECAY,
        kl_clip=None,
        factor_dtype=torch.float64,
        inv_dtype=torch.float64,
    )
    for x, y in _batches():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
    got = oracle.gradient_matrix(model[0])
    assert oracle.relative_error(got, expected) < 1e-9
