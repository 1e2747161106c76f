"""Running averages, update intervals and step-dependent hyperparameters over several steps.

Conventions checked (kfac-math.md): ``F ← decay·F + (1 − decay)·F_batch`` starting from the
identity; factors are updated when ``step % factor_update_steps == 0`` and second-order data when
``step % inv_update_steps == 0`` (step 0 does both, ``step`` counts completed ``step()`` calls);
in between, the stale second-order data stays in force. Hyperparameter functions receive the step.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner as _KFACPreconditioner

from . import oracle

# Setup: these expectations are built in kfac-math.md's "mean" convention (the library default
# before issue 10); the per-example default is tested in test_convention.py.
KFACPreconditioner = partial(_KFACPreconditioner, grad_scaling="mean")

FLOAT64 = {"factor_dtype": torch.float64, "inv_dtype": torch.float64}
LAYERS = ["0", "2"]


def _mlp_and_batches(num_steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batches = [
        (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
        for _ in range(num_steps)
    ]
    return model, batches


def _summed_cross_entropy(inputs: torch.Tensor, labels: torch.Tensor):
    """Sum-reduced, so G is of order one and comparable with the identity it starts from."""

    def run_backward(model: nn.Module) -> None:
        nn.functional.cross_entropy(model(inputs), labels, reduction="sum").backward()

    return run_backward


def _run_and_compare(pre_kwargs: dict, schedule: dict, num_steps: int, method: str) -> list[float]:
    """Train ``num_steps`` steps with K-FAC and check every step's gradients with the oracle.

    ``schedule`` maps each hyperparameter to a function of the step (the oracle's view);
    ``pre_kwargs`` is what the preconditioner is given (constants or the same functions).
    """
    model, batches = _mlp_and_batches(num_steps)
    reference_model = copy.deepcopy(model)
    reference = oracle.ReferenceKFAC(method)
    pre = KFACPreconditioner(model, compute_method=method, **pre_kwargs, **FLOAT64)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)  # keeps tanh unsaturated
    stale_steps_checked = 0
    kl_scales = []

    for step, (inputs, labels) in enumerate(batches):
        run_backward = _summed_cross_entropy(inputs, labels)
        batch_factors, grads = oracle.batch_statistics(reference_model, model, LAYERS, run_backward)
        updates_factors = step % schedule["factor_update_steps"](step) == 0
        refreshes = step % schedule["inv_update_steps"](step) == 0
        if updates_factors:
            reference.update_factors(batch_factors, schedule["factor_decay"](step))
        if refreshes:
            reference.refresh_second_order()
        damping = schedule["damping"](step)
        expected, nu = reference.preconditioned(
            grads, damping, schedule["kl_clip"](step), schedule["lr"](step)
        )
        if not refreshes or not updates_factors:
            # The step must be able to tell stale data from fresh data.
            fresh = oracle.ReferenceKFAC(method)
            fresh.factors = dict(reference.factors)
            fresh.update_factors(batch_factors, schedule["factor_decay"](step))
            fresh.refresh_second_order()
            fresh_expected, _ = fresh.preconditioned(
                grads, damping, schedule["kl_clip"](step), schedule["lr"](step)
            )
            assert oracle.relative_error(fresh_expected["0"], expected["0"]) > 1e-3
            stale_steps_checked += 1

        optimizer.zero_grad()
        run_backward(model)
        pre.step()

        assert pre.steps == step + 1
        modules = dict(model.named_modules())
        for name in LAYERS:
            actual = oracle.gradient_matrix(modules[name])
            error = oracle.relative_error(actual, expected[name])
            assert error < 1e-9, f"step {step}, layer {name}: relative error {error:.2e}"
        assert float(pre.last_kl_scale) == pytest.approx(nu, rel=1e-9)
        kl_scales.append(nu)
        optimizer.step()

    # The log-window summary: the mean ν over the steps and the share the clip scaled down.
    window = pre.kl_clip_summary()
    assert window["kl_scale_mean"] == pytest.approx(sum(kl_scales) / num_steps, rel=1e-9)
    clipped = sum(nu < 1 for nu in kl_scales) / num_steps
    assert window["kl_clipped_fraction"] == pytest.approx(clipped)
    assert pre.kl_clip_summary() == {}  # a new window starts empty

    A, G = reference.in_force["0"]
    oracle.assert_sensitive_to_both_factors(
        method, A, G, grads["0"], schedule["damping"](num_steps - 1)
    )
    assert stale_steps_checked >= 3
    return kl_scales


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("factor_decay", [0.6, 0.0])
def test_running_average_and_stale_second_order_data_between_updates(
    method: str, factor_decay: float
) -> None:
    constants = {
        "factor_update_steps": 2,
        "inv_update_steps": 3,
        "factor_decay": factor_decay,
        "damping": {"eigen": 0.05, "inverse": 0.01}[method],
        "kl_clip": None,
        "lr": 0.05,
    }
    schedule = {key: (lambda step, value=value: value) for key, value in constants.items()}
    _run_and_compare(constants, schedule, num_steps=8, method=method)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_every_hyperparameter_may_be_a_function_of_the_step(method: str) -> None:
    # Interval functions change only at steps that are multiples of both the old and new value,
    # and damping changes only on a refresh step, so no reading of "every k steps" is favoured.
    schedule = {
        "factor_update_steps": lambda step: 1 if step < 2 else 2,
        "inv_update_steps": lambda step: 1 if step < 3 else 3,
        "factor_decay": lambda step: 0.3 if step < 4 else 0.8,
        "damping": lambda step: 0.05 if step < 6 else 0.2,
        "kl_clip": lambda step: 1e-3 if step % 2 else 1e6,
        "lr": lambda step: 0.05 * (step + 1),
    }
    kl_scales = _run_and_compare(dict(schedule), schedule, num_steps=9, method=method)
    assert all(scale == 1.0 for scale in kl_scales[::2])
    assert all(scale < 1.0 for scale in kl_scales[1::2])
