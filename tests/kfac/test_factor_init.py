"""`kfac.factor_init`: where the running factor averages start.

`identity` (KAISA, kfac-pytorch): `F ← decay·F + (1 − decay)·F_batch` from `F = I`, so for the
first steps the factors are mostly the identity, whatever the statistics' scale. `first_batch`:
the first factor-update step's statistics replace the identity (factor decay 0 at step 0); the
average proceeds as usual from there. Reference: the dense float64 factors of the oracle.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner
from kfac_train.optim.preconditioner import factor_decay_schedule

from . import oracle


def test_identity_keeps_the_constant_decay():
    assert factor_decay_schedule(0.95, "identity") == 0.95


@pytest.mark.parametrize("init", ["identity", "first_batch"])
def test_the_first_statistics_replace_the_identity_only_with_first_batch(init: str):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    reference = nn.Linear(4, 3).double()
    reference.load_state_dict(layer.state_dict())
    pre = KFACPreconditioner(
        layer,
        factor_decay=factor_decay_schedule(0.9, init),
        factor_dtype=torch.float64,
        kl_clip=None,
        grad_scaling="mean",
    )
    expected = {"A": torch.eye(5, dtype=torch.float64), "G": torch.eye(3, dtype=torch.float64)}
    for step in range(3):
        x = torch.randn(8, 4, dtype=torch.float64) * (step + 1)
        layer.zero_grad()
        layer(x).square().sum().backward()
        pre.step()
        reference.zero_grad()
        out = reference(x)
        grads = torch.autograd.grad(out.square().sum(), out)[0]
        A, G = oracle.linear_factors(reference, oracle.LayerCapture(inputs=x, output_grads=grads))
        decay = 0.0 if (init == "first_batch" and step == 0) else 0.9
        expected = {
            "A": oracle.running_average(expected["A"], A, decay),
            "G": oracle.running_average(expected["G"], G, decay),
        }
        block = pre.blocks[next(iter(pre.blocks))]
        torch.testing.assert_close(block.A.running, expected["A"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(block.G.running, expected["G"], rtol=1e-12, atol=1e-12)
