"""The preconditioner applied between ``backward()`` and ``optimizer.step()``.

Baselines get `NoPreconditioner`, K-FAC runs get `kfac_train.kfac.KFACPreconditioner`; both
offer the same methods, so the engine has no optimizer-specific branches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from kfac_train.config import KFACConfig, StrategyConfig
from kfac_train.errors import UserError
from kfac_train.kfac.precision import DTYPES, dtype_problem
from kfac_train.schedules.kfac_hparams import kfac_hyperparameter_schedules


class Preconditioner(Protocol):
    """What the engine calls; `KFACPreconditioner` implements it (docs/kfac.md)."""

    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def comm_bytes(self) -> dict[str, dict[str, int]]: ...

    def memory_bytes(self, transient: bool = False) -> dict[str, int]: ...

    def adaptive_damping_due(self) -> bool: ...

    def update_damping(self, loss_before: Any, loss_after: Any) -> float: ...


class NoPreconditioner:
    """The identity preconditioner of first-order baselines: gradients pass unchanged."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])

    def comm_bytes(self) -> dict[str, dict[str, int]]:
        return {"step": {}, "total": {}}

    def memory_bytes(self, transient: bool = False) -> dict[str, int]:
        return {}

    def adaptive_damping_due(self) -> bool:
        return False

    def update_damping(self, loss_before: Any, loss_after: Any) -> float:
        raise RuntimeError("first-order baselines have no damping")


def dtype_of(name: str, key: str, kfac: KFACConfig | None = None) -> torch.dtype:
    """The torch dtype named by option `key`; unknown or unsafe choices (the library's dtype
    policy, kfac_train/kfac/precision.py) stop with one line naming the safe choice."""
    if name not in DTYPES:
        raise UserError(f"{key}={name!r}: choose one of {', '.join(DTYPES)}")
    context = (
        {}
        if kfac is None
        else {"compute_method": kfac.compute_method, "factored_damping": kfac.factored_damping}
    )
    problem = dtype_problem(key.rsplit(".", 1)[-1], DTYPES[name], **context)
    if problem is not None:
        raise UserError(f"{key}={name}: {problem}")
    return DTYPES[name]


def factor_decay_schedule(decay: float, init: str) -> float | Callable[[int], float]:
    """``kfac.factor_decay`` as the library takes it: the constant, or with
    ``factor_init=first_batch`` a schedule that is 0 at step 0 (always a factor-update step), so
    the first statistics replace the identity the running averages start from."""
    if init == "identity":
        return decay
    return lambda step: 0.0 if step == 0 else decay


def build_preconditioner(
    kind: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    kfac: KFACConfig,
    strategy: StrategyConfig,
    schedule_unit: str,
    steps_per_epoch: int,
    accumulation_steps: int,
    grad_scaler: torch.amp.GradScaler | None,
) -> Preconditioner:
    """`NoPreconditioner` for ``kind="none"``, K-FAC over `model` for ``kind="kfac"``.

    The settings were validated with the config (`kfac_train.validation`); the library checks
    its arguments again.
    """
    if kind == "none":
        return NoPreconditioner()
    if kind != "kfac":
        raise UserError(f"optim.preconditioner={kind!r}: choose none or kfac")
    from kfac_train.kfac import AdaptiveDamping, KFACPreconditioner, MemoryBudgetError

    budget = _memory_budget_bytes(strategy)
    hyper = kfac_hyperparameter_schedules(kfac, schedule_unit, steps_per_epoch)
    scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
    try:
        return KFACPreconditioner(
            model,
            factor_update_steps=hyper["factor_update_steps"],
            inv_update_steps=hyper["inv_update_steps"],
            damping=hyper["damping"],
            factor_decay=factor_decay_schedule(kfac.factor_decay, kfac.factor_init),
            kl_clip=kfac.kl_clip,
            lr=lambda step: optimizer.param_groups[0]["lr"],
            compute_method=kfac.compute_method,
            factored_damping=kfac.factored_damping,
            batchnorm=kfac.batchnorm,
            embedding=kfac.embedding,
            layernorm=kfac.layernorm,
            conv_factor=kfac.conv_factor,
            accumulation_steps=accumulation_steps,
            grad_scaler=scaler,
            factor_dtype=dtype_of(kfac.factor_dtype, "kfac.factor_dtype"),
            inv_dtype=dtype_of(kfac.inv_dtype, "kfac.inv_dtype", kfac),
            precondition_dtype=dtype_of(kfac.precondition_dtype, "kfac.precondition_dtype", kfac)
            if kfac.precondition_dtype
            else None,
            skip_layers=tuple(kfac.skip_layers),
            grad_scaling=kfac.grad_scaling,
            grad_worker_fraction=strategy.grad_worker_fraction,
            memory_budget_bytes=budget,
            bucket_cap_mb=strategy.bucket_cap_mb,
            symmetry_aware=strategy.symmetry_aware,
            comm_dtype=dtype_of(strategy.comm_dtype, "strategy.comm_dtype")
            if strategy.comm_dtype
            else None,
            colocate_factors=strategy.colocate_factors,
            assignment_cost=strategy.assignment_cost,
            overlap_comm=strategy.overlap_comm,
            stale=kfac.stale,
            stale_threshold=kfac.stale_threshold,
            adaptive_damping=AdaptiveDamping(
                interval=kfac.damping_adapt_interval,
                decay=kfac.damping_adapt_decay,
                min_damping=kfac.min_damping,
                max_damping=kfac.max_damping,
            )
            if kfac.adaptive_damping
            else None,
            async_inverse=kfac.async_inverse,
            async_delay=kfac.async_delay,
        )
    except MemoryBudgetError as error:
        raise UserError(
            f"strategy.memory_budget_mb={strategy.memory_budget_mb}: too small; K-FAC needs at "
            f"least {error.smallest_feasible_bytes / 2**20:.3f} MiB per rank for this model on "
            f"{error.world_size} rank(s): raise strategy.memory_budget_mb"
        ) from None


def _memory_budget_bytes(strategy: StrategyConfig) -> int | None:
    """`strategy.memory_budget_mb` in bytes; required (and only allowed) with fraction auto."""
    auto = strategy.grad_worker_fraction == "auto"
    budget = strategy.memory_budget_mb
    if auto and (budget is None or budget <= 0):
        raise UserError(
            f"strategy.memory_budget_mb={budget}: strategy=auto needs the K-FAC memory budget per "
            "rank in MiB, e.g. strategy.memory_budget_mb=512"
        )
    if not auto and budget is not None:
        raise UserError(
            f"strategy.memory_budget_mb={budget} is only used by strategy=auto (the strategy "
            f"has grad_worker_fraction={strategy.grad_worker_fraction}): use strategy=auto"
        )
    return int(budget * 2**20) if auto else None
