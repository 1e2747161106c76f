"""Gradient accumulation: k micro-batches, each loss divided by k, one ``step()``.

kfac-math.md: the per-micro-batch factors are averaged, and G of a micro-batch is the one its own
mean loss gives (the caller's 1/k is compensated). For equal-size micro-batches A therefore equals
A of the concatenated batch, while G is the average of per-micro-batch G, which is k² times G of
the concatenated batch under a mean-reduced loss.
"""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner as _KFACPreconditioner

from . import oracle
from .models import small_cnn

# Setup: these expectations are built in kfac-math.md's "mean" convention (the library default
# before issue 10); the per-example default is tested in test_convention.py.
KFACPreconditioner = partial(_KFACPreconditioner, grad_scaling="mean")

FLOAT64 = {"factor_dtype": torch.float64, "inv_dtype": torch.float64}
NUM_MICRO_BATCHES = 3
MICRO_BATCH = 4


SmallCNN = small_cnn  # conv (2→3, 3x3, padding 1) → relu → flatten → linear (3·5·5 → 4)
LAYERS = ["conv", "head"]


def _batches(num_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    size = NUM_MICRO_BATCHES * MICRO_BATCH
    return [
        (torch.randn(size, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (size,)))
        for _ in range(num_steps)
    ]


def _mean_cross_entropy(inputs: torch.Tensor, labels: torch.Tensor, divide_by: int = 1):
    def run_backward(model: nn.Module) -> None:
        (nn.functional.cross_entropy(model(inputs), labels) / divide_by).backward()

    return run_backward


def _micro_batches(inputs: torch.Tensor, labels: torch.Tensor):
    return zip(inputs.split(MICRO_BATCH), labels.split(MICRO_BATCH), strict=True)


def _accumulated_reference(model, reference_model, inputs, labels):
    """(averaged micro-batch factors, accumulated gradients) of one optimizer step."""
    per_micro_batch, grads = [], {name: 0.0 for name in LAYERS}
    for micro_inputs, micro_labels in _micro_batches(inputs, labels):
        factors, micro_grads = oracle.batch_statistics(
            reference_model, model, LAYERS, _mean_cross_entropy(micro_inputs, micro_labels)
        )
        per_micro_batch.append(factors)
        for name in LAYERS:
            grads[name] = grads[name] + micro_grads[name] / NUM_MICRO_BATCHES
    averaged = oracle.average_factors(per_micro_batch)
    concatenated, _ = oracle.batch_statistics(
        reference_model, model, LAYERS, _mean_cross_entropy(inputs, labels)
    )
    for name in LAYERS:  # the distinction the test relies on
        torch.testing.assert_close(averaged[name][0], concatenated[name][0])
        assert oracle.relative_error(averaged[name][1], concatenated[name][1]) > 1.0
    return averaged, grads


@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("layer_under_test", LAYERS)
def test_accumulated_factors_average_the_micro_batch_factors(
    method: str, layer_under_test: str
) -> None:
    """Three steps of three micro-batches each, latest factors only (decay 0), so a micro-batch
    leaking into the next step would also show. The damping sits inside the spectrum of
    ``layer_under_test`` (the two layers' factor scales differ by orders). No optimizer steps:
    with such a small damping they would blow the weights up; fresh batches vary the data."""
    torch.manual_seed(0)
    model = SmallCNN().double()
    reference_model = copy.deepcopy(model)
    batches = _batches(num_steps=3)
    averaged, _ = _accumulated_reference(model, reference_model, *batches[0])
    damping = oracle.damping_inside_spectrum(method, *averaged[layer_under_test])
    pre = KFACPreconditioner(
        model,
        damping=damping,
        factor_decay=0.0,
        kl_clip=None,
        compute_method=method,
        accumulation_steps=NUM_MICRO_BATCHES,
        **FLOAT64,
    )

    for inputs, labels in batches:
        averaged, grads = _accumulated_reference(model, reference_model, inputs, labels)
        A, G = averaged[layer_under_test]
        oracle.assert_sensitive_to_both_factors(method, A, G, grads[layer_under_test], damping)
        expected = {
            name: oracle.preconditioned(method, *averaged[name], grads[name], damping)
            for name in LAYERS
        }

        model.zero_grad()
        for micro_inputs, micro_labels in _micro_batches(inputs, labels):
            _mean_cross_entropy(micro_inputs, micro_labels, NUM_MICRO_BATCHES)(model)
        pre.step()

        for name in LAYERS:
            actual = oracle.gradient_matrix(getattr(model, name))
            # The other layer's system is ill-conditioned (cond ~1e9) at this damping.
            tolerance = 1e-9 if name == layer_under_test else 1e-6
            assert oracle.relative_error(actual, expected[name]) < tolerance, name


def test_per_example_scaling_makes_accumulation_equal_one_large_batch() -> None:
    """With g multiplied by the micro-batch size, G no longer depends on the split."""
    torch.manual_seed(1)
    accumulated = SmallCNN().double()
    single = copy.deepcopy(accumulated)
    common = {
        "damping": 1e-3,
        "factor_decay": 0.5,
        "kl_clip": 1e-2,
        "lr": 0.1,
        "grad_scaling": "per_example",
        **FLOAT64,
    }
    runs = {
        "accumulated": (
            accumulated,
            KFACPreconditioner(accumulated, accumulation_steps=NUM_MICRO_BATCHES, **common),
        ),
        "single": (single, KFACPreconditioner(single, **common)),
    }
    optimizers = {
        name: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for name, (m, _) in runs.items()
    }

    for inputs, labels in _batches(num_steps=3):
        for name, (model, pre) in runs.items():
            optimizers[name].zero_grad()
            if name == "accumulated":
                for micro_inputs, micro_labels in _micro_batches(inputs, labels):
                    _mean_cross_entropy(micro_inputs, micro_labels, NUM_MICRO_BATCHES)(model)
            else:
                _mean_cross_entropy(inputs, labels)(model)
            pre.step()
            optimizers[name].step()

    for (name, a), b in zip(accumulated.named_parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
