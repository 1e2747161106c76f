"""The preconditioner applied between ``backward()`` and ``optimizer.step()``.

Baselines get `NoPreconditioner`, K-FAC runs get `kfac_train.kfac.KFACPreconditioner`; both
offer the same methods, so the engine has no optimizer-specific branches.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from kfac_train.config import DTYPES as DTYPE_NAMES
from kfac_train.config import KFACConfig, StrategyConfig
from kfac_train.errors import UserError
from kfac_train.schedules.kfac_hparams import kfac_hyperparameter_schedules

#: The dtype names a config may give (`kfac_train.config.DTYPES`) and their torch dtypes.
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_NAMES}


class Preconditioner(Protocol):
    """What the engine calls; `KFACPreconditioner` implements it (docs/kfac.md)."""

    def step(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def comm_bytes(self) -> dict[str, dict[str, int]]: ...

    def memory_bytes(self) -> dict[str, int]: ...


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

    def memory_bytes(self) -> dict[str, int]:
        return {}


def dtype_of(name: str, key: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"{key}={name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


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
    from kfac_train.kfac import KFACPreconditioner

    hyper = kfac_hyperparameter_schedules(kfac, schedule_unit, steps_per_epoch)
    return KFACPreconditioner(
        model,
        factor_update_steps=hyper["factor_update_steps"],
        inv_update_steps=hyper["inv_update_steps"],
        damping=hyper["damping"],
        factor_decay=kfac.factor_decay,
        kl_clip=kfac.kl_clip,
        lr=lambda step: optimizer.param_groups[0]["lr"],
        compute_method=kfac.compute_method,
        factored_damping=kfac.factored_damping,
        batchnorm=kfac.batchnorm,
        conv_factor=kfac.conv_factor,
        accumulation_steps=accumulation_steps,
        grad_scaler=grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None,
        factor_dtype=dtype_of(kfac.factor_dtype, "kfac.factor_dtype"),
        inv_dtype=dtype_of(kfac.inv_dtype, "kfac.inv_dtype"),
        skip_layers=tuple(kfac.skip_layers),
        grad_scaling=kfac.grad_scaling,
        grad_worker_fraction=strategy.grad_worker_fraction,
        bucket_cap_mb=strategy.bucket_cap_mb,
        symmetry_aware=strategy.symmetry_aware,
        comm_dtype=dtype_of(strategy.comm_dtype, "strategy.comm_dtype")
        if strategy.comm_dtype
        else None,
        colocate_factors=strategy.colocate_factors,
        assignment_cost=strategy.assignment_cost,
        overlap_comm=strategy.overlap_comm,
    )
