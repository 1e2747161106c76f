"""One K-FAC step equals the dense float64 reference of kfac-math.md.

Each case runs one step with ``factor_decay=0`` (latest batch only) and float64 factors and
second-order data, and compares the preconditioned ``.grad`` with explicit Kronecker solves built
by the oracle from captured inputs and output gradients. The damping sits inside the spectrum
the method damps, and every case asserts that doubling A or G would change the answer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner as _KFACPreconditioner

from . import oracle
from .models import strided_cnn

# Setup: these expectations are built in kfac-math.md's "mean" convention (the library default
# before issue 10); the per-example default is tested in test_convention.py.
KFACPreconditioner = partial(_KFACPreconditioner, grad_scaling="mean")

FLOAT64 = {"factor_dtype": torch.float64, "inv_dtype": torch.float64}
TOLERANCE = 1e-9
METHODS = ("eigen", "inverse")

LAYER_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear-2d-bias": (lambda: nn.Linear(5, 4), (12, 5)),
    "linear-2d-no-bias": (lambda: nn.Linear(5, 4, bias=False), (12, 5)),
    "linear-3d-bias": (lambda: nn.Linear(5, 4), (3, 4, 5)),
    "linear-3d-no-bias": (lambda: nn.Linear(5, 4, bias=False), (3, 4, 5)),
    "conv-pad-stride-dilation-2x3": (
        lambda: nn.Conv2d(3, 4, kernel_size=(2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
        (2, 3, 7, 8),
    ),
    "conv-3x2-stride-dilation-no-bias": (
        lambda: nn.Conv2d(2, 3, kernel_size=(3, 2), stride=2, dilation=2, bias=False),
        (3, 2, 9, 8),
    ),
    "conv-reflect-padding": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        (2, 2, 6, 5),
    ),
    "conv-reflect-padding-no-bias": (
        lambda: nn.Conv2d(2, 3, (3, 2), padding=(1, 2), padding_mode="reflect", bias=False),
        (2, 2, 6, 5),
    ),
    "conv-1x1": (lambda: nn.Conv2d(4, 3, 1), (2, 4, 3, 3)),
    "conv-same-padding-2x3": (lambda: nn.Conv2d(2, 3, (2, 3), padding="same"), (2, 2, 5, 6)),
    "conv-circular-padding-stride": (
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=2, padding_mode="circular"),
        (2, 2, 6, 7),
    ),
}


def _squared_error_backward(inputs: torch.Tensor, target: torch.Tensor, scale: float = 1.0):
    """A backward pass of ``scale · ½‖model(inputs) − target‖²`` (sum over all elements)."""

    def run_backward(model: nn.Module) -> None:
        (scale * 0.5 * ((model(inputs) - target) ** 2).sum()).backward()

    return run_backward


def _single_layer_problem(case: str, seed: int = 0, device: torch.device | str = "cpu"):
    """(model, inputs, target) for the case's layer followed by tanh, all in float64."""
    builder, input_shape = LAYER_CASES[case]
    torch.manual_seed(seed)
    model = nn.Sequential(builder(), nn.Tanh()).double().to(device)
    inputs = torch.randn(input_shape, dtype=torch.float64).to(device)
    with torch.no_grad():
        target = torch.randn_like(model(inputs))
    return model, inputs, target


def _dense_reference(method: str, model: nn.Sequential, run_backward):
    """(damping inside the spectrum, expected V) for layer "0", on a copy of ``model``."""
    reference = copy.deepcopy(model)
    capture = oracle.capture_layers(reference, ["0"], run_backward)["0"]
    A, G = oracle.layer_factors(reference[0], capture)
    grad = oracle.gradient_matrix(reference[0])
    damping = oracle.damping_inside_spectrum(method, A, G)
    oracle.assert_sensitive_to_both_factors(method, A, G, grad, damping)
    return damping, oracle.preconditioned(method, A, G, grad, damping)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_one_step_matches_the_dense_kronecker_reference(
    case: str, method: str, device: torch.device
) -> None:
    model, inputs, target = _single_layer_problem(case, device=device)
    run_backward = _squared_error_backward(inputs, target)
    damping, expected = _dense_reference(method, model, run_backward)

    pre = KFACPreconditioner(
        model, damping=damping, factor_decay=0.0, kl_clip=None, compute_method=method, **FLOAT64
    )
    run_backward(model)
    pre.step()

    assert pre.layer_names == ["0"]
    assert pre.steps == 1
    assert oracle.relative_error(oracle.gradient_matrix(model[0]), expected) < TOLERANCE


@pytest.mark.parametrize("method", METHODS)
def test_default_float32_factors_match_the_reference_to_float32_accuracy(
    method: str, device: torch.device
) -> None:
    model, inputs, target = _single_layer_problem("conv-pad-stride-dilation-2x3", device=device)
    damping, expected = _dense_reference(method, model, _squared_error_backward(inputs, target))

    model = model.float()
    pre = KFACPreconditioner(
        model, damping=damping, factor_decay=0.0, kl_clip=None, compute_method=method
    )
    _squared_error_backward(inputs.float(), target.float())(model)
    pre.step()

    assert model[0].weight.grad.dtype == torch.float32
    assert oracle.relative_error(oracle.gradient_matrix(model[0]), expected) < 1e-4


ConvThenLinear = strided_cnn  # conv (3→4, 3x3, stride 2) → tanh → flatten → linear (36 → 3)


def _two_layer_problem(convention: str = "mean"):
    """(model, run_backward, {layer: (A, G)}, {layer: grad}) for :class:`ConvThenLinear`, the
    factors in ``convention``."""
    torch.manual_seed(1)
    model = ConvThenLinear().double()
    inputs = torch.randn(6, 3, 7, 7, dtype=torch.float64)
    labels = torch.randint(0, 3, (6,))

    def run_backward(m: nn.Module) -> None:
        nn.functional.cross_entropy(m(inputs), labels).backward()

    factors, grads = oracle.batch_statistics(
        copy.deepcopy(model), model, ["conv", "head"], run_backward, convention
    )
    return model, run_backward, factors, grads


@pytest.mark.parametrize("method", METHODS)
def test_kl_clip_scales_every_layer_by_the_same_nu(method: str) -> None:
    damping, lr = 1e-3, 0.7
    model, run_backward, factors, grads = _two_layer_problem()
    preconditioned = {
        name: oracle.preconditioned(method, *factors[name], grads[name], damping) for name in grads
    }
    unclipped_sum = sum(lr**2 * float((preconditioned[n] * grads[n]).sum()) for n in preconditioned)
    kl_clip = 0.3**2 * unclipped_sum  # so that ν = 0.3
    nu = oracle.kl_clip_scale([(preconditioned[n], grads[n]) for n in grads], lr, kl_clip)
    assert nu == pytest.approx(0.3)

    pre = KFACPreconditioner(
        model,
        damping=damping,
        factor_decay=0.0,
        kl_clip=kl_clip,
        lr=lambda step: lr,
        compute_method=method,
        **FLOAT64,
    )
    run_backward(model)
    pre.step()

    assert pre.layer_names == ["conv", "head"]
    assert float(pre.last_kl_scale) == pytest.approx(nu, rel=1e-9)
    assert pre.kl_clip_summary() == pytest.approx({"kl_scale_mean": nu, "kl_clipped_fraction": 1})
    for name in ("conv", "head"):
        actual = oracle.gradient_matrix(getattr(model, name))
        assert oracle.relative_error(actual, nu * preconditioned[name]) < TOLERANCE


@pytest.mark.parametrize("kl_clip", [None, 1e6])
def test_kl_clip_off_or_loose_leaves_the_preconditioned_gradient_unscaled(kl_clip) -> None:
    damping = 1e-3
    model, run_backward, factors, grads = _two_layer_problem()
    pre = KFACPreconditioner(
        model, damping=damping, factor_decay=0.0, kl_clip=kl_clip, lr=0.7, **FLOAT64
    )
    run_backward(model)
    pre.step()
    assert float(pre.last_kl_scale) == 1.0
    assert pre.kl_clip_summary() == {"kl_scale_mean": 1.0, "kl_clipped_fraction": 0.0}
    for name in ("conv", "head"):
        expected = oracle.eigen_preconditioned(*factors[name], grads[name], damping)
        actual = oracle.gradient_matrix(getattr(model, name))
        assert oracle.relative_error(actual, expected) < TOLERANCE


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer_under_test", ["conv", "head"])
def test_per_example_grad_scaling_uses_the_per_example_factors(
    method: str, layer_under_test: str
) -> None:
    """Linear head: ``G`` times the batch size squared; conv: KFC's location-averaged ``A`` and
    location-summed per-example ``G`` (``oracle.per_example_factors``)."""
    model, run_backward, per_example, grads = _two_layer_problem("per_example")
    _, _, mean_factors, _ = _two_layer_problem()
    A_head, G_head = mean_factors["head"]
    torch.testing.assert_close(per_example["head"][0], A_head)
    torch.testing.assert_close(per_example["head"][1], G_head * 6**2)  # batch size 6
    damping = oracle.damping_inside_spectrum(method, *per_example[layer_under_test])
    A, G = per_example[layer_under_test]
    oracle.assert_sensitive_to_both_factors(method, A, G, grads[layer_under_test], damping)

    pre = KFACPreconditioner(
        model,
        damping=damping,
        factor_decay=0.0,
        kl_clip=None,
        compute_method=method,
        grad_scaling="per_example",
        **FLOAT64,
    )
    run_backward(model)
    pre.step()
    for name in ("conv", "head"):
        expected = oracle.preconditioned(method, *per_example[name], grads[name], damping)
        actual = oracle.gradient_matrix(getattr(model, name))
        assert oracle.relative_error(actual, expected) < TOLERANCE
