"""Learning-rate multipliers of the optimizer step t (0-based), stepped every iteration.

A schedule builder returns ``f(t) -> float``, the factor applied to `optim.lr` at step t
(before warmup). `lr_multiplier` adds the linear warmup shared by every schedule:
``start + (1 - start)·(t + 1)/W`` for t < W. Lengths in `ScheduleConfig` are in epochs or steps
(`unit`) and are converted with the run's steps per epoch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

from kfac_train.config import ScheduleConfig
from kfac_train.errors import UserError
from kfac_train.registry import SCHEDULES

Multiplier = Callable[[int], float]


def to_steps(length: float, unit: str, steps_per_epoch: int) -> float:
    """`length` epochs or steps, in (possibly fractional) optimizer steps."""
    if unit == "step":
        return float(length)
    if unit == "epoch":
        return float(length) * steps_per_epoch
    raise UserError(f"schedule.unit={unit!r}: choose epoch or step")


def _decay_window(
    cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int
) -> tuple[float, float]:
    """(first, last) step of the decay; it starts after the warmup at the earliest."""
    start = max(
        to_steps(cfg.decay_start, cfg.unit, steps_per_epoch),
        to_steps(cfg.warmup, cfg.unit, steps_per_epoch),
    )
    end = (
        float(total_steps)
        if cfg.decay_end is None
        else to_steps(cfg.decay_end, cfg.unit, steps_per_epoch)
    )
    if end <= start:
        raise UserError(
            f"schedule {cfg.name}: the decay ends (step {end:g}) before it starts "
            f"(step {start:g}); check schedule.decay_start/decay_end/warmup and the run length"
        )
    return start, end


@SCHEDULES.register("constant")
def constant(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> Multiplier:
    return lambda step: 1.0


@SCHEDULES.register("multistep")
def multistep(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> Multiplier:
    """``gamma ** (number of milestones <= t)``."""
    milestones = sorted(to_steps(m, cfg.unit, steps_per_epoch) for m in cfg.milestones)
    return lambda step: cfg.gamma ** bisect.bisect_right(milestones, step)


@SCHEDULES.register("poly")
def poly(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> Multiplier:
    """Osawa et al.: 1 until `decay_start`, then ``(1 - (t - s)/(e - s)) ** power`` to `e`."""
    start, end = _decay_window(cfg, total_steps, steps_per_epoch)

    def multiplier(step: int) -> float:
        progress = min(max((step - start) / (end - start), 0.0), 1.0)
        return cfg.final_factor + (1 - cfg.final_factor) * (1 - progress) ** cfg.power

    return multiplier


@SCHEDULES.register("cosine")
def cosine(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> Multiplier:
    """1 until `decay_start` (or the end of warmup), then a half cosine down to `final_factor`."""
    start, end = _decay_window(cfg, total_steps, steps_per_epoch)

    def multiplier(step: int) -> float:
        progress = min(max((step - start) / (end - start), 0.0), 1.0)
        return cfg.final_factor + (1 - cfg.final_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def lr_multiplier(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> Multiplier:
    """The schedule `cfg.name` with the linear warmup applied on top."""
    decay = SCHEDULES.build(cfg.name, cfg, total_steps, steps_per_epoch)
    warmup = to_steps(cfg.warmup, cfg.unit, steps_per_epoch)
    start = cfg.warmup_start_factor

    def multiplier(step: int) -> float:
        factor = decay(step)
        if step < warmup:
            factor *= start + (1 - start) * min(1.0, (step + 1) / warmup)
        return factor

    return multiplier
