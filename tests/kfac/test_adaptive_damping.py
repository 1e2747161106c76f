"""Levenberg–Marquardt adaptive damping (Martens & Grosse 2015, §6.5; ``kfac/damping.py``).

Every ``interval`` steps the preconditioner saves the quadratic model
``M(δ) = ∇ᵀδ + ½ δᵀ(A ⊗ G + λI)δ`` of the update ``δ = −lr·V`` it wrote; the caller reports the
loss on the same batch before and after the optimizer step and ``ρ = ΔL / M`` moves ``λ``:
``ρ > 0.75`` → ``λ·ω``, ``ρ < 0.25`` → ``λ/ω``, ``ω = decay^interval``, within the bounds.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from kfac_train.kfac import AdaptiveDamping, KFACPreconditioner
from kfac_train.kfac.damping import DampingController

from . import oracle
from .dist_utils import run_distributed

FLOAT64 = {"factor_dtype": torch.float64, "inv_dtype": torch.float64}
INITIAL = 1e-2


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(seed: int = 1, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 4, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (size,), generator=generator)


def _loss(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _adaptive_step(model, pre, optimizer, batch) -> tuple[float, float]:
    """One training step with the damping update; returns (loss before, loss after)."""
    optimizer.zero_grad()
    before = _loss(model, batch)
    before.backward()
    pre.step()
    optimizer.step()
    assert pre.adaptive_damping_due()
    with torch.no_grad():
        after = _loss(model, batch)
    pre.update_damping(before.detach(), after)
    assert not pre.adaptive_damping_due()
    return before.item(), after.item()


def _setup(lr: float, interval: int = 1, **options):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    pre = KFACPreconditioner(
        model,
        damping=INITIAL,
        kl_clip=None,
        lr=lr,
        adaptive_damping=AdaptiveDamping(interval=interval, **options),
        **FLOAT64,
    )
    return model, optimizer, pre


def test_damping_rises_on_a_step_that_increases_the_loss() -> None:
    model, optimizer, pre = _setup(lr=50.0)  # a step far beyond the model's trust region
    before, after = _adaptive_step(model, pre, optimizer, _batch())
    assert after > before
    assert pre.adaptive.last_rho < 0
    assert pre.current_damping() == pytest.approx(INITIAL / 0.95)


def test_damping_falls_when_the_quadratic_model_predicts_the_change() -> None:
    model, optimizer, pre = _setup(lr=1e-3)  # tiny step: the change is what the model says
    before, after = _adaptive_step(model, pre, optimizer, _batch())
    assert after < before
    assert pre.adaptive.last_rho == pytest.approx(1.0, abs=0.05)
    assert pre.current_damping() == pytest.approx(INITIAL * 0.95)


def test_the_quadratic_model_is_the_dense_kronecker_formula() -> None:
    lr = 0.3
    model, optimizer, pre = _setup(lr=lr)
    batch = _batch()
    _loss(model, batch).backward()
    grads = {n: oracle.gradient_matrix(pre.blocks[n].module) for n in pre.layer_names}
    pre.step()
    expected = 0.0
    for name in pre.layer_names:
        block = pre.blocks[name]
        V = oracle.gradient_matrix(block.module)  # the written (preconditioned) gradient
        delta = -lr * oracle.vec(V)
        F = torch.kron(block.A.running, block.G.running)
        curvature = delta @ (F + INITIAL * torch.eye(F.shape[0], dtype=F.dtype)) @ delta
        expected += float(oracle.vec(grads[name]) @ delta + 0.5 * curvature)
    assert float(pre.adaptive.pending) == pytest.approx(expected, rel=1e-10)


def test_interval_decides_which_steps_are_measured_and_omega() -> None:
    model, optimizer, pre = _setup(lr=50.0, interval=3)
    batch = _batch()
    due = []
    for _ in range(6):
        optimizer.zero_grad()
        before = _loss(model, batch)
        before.backward()
        pre.step()
        optimizer.step()
        due.append(pre.adaptive_damping_due())
        if due[-1]:
            with torch.no_grad():
                pre.update_damping(before, _loss(model, batch))
    assert due == [False, False, True, False, False, True]


@pytest.mark.parametrize(
    ("rho_change", "expected"),
    [
        (-1.0, INITIAL * 0.95**5),
        (-0.5, INITIAL),
        (-0.9, INITIAL * 0.95**5),
        (1.0, INITIAL / 0.95**5),
    ],
)
def test_thresholds_and_omega(rho_change: float, expected: float) -> None:
    """With ``M = −1``: ρ = −ΔL. ρ = 1 and 0.9 fall, 0.5 stays, a loss rise (ρ < 0) rises."""
    controller = DampingController(AdaptiveDamping(interval=5, decay=0.95), INITIAL)
    controller.update(0.0, rho_change, -1.0)
    assert controller.damping == pytest.approx(expected)


def test_floor_and_ceiling_bound_the_damping() -> None:
    options = AdaptiveDamping(interval=1, decay=0.5, min_damping=1e-3, max_damping=4e-2)
    controller = DampingController(options, INITIAL)
    for _ in range(10):
        controller.update(0.0, 1.0, -1.0)  # the loss rose: up, by 2x each time
    assert controller.damping == 4e-2
    for _ in range(10):
        controller.update(0.0, -1.0, -1.0)  # exact model: down
    assert controller.damping == 1e-3
    with pytest.raises(ValueError, match="damping_adapt_decay"):
        AdaptiveDamping(decay=1.0)


def test_update_damping_without_a_due_step_is_an_error() -> None:
    _, _, pre = _setup(lr=0.1, interval=2)
    with pytest.raises(RuntimeError, match="adaptive_damping_due"):
        pre.update_damping(1.0, 0.5)


# ------------------------------------------------------------------ checkpoints
def _train(model, optimizer, pre, batches) -> list[float]:
    dampings = []
    for batch in batches:
        optimizer.zero_grad()
        before = _loss(model, batch)
        before.backward()
        pre.step()
        optimizer.step()
        if pre.adaptive_damping_due():
            with torch.no_grad():
                pre.update_damping(before, _loss(model, batch))
        dampings.append(pre.current_damping())
    return dampings


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_resume_is_bit_exact_and_restores_the_adapted_damping() -> None:
    batches = [_batch(seed) for seed in range(8)]
    model, optimizer, pre = _setup(lr=2.0, interval=2)
    straight = _train(model, optimizer, pre, batches)
    assert len(set(straight)) > 1, straight  # the damping moved during the run

    first, first_opt, first_pre = _setup(lr=2.0, interval=2)
    _train(first, first_opt, first_pre, batches[:3])
    state = _round_trip(first_pre.state_dict())
    assert state["damping"] == first_pre.current_damping() != INITIAL
    resumed, resumed_opt, resumed_pre = _setup(lr=2.0, interval=2)
    resumed.load_state_dict(first.state_dict())
    resumed_opt.load_state_dict(first_opt.state_dict())
    resumed_pre.load_state_dict(state)
    rest = _train(resumed, resumed_opt, resumed_pre, batches[3:])

    assert rest == straight[3:]
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_state_saved_without_damping_loads_with_the_initial_damping() -> None:
    model, optimizer, pre = _setup(lr=0.1)
    plain = KFACPreconditioner(copy.deepcopy(model), **FLOAT64)  # not adapting: no "damping"
    state = plain.state_dict()
    assert "damping" not in state
    pre.load_state_dict(state)
    assert pre.current_damping() == INITIAL


# ------------------------------------------------------------------ distributed
def _rank_dampings(interval: int) -> list[float]:
    import torch.distributed as dist

    model = nn.parallel.DistributedDataParallel(_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=3.0)
    pre = KFACPreconditioner(
        model,
        damping=INITIAL,
        kl_clip=None,
        lr=3.0,
        grad_worker_fraction="mem-opt",
        adaptive_damping=AdaptiveDamping(interval=interval),
        **FLOAT64,
    )
    rank = dist.get_rank()
    batches = [_batch(seed=10 * step + rank, size=8) for step in range(4)]  # different per rank
    return _train(model, optimizer, pre, batches)


def test_two_ranks_take_the_same_damping_decisions() -> None:
    per_rank = run_distributed(_rank_dampings, 2, 1)
    assert per_rank[0] == per_rank[1]
    assert len(set(per_rank[0])) > 1, per_rank[0]  # the damping moved
