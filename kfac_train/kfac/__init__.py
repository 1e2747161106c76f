"""Distributed K-FAC gradient preconditioning for PyTorch (standalone; no Hydra, no app).

>>> from kfac_train.kfac import KFACPreconditioner
>>> pre = KFACPreconditioner(model, factor_update_steps=10, inv_update_steps=100)
>>> loss.backward(); pre.step(); optimizer.step()

See ``docs/kfac.md`` for the arguments and conventions.
"""

from .assignment import (
    LayerPlacement,
    WorkPlan,
    plan_work,
    resolve_grad_worker_fraction,
)
from .comm import COMM_KINDS
from .kfac_layer import LayerShape
from .layers import LayerHandler, register_handler
from .memory_model import (
    Footprint,
    MemoryBudgetError,
    candidate_fractions,
    choose_grad_worker_fraction,
    predict_footprint,
)
from .preconditioner import KFACPreconditioner

__all__ = [
    "COMM_KINDS",
    "Footprint",
    "MemoryBudgetError",
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
]
