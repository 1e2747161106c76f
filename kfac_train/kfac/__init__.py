"""Distributed K-FAC gradient preconditioning for PyTorch (standalone; no Hydra, no app).

>>> from kfac_train.kfac import KFACPreconditioner
>>> pre = KFACPreconditioner(model, factor_update_steps=10, inv_update_steps=100)
>>> loss.backward(); pre.step(); optimizer.step()

See ``docs/kfac.md`` for the arguments and conventions.
"""

from .assignment import (
    STRATEGY_NAMES,
    LayerPlacement,
    LayerShape,
    WorkPlan,
    plan_work,
    resolve_grad_worker_fraction,
    validate_grad_worker_fraction,
)
from .auto_strategy import MemoryBudgetError, choose_grad_worker_fraction
from .comm import COMM_KINDS
from .damping import AdaptiveDamping
from .hyperparams import DEFAULT_DAMPING
from .layers import LayerHandler, register_handler
from .memory_model import Footprint, candidate_fractions, predict_footprint
from .preconditioner import KFACPreconditioner

__all__ = [
    "AdaptiveDamping",
    "COMM_KINDS",
    "DEFAULT_DAMPING",
    "Footprint",
    "MemoryBudgetError",
    "STRATEGY_NAMES",
    "KFACPreconditioner",
    "LayerHandler",
    "LayerPlacement",
    "LayerShape",
    "WorkPlan",
    "candidate_fractions",
    "choose_grad_worker_fraction",
    "plan_work",
    "predict_footprint",
    "register_handler",
    "resolve_grad_worker_fraction",
    "validate_grad_worker_fraction",
]
