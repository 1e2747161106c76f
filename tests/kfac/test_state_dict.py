"""Checkpoint round trip: save, reload into fresh objects, continue == never stopped."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from kfac_train.kfac import KFACPreconditioner


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 8),
        nn.Tanh(),
        nn.Linear(8, 3),
    )


def _batches(num_steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(10, 2, 4, 4, generator=generator),
            torch.randint(0, 3, (10,), generator=generator),
        )
        for _ in range(num_steps)
    ]


def _build(seed: int, method: str, hyperparameters: dict):
    model = _model(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pre = KFACPreconditioner(model, compute_method=method, lr=0.05, **hyperparameters)
    return model, optimizer, pre


def _train(model, optimizer, pre, batches) -> None:
    for inputs, labels in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        pre.step()
        optimizer.step()


def _round_trip(state: dict) -> dict:
    """Through bytes, as a checkpoint file would be, loaded with weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resume_and_compare(method: str, hyperparameters: dict, include_factors: bool) -> None:
    saved_after, resumed_for = 5, 6
    batches = _batches(saved_after + resumed_for)

    uninterrupted = _build(0, method, hyperparameters)
    _train(*uninterrupted, batches)

    first = _build(0, method, hyperparameters)
    _train(*first, batches[:saved_after])
    model, optimizer, pre = first
    checkpoint = _round_trip(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "kfac": pre.state_dict(include_factors=include_factors),
        }
    )
    del first, model, optimizer, pre

    model, optimizer, pre = _build(1, method, hyperparameters)  # other init: loading matters
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    pre.load_state_dict(checkpoint["kfac"])
    assert pre.steps == saved_after
    _train(model, optimizer, pre, batches[saved_after:])

    assert pre.steps == saved_after + resumed_for
    for (name, a), b in zip(uninterrupted[0].named_parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_resumed_run_matches_the_uninterrupted_run_bit_for_bit(method: str) -> None:
    """Saved at step 5 with factor interval 2 and second-order interval 3: step 5 updates the
    factors but must apply the second-order data of step 3, which only the checkpoint has."""
    hyperparameters = {
        "factor_update_steps": 2,
        "inv_update_steps": 3,
        "factor_decay": 0.8,
        "damping": 3e-3,
        "kl_clip": 1e-3,
    }
    _resume_and_compare(method, hyperparameters, include_factors=True)


def test_resume_without_factors_matches_when_nothing_depends_on_old_factors() -> None:
    """With the latest batch only (decay 0) and refreshes every step, the factors carry no
    information between steps, so a checkpoint without them resumes exactly."""
    hyperparameters = {
        "factor_update_steps": 1,
        "inv_update_steps": 1,
        "factor_decay": 0.0,
        "damping": 3e-3,
        "kl_clip": 1e-3,
    }
    _resume_and_compare("eigen", hyperparameters, include_factors=False)


def test_state_without_factors_is_smaller_and_still_loads() -> None:
    model, optimizer, pre = _build(0, "eigen", {})
    _train(model, optimizer, pre, _batches(2))

    def tensor_bytes(state) -> int:
        if isinstance(state, torch.Tensor):
            return state.numel() * state.element_size()
        if isinstance(state, dict):
            return sum(tensor_bytes(value) for value in state.values())
        if isinstance(state, list | tuple):
            return sum(tensor_bytes(value) for value in state)
        return 0

    full, light = pre.state_dict(), pre.state_dict(include_factors=False)
    assert tensor_bytes(light) < tensor_bytes(full) // 10
    fresh = _build(1, "eigen", {})[2]
    fresh.load_state_dict(_round_trip(light))
    assert fresh.steps == 2
