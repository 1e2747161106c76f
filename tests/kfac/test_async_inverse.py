"""``async_inverse=True``: second-order data computed off the critical path, installed later.

Contract (docs/kfac.md, "Asynchronous second-order updates"): the data computed from the factors
of inverse-update step ``t`` is installed at step ``t + async_delay``. An asynchronous run is
therefore *exactly* a synchronous run whose second-order data is delayed by ``async_delay``
steps — in one process and on gloo ranks for every strategy — and a run resumed from a
checkpoint taken while an update is pending continues bit for bit.

The reference below is the synchronous preconditioner with its updates delayed by hand: at an
inverse-update step it copies the running factors; ``delay`` steps later it swaps the copies in,
runs its ordinary synchronous update (the path the dense-oracle tests check) and swaps back.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kfac_train.kfac import KFACPreconditioner
from kfac_train.kfac.placement import update_second_order

from .dist_utils import run_distributed

SETTINGS = {
    "damping": 1e-2,
    "factor_decay": 0.9,
    "kl_clip": 1e-2,
    "lr": 0.1,
    "factor_dtype": torch.float64,
    "inv_dtype": torch.float64,
    "inv_update_steps": 3,
}
STEPS, DELAY, WORLD = 8, 2, 2


class DelayedSync(KFACPreconditioner):
    """Synchronous K-FAC whose second-order updates take effect ``delay`` steps late."""

    def __init__(self, model: nn.Module, delay: int, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.delay, self.queue = delay, []

    def _update_second_order(self, damping: float, step: int) -> None:
        copies = {n: [f.running.clone() for f in b.factors()] for n, b in self.blocks.items()}
        self.queue.append((step + self.delay, damping, copies))

    def step(self) -> None:
        while self.queue and self.queue[0][0] == self.steps:
            _, damping, copies = self.queue.pop(0)
            factors = [
                (f, c)
                for n, b in self.blocks.items()
                for f, c in zip(b.factors(), copies[n], strict=True)
            ]
            current = [f.running for f, _ in factors]
            for f, c in factors:
                f.running = c
            update_second_order(self.blocks, self.plan, self.comm, damping)
            for (f, _), running in zip(factors, current, strict=True):
                f.running = running
        super().step()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    ).double()


def _batch(step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(8, 5, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 3, (8,), generator=generator)


def _train(model, pre, steps: range, rank: int = 0) -> list[list[torch.Tensor]]:
    """SGD steps; returns every step's preconditioned gradients."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trace = []
    for step in steps:
        model.zero_grad()
        x, y = _batch(step, rank)
        nn.functional.cross_entropy(model(x), y).backward()
        pre.step()
        trace.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return trace


def _assert_equal(actual, expected) -> None:
    for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
        for x, y in zip(a, e, strict=True):
            assert torch.equal(x, y), f"step {step} differs"


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_async_run_equals_the_synchronous_run_delayed_by_the_same_steps(method: str) -> None:
    model = _model()
    pre = KFACPreconditioner(
        model, compute_method=method, async_inverse=True, async_delay=DELAY, **SETTINGS
    )
    actual = _train(model, pre, range(STEPS))
    pre.async_.close()
    reference = _model()
    expected = _train(
        reference, DelayedSync(reference, DELAY, compute_method=method, **SETTINGS), range(STEPS)
    )
    _assert_equal(actual, expected)
    undelayed = _model()
    plain = _train(
        undelayed, KFACPreconditioner(undelayed, compute_method=method, **SETTINGS), range(STEPS)
    )
    assert not torch.equal(actual[-1][0], plain[-1][0]), "the delay had no effect"


def test_before_the_first_update_arrives_the_gradient_stays_plain() -> None:
    model, plain_model = _model(), _model()
    pre = KFACPreconditioner(model, async_inverse=True, async_delay=DELAY, **SETTINGS)
    x, y = _batch(0)
    for m in (model, plain_model):
        nn.functional.cross_entropy(m(x), y).backward()
    pre.step()
    for p, q in zip(model.parameters(), plain_model.parameters(), strict=True):
        # Only the KL clip (a scalar) may scale the plain gradient.
        ratio = (p.grad / q.grad)[q.grad != 0]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-12)


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_resuming_while_an_update_is_pending_continues_bit_for_bit(method: str) -> None:
    kwargs = {"compute_method": method, "async_inverse": True, "async_delay": DELAY, **SETTINGS}
    model = _model()
    uninterrupted = _train(model, KFACPreconditioner(model, **kwargs), range(STEPS))

    first = _model()
    pre = KFACPreconditioner(first, **kwargs)
    _train(first, pre, range(4))  # inverse update launched at step 3, due at step 5
    state = pre.state_dict()
    assert [job["apply_step"] for job in state["async_pending"]] == [3 + DELAY]
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "kfac": state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = _model()
    resumed.load_state_dict(saved["model"])
    pre2 = KFACPreconditioner(resumed, **kwargs)
    pre2.load_state_dict(saved["kfac"])
    _assert_equal(_train(resumed, pre2, range(4, STEPS)), uninterrupted[4:])


def test_an_invalid_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="async_delay"):
        KFACPreconditioner(_model(), async_inverse=True, async_delay=0)


STRATEGIES = [(1.0, True), (0.5, True), (1.0, False)]  # COMM-OPT, MEM-OPT, per-factor COMM-OPT


def _rank_run(method: str) -> list[tuple[list, list]]:
    rank, out = dist.get_rank(), []
    for fraction, colocate in STRATEGIES:
        runs = []
        for delayed in (False, True):
            model = _model()
            ddp = nn.parallel.DistributedDataParallel(model)
            kwargs = {
                "grad_worker_fraction": fraction,
                "colocate_factors": colocate,
                "compute_method": method,
                **SETTINGS,
            }
            if delayed:
                pre = DelayedSync(ddp, DELAY, **kwargs)
            else:
                pre = KFACPreconditioner(ddp, async_inverse=True, async_delay=DELAY, **kwargs)
            runs.append(_train(ddp, pre, range(6), rank))
        out.append(tuple(runs))
    return out


@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_on_two_ranks_every_strategy_equals_the_delayed_synchronous_run(method: str) -> None:
    for rank_result in run_distributed(_rank_run, WORLD, method):
        for async_run, delayed_run in rank_result:
            _assert_equal(async_run, delayed_run)
