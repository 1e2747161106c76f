"""Loss scaling (AMP): G is formed from unscaled output gradients; overflow steps are dropped.

The convention (docs/kfac.md): the caller backpropagates ``scale · loss`` and unscales the
parameter gradients (``scaler.unscale_(optimizer)``) before ``pre.step()``; the preconditioner
divides the output gradients by the current scale itself. An inf/NaN in the statistics drops that
step's statistics (the factors stay as they were) with a warning.
"""

from __future__ import annotations

import copy
import logging
import warnings
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
COMMON = {"damping": 1e-3, "factor_decay": 0.5, "kl_clip": 1e-2, "lr": 0.1, **FLOAT64}
LAYERS = ["0", "3"]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 4)).double()


def _batches(num_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(6, 2, 5, 5, generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (6,), generator=generator),
        )
        for _ in range(num_steps)
    ]


class OverflowingGradient(torch.autograd.Function):
    """Identity forward; backward hands ``value`` (inf or NaN) to every output gradient, as an
    fp16 overflow of the scaled loss would."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, value: float) -> torch.Tensor:
        ctx.value = value
        return output.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.full_like(grad, ctx.value), None


def _loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(inputs), labels)


def _train_unscaled(model: nn.Module, num_steps: int) -> None:
    pre = KFACPreconditioner(model, **COMMON)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for inputs, labels in _batches(num_steps):
        optimizer.zero_grad()
        _loss(model, inputs, labels).backward()
        pre.step()
        optimizer.step()


def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-13, msg=name)


def test_callable_loss_scale_gives_the_unscaled_result() -> None:
    unscaled, scaled = _model(), _model()
    _train_unscaled(unscaled, num_steps=4)

    scales = iter([1024.0, 4096.0, 256.0, 1024.0])  # read afresh every step
    current = {"scale": 1.0}
    pre = KFACPreconditioner(scaled, grad_scaler=lambda: current["scale"], **COMMON)
    optimizer = torch.optim.SGD(scaled.parameters(), lr=0.1, momentum=0.9)
    for inputs, labels in _batches(num_steps=4):
        current["scale"] = next(scales)
        optimizer.zero_grad()
        (current["scale"] * _loss(scaled, inputs, labels)).backward()
        for parameter in scaled.parameters():  # what GradScaler.unscale_ does
            parameter.grad /= current["scale"]
        pre.step()
        optimizer.step()

    _assert_same_parameters(scaled, unscaled)


def test_torch_grad_scaler_gives_the_unscaled_result() -> None:
    unscaled, scaled = _model(), _model()
    _train_unscaled(unscaled, num_steps=5)

    # growth_interval=2 doubles the scale every two steps: the current scale must be read.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    pre = KFACPreconditioner(scaled, grad_scaler=scaler, **COMMON)
    optimizer = torch.optim.SGD(scaled.parameters(), lr=0.1, momentum=0.9)
    for inputs, labels in _batches(num_steps=5):
        optimizer.zero_grad()
        scaler.scale(_loss(scaled, inputs, labels)).backward()
        scaler.unscale_(optimizer)
        pre.step()
        scaler.step(optimizer)
        scaler.update()

    assert scaler.get_scale() == 2.0**12
    _assert_same_parameters(scaled, unscaled)


def test_overflow_step_statistics_are_dropped_with_a_warning(caplog) -> None:
    model = _model()
    reference_model = copy.deepcopy(model)
    reference = oracle.ReferenceKFAC("eigen")
    damping, decay = 1e-3, 0.5
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    pre = KFACPreconditioner(
        model, grad_scaler=scaler, damping=damping, factor_decay=decay, kl_clip=None, **FLOAT64
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    overflow_step = 1

    for step, (inputs, labels) in enumerate(_batches(num_steps=3)):
        if step != overflow_step:

            def run_backward(m: nn.Module, inputs=inputs, labels=labels) -> None:
                _loss(m, inputs, labels).backward()

            batch_factors, grads = oracle.batch_statistics(
                reference_model, model, LAYERS, run_backward
            )
            reference.update_factors(batch_factors, decay)
            reference.refresh_second_order()
            expected, _ = reference.preconditioned(grads, damping, kl_clip=None, lr=0.1)

        optimizer.zero_grad()
        output = model(inputs)
        if step == overflow_step:
            output = OverflowingGradient.apply(output, float("inf"))
        scaler.scale(nn.functional.cross_entropy(output, labels)).backward()
        scaler.unscale_(optimizer)
        before = [p.detach().clone() for p in model.parameters()]
        caplog.clear()
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            with caplog.at_level(logging.WARNING):
                pre.step()
        scaler.step(optimizer)
        scaler.update()

        if step == overflow_step:
            assert oracle.warning_texts(recorded, caplog.records), "overflow not reported"
            for p, q in zip(model.parameters(), before, strict=True):
                assert torch.equal(p, q)  # GradScaler skipped the step
        else:
            modules = dict(model.named_modules())
            for name in LAYERS:
                actual = oracle.gradient_matrix(modules[name])
                assert oracle.relative_error(actual, expected[name]) < 1e-9, (step, name)
        assert all(torch.isfinite(p).all() for p in model.parameters())

    assert scaler.get_scale() == 2.0**9
    assert pre.steps == 3


@pytest.mark.parametrize("bad_value", [float("inf"), float("nan")])
def test_non_finite_statistics_without_a_scaler_leave_the_factors_untouched(
    bad_value: float,
) -> None:
    """Without a scaler the bad step's gradient is the caller's business, but K-FAC must drop
    its statistics, so the next finite step is preconditioned from the identity start and
    that step's batch only."""
    model = _model()
    reference_model = copy.deepcopy(model)
    damping, decay = 1e-3, 0.5
    pre = KFACPreconditioner(model, damping=damping, factor_decay=decay, kl_clip=None, **FLOAT64)
    (bad_inputs, bad_labels), (inputs, labels) = _batches(num_steps=2)
    output = OverflowingGradient.apply(model(bad_inputs), bad_value)
    nn.functional.cross_entropy(output, bad_labels).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pre.step()

    def run_backward(m: nn.Module) -> None:
        _loss(m, inputs, labels).backward()

    batch_factors, grads = oracle.batch_statistics(reference_model, model, LAYERS, run_backward)
    reference = oracle.ReferenceKFAC("eigen")
    reference.update_factors(batch_factors, decay)
    reference.refresh_second_order()
    expected, _ = reference.preconditioned(grads, damping, kl_clip=None, lr=0.1)

    model.zero_grad()
    run_backward(model)
    pre.step()
    modules = dict(model.named_modules())
    for name in LAYERS:
        actual = oracle.gradient_matrix(modules[name])
        assert oracle.relative_error(actual, expected[name]) < 1e-9, name
