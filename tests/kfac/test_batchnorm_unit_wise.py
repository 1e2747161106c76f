"""SP-NGD's unit-wise BatchNorm preconditioning against a dense float64 reference.

For channel c the Fisher block of (γ_c, β_c) is mean_n[u_n u_nᵀ] with per-example gradients
u_n = (Σ_s g·x̂, Σ_s g) taken from the output gradient g of the (mean-reduced) loss and the
batch-normalised input x̂. The reference forms the whole 2C×2C block-diagonal matrix and solves.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner

DAMPING = 1e-3


def _capture(model: nn.Module, bn: nn.BatchNorm2d, x: torch.Tensor, y: torch.Tensor):
    """Input and output gradient of ``bn`` in one training step."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output):
        seen["x"] = inputs[0].detach()
        output.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    handle = bn.register_forward_hook(hook)
    nn.functional.cross_entropy(model(x), y).backward()
    handle.remove()
    return seen["x"], seen["g"]


def _reference(bn: nn.BatchNorm2d, x: torch.Tensor, g: torch.Tensor, scale: float):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + bn.eps)
    g = g * scale
    per_example = torch.stack([(g * x_hat).sum(dim=(2, 3)), g.sum(dim=(2, 3))], dim=2)  # (B, C, 2)
    channels = bn.num_features
    fisher = torch.zeros(2 * channels, 2 * channels, dtype=torch.float64)
    for c in range(channels):
        u = per_example[:, c, :]
        fisher[2 * c : 2 * c + 2, 2 * c : 2 * c + 2] = u.T @ u / u.shape[0]
    grad = torch.stack([bn.weight.grad, bn.bias.grad], dim=1).reshape(-1)  # (γ_0, β_0, γ_1, ...)
    solved = torch.linalg.solve(
        fisher + DAMPING * torch.eye(2 * channels, dtype=torch.float64), grad
    )
    return per_example, solved.reshape(channels, 2)


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).double()


@pytest.mark.parametrize("grad_scaling", ["mean", "per_example"])
def test_batchnorm_update_matches_the_dense_block_diagonal_solve(grad_scaling: str) -> None:
    model, reference = _model(), _model()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    pre = KFACPreconditioner(
        model,
        batchnorm="unit_wise",
        factor_decay=0.0,
        damping=DAMPING,
        kl_clip=None,
        grad_scaling=grad_scaling,
        factor_dtype=torch.float64,
        inv_dtype=torch.float64,
        skip_layers=["Conv2d", "Linear"],
    )
    assert list(pre.batchnorm_layers) == ["1"] and not pre.layers
    bn_x, bn_g = _capture(reference, reference[1], x, y)
    per_example, expected = _reference(
        reference[1], bn_x, bn_g, 6.0 if grad_scaling == "per_example" else 1.0
    )
    # the per-example gradients sum to the batch gradient (scaled like g)
    scale = 6.0 if grad_scaling == "per_example" else 1.0
    torch.testing.assert_close(per_example[:, :, 0].sum(0), reference[1].weight.grad * scale)

    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    got = torch.stack([model[1].weight.grad, model[1].bias.grad], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert pre.memory_bytes()["factors"] == 4 * 3 * 8


def test_batchnorm_is_left_alone_by_default_and_in_eval_mode() -> None:
    model = _model()
    assert not KFACPreconditioner(model).batchnorm_layers
    pre = KFACPreconditioner(model, batchnorm="unit_wise")
    before = pre.batchnorm_layers["1"].running.clone()
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    model.train()
    nn.functional.cross_entropy(
        model(torch.randn(2, 3, 5, 5, dtype=torch.float64)), torch.tensor([0, 1])
    ).backward()
    model.eval()
    model(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert torch.equal(pre.batchnorm_layers["1"].running, before)  # nothing folded before step()
    pre.step()
    assert not torch.equal(pre.batchnorm_layers["1"].running, before)


def test_batchnorm_state_round_trip_continues_identically() -> None:
    settings = dict(
        batchnorm="unit_wise",
        factor_update_steps=2,
        inv_update_steps=3,
        factor_dtype=torch.float64,
        inv_dtype=torch.float64,
    )
    data = [
        (
            torch.randn(
                6, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(i)
            ),
            torch.tensor([0, 1, 2, 0, 1, 2]),
        )
        for i in range(7)
    ]

    def train(model, pre, batches):
        for x, y in batches:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.05 * p.grad

    straight = _model()
    train(straight, KFACPreconditioner(straight, **settings), data)
    first = _model()
    pre = KFACPreconditioner(first, **settings)
    train(first, pre, data[:4])
    state, weights = pre.state_dict(), first.state_dict()
    resumed = _model()
    resumed.load_state_dict(weights)
    pre2 = KFACPreconditioner(resumed, **settings)
    pre2.load_state_dict(state)
    train(resumed, pre2, data[4:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
