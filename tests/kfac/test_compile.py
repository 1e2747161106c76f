"""K-FAC with a `torch.compile`d model (inductor on CPU) gives the eager updates.

The preconditioner hooks the modules; compiling the model traces the hooks' cheap guard (is this a
factor-update step?) into the graph, and runs the statistics collection outside it
(`torch.compiler.disable`). So steps that do not update factors run one graph without breaks, and
factor-update steps break once between consecutive registered layers.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_train.kfac import KFACPreconditioner

STEPS = 6
FACTOR_UPDATE_STEPS = 2  # statistics at steps 0, 2, 4
INV_UPDATE_STEPS = 3  # second-order data at steps 0 and 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).double()


def _train(compiled: bool, kfac: bool = True) -> list[list[torch.Tensor]]:
    """Parameters after each of `STEPS` SGD steps (float64, K-FAC preconditioned if `kfac`)."""
    torch._dynamo.reset()
    model = _model()
    pre = KFACPreconditioner(
        model,
        factor_update_steps=FACTOR_UPDATE_STEPS,
        inv_update_steps=INV_UPDATE_STEPS,
        damping=0.01,
        factor_dtype=torch.float64,
        inv_dtype=torch.float64,
    )
    if not kfac:
        pre.remove_hooks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    forward = torch.compile(model, backend="inductor") if compiled else model
    generator = torch.Generator().manual_seed(1)
    history = []
    for _ in range(STEPS):
        x = torch.randn(16, 1, 4, 4, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 3, (16,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(forward(x), y).backward()
        if kfac:
            pre.step()
        optimizer.step()
        history.append([p.detach().clone() for p in model.parameters()])
    return history


def test_compiled_model_gives_the_eager_kfac_updates_over_factor_and_inverse_steps():
    eager = _train(compiled=False)
    compiled = _train(compiled=True)
    plain_sgd = _train(compiled=False, kfac=False)
    for step, (want, got) in enumerate(zip(eager, compiled, strict=True)):
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"step {step}")
    # the comparison can fail: K-FAC moves the parameters elsewhere than plain SGD
    assert not torch.allclose(eager[-1][0], plain_sgd[-1][0], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("collecting", [True, False])
def test_graph_breaks_only_between_layers_on_factor_update_steps(collecting: bool):
    model = _model()
    pre = KFACPreconditioner(model, factor_update_steps=2)
    pre.capture.collecting = collecting  # step 0 collects; what steps 1, 3, ... look like otherwise
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(4, 1, 4, 4, dtype=torch.float64))
    expected = len(pre.layer_names) - 1 if collecting else 0
    assert explained.graph_break_count == expected
    if collecting:  # the statistics were collected around the breaks
        assert all(layer.A.batch_count == 1 for layer in pre.layers.values())
