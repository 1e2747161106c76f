"""Step functions for K-FAC hyperparameters that change at milestones (SC'20, KAISA).

Damping is multiplied by `damping_gamma` at each damping milestone; both update intervals are
multiplied by `interval_factor` at each interval milestone. Milestones are in `schedule.unit`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

from kfac_train.config import KFACConfig
from kfac_train.schedules.lr import to_steps


def stepped(base: float, milestones: Sequence[float], factor: float) -> Callable[[int], float]:
    """``base · factor ** (number of milestones <= step)``; milestones in steps."""
    ordered = sorted(milestones)
    return lambda step: base * factor ** bisect.bisect_right(ordered, step)


def kfac_hyperparameter_schedules(
    cfg: KFACConfig, unit: str, steps_per_epoch: int
) -> dict[str, Callable[[int], float] | float | int]:
    """`damping`, `factor_update_steps`, `inv_update_steps` as constants or step functions."""
    damping_steps = [to_steps(m, unit, steps_per_epoch) for m in cfg.damping_milestones]
    interval_steps = [to_steps(m, unit, steps_per_epoch) for m in cfg.interval_milestones]
    out: dict[str, Callable[[int], float] | float | int] = {
        "damping": cfg.damping,
        "factor_update_steps": cfg.factor_update_steps,
        "inv_update_steps": cfg.inv_update_steps,
    }
    if damping_steps:
        out["damping"] = stepped(cfg.damping, damping_steps, cfg.damping_gamma)
    if interval_steps:
        for key in ("factor_update_steps", "inv_update_steps"):
            scaled = stepped(float(getattr(cfg, key)), interval_steps, float(cfg.interval_factor))
            out[key] = lambda step, scaled=scaled: max(1, int(round(scaled(step))))
    return out
