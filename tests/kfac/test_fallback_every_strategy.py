"""A failed second-order update keeps the previous second-order data in every strategy.

Contract (docs/kfac.md, "Failures"): when a decomposition or inverse fails also in float64, the
layer keeps its previous second-order data — on every rank, whatever the strategy, placement or
compute method — and a warning names it. Step 0 computes the data from batch 0; at step 1 every
``torch.linalg`` routine raises, so step 1 must precondition with step 0's data, exactly as one
process accumulating the ranks' micro-batches does (``test_failure_recovery`` checks that one
against the dense oracle).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kfac_train.kfac import KFACPreconditioner

from .dist_utils import run_distributed

WORLD, LOCAL_BATCH = 2, 4
SETTINGS = {
    "damping": 1e-2,
    "factor_decay": 0.0,
    "kl_clip": None,
    "factor_dtype": torch.float64,
    "inv_dtype": torch.float64,
}
ROUTINES = ("eigh", "eigvalsh", "inv", "inv_ex", "cholesky", "cholesky_ex", "solve", "solve_ex")


def _raising(*args, **kwargs):
    raise torch.linalg.LinAlgError("injected: the algorithm failed to converge")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _shards(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(10 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, 5, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (WORLD * LOCAL_BATCH,), generator=generator)
    return list(zip(x.split(LOCAL_BATCH), y.split(LOCAL_BATCH), strict=True))


def _train(model: nn.Module, pre: KFACPreconditioner, shards_of, fail_at: int | None):
    """Two steps; returns the preconditioned gradients of step 1."""
    real = {name: getattr(torch.linalg, name) for name in ROUTINES}
    try:
        for step in range(2):
            if step == fail_at:
                for name in ROUTINES:
                    setattr(torch.linalg, name, _raising)
            model.zero_grad()
            shards = shards_of(step)
            for x, y in shards:
                (nn.functional.cross_entropy(model(x), y) / len(shards)).backward()
            pre.step()
    finally:
        for name, routine in real.items():
            setattr(torch.linalg, name, routine)
    return [p.grad.detach().clone() for p in model.parameters()]


def _rank_run(configs: list[tuple[str, bool, str]]) -> list[list[torch.Tensor]]:
    """Every configuration in one spawn of the ranks (spawning dominates the test's time)."""
    rank, results = dist.get_rank(), []
    for fraction, colocate, method in configs:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        pre = KFACPreconditioner(
            ddp,
            grad_worker_fraction=fraction,
            colocate_factors=colocate,
            compute_method=method,
            **SETTINGS,
        )
        results.append(_train(ddp, pre, lambda step: [_shards(step)[rank]], fail_at=1))
    return results


def _one_process(method: str, fail_at: int | None) -> list[torch.Tensor]:
    model = _model()
    pre = KFACPreconditioner(model, accumulation_steps=WORLD, compute_method=method, **SETTINGS)
    with pytest.warns(RuntimeWarning) if fail_at is not None else _nothing():
        return _train(model, pre, _shards, fail_at)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


CONFIGS = [
    ("comm-opt", True, "eigen"),
    ("comm-opt", False, "eigen"),  # the per-factor path, which used to fall to the plain gradient
    ("comm-opt", False, "inverse"),
    ("hybrid-opt", True, "inverse"),
    ("mem-opt", True, "eigen"),
    ("mem-opt", True, "inverse"),
]


def test_a_failed_update_keeps_the_previous_data_on_every_rank_in_every_strategy() -> None:
    expected = {}
    for method in ("eigen", "inverse"):
        stale, fresh = _one_process(method, fail_at=1), _one_process(method, fail_at=None)
        assert any(
            not torch.allclose(s, f, rtol=1e-3, atol=0) for s, f in zip(stale, fresh, strict=True)
        ), "the test cannot tell stale from fresh second-order data"
        expected[method] = stale
    per_rank = run_distributed(_rank_run, WORLD, CONFIGS)
    for rank, results in enumerate(per_rank):
        for config, grads in zip(CONFIGS, results, strict=True):
            for got, want in zip(grads, expected[config[2]], strict=True):
                torch.testing.assert_close(
                    got, want, rtol=1e-10, atol=1e-12, msg=f"rank {rank}, {config}"
                )


MIXED = {**SETTINGS, "inv_dtype": torch.float32}


def _mixed_dtype_rank_run() -> list[torch.Tensor]:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    pre = KFACPreconditioner(ddp, colocate_factors=False, **MIXED)
    rank = dist.get_rank()
    return _train(ddp, pre, lambda step: [_shards(step)[rank]], fail_at=None)


def test_split_factors_with_float64_factors_and_float32_data_match_one_process() -> None:
    """The per-factor parts travel in the factors' compute dtype whatever ``inv_dtype`` is."""
    model = _model()
    pre = KFACPreconditioner(model, accumulation_steps=WORLD, **MIXED)
    expected = _train(model, pre, _shards, fail_at=None)
    for rank, grads in enumerate(run_distributed(_mixed_dtype_rank_run, WORLD)):
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9, msg=f"rank {rank}")
