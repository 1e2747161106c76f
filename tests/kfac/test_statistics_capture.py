"""Forward passes in ``model.eval()`` or under ``torch.no_grad()`` never touch the statistics.

Two runs see the same training batches; one also makes evaluation forwards, both between steps
and between a training forward and its backward (where a "latest input" cache would be
overwritten). The parameters must come out bit-for-bit equal.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    )


def _evaluation_forwards(model: nn.Module, generator: torch.Generator) -> None:
    """A validation pass in eval mode (grad enabled) and a metrics pass under no_grad, on
    inputs of a different batch size, leaving the model in train mode."""
    model.eval()
    model(torch.randn(7, 1, 4, 4, generator=generator)).sum()
    model.train()
    with torch.no_grad():
        model(torch.randn(9, 1, 4, 4, generator=generator))


@pytest.mark.parametrize("accumulation_steps", [1, 2])
def test_eval_and_no_grad_forwards_leave_the_training_unchanged(accumulation_steps: int) -> None:
    plain, with_evaluation = _model(), _model()
    data = torch.Generator().manual_seed(1)
    batches = [
        [
            (torch.randn(6, 1, 4, 4, generator=data), torch.randint(0, 3, (6,), generator=data))
            for _ in range(accumulation_steps)
        ]
        for _ in range(3)
    ]
    for model in (plain, with_evaluation):
        evaluating = model is with_evaluation
        noise = torch.Generator().manual_seed(2)
        pre = KFACPreconditioner(
            model, damping=1e-2, factor_decay=0.5, accumulation_steps=accumulation_steps
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for micro_batches in batches:
            optimizer.zero_grad()
            for inputs, labels in micro_batches:
                if evaluating:
                    _evaluation_forwards(model, noise)
                output = model(inputs)
                if evaluating:
                    _evaluation_forwards(model, noise)
                loss = nn.functional.cross_entropy(output, labels) / accumulation_steps
                loss.backward()
            pre.step()
            optimizer.step()
            if evaluating:
                _evaluation_forwards(model, noise)

    for (name, a), b in zip(plain.named_parameters(), with_evaluation.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_backward_through_an_eval_forward_does_not_update_the_factors() -> None:
    """An eval-mode forward is not a training micro-batch, even when something (e.g. an
    auxiliary loss) backpropagates through it: its statistics are not collected."""
    plain, with_eval_backward = _model(), _model()
    torch.manual_seed(3)
    inputs, labels = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    eval_inputs = torch.randn(6, 1, 4, 4)
    results = []
    for model in (plain, with_eval_backward):
        pre = KFACPreconditioner(model, damping=1e-2, factor_decay=0.0)
        nn.functional.cross_entropy(model(inputs), labels).backward()
        if model is with_eval_backward:
            model.eval()
            (0 * model(eval_inputs).sum()).backward()  # adds nothing to .grad
            model.train()
        pre.step()
        results.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
