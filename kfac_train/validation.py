"""Config-time validation of a composed `RunConfig`: every bad value refused in one line.

`validate(config)` runs before anything is built or written (``train.py`` calls it from a Hydra
callback, before the run directory is made; `kfac_train.app.train` calls it again for Python
callers and sweep jobs). It raises `UserError` with one line that names the key, the bad value
and what is allowed, e.g. ``kfac.damping=-1.0 is not allowed: must be > 0``.

What is checked:

- every field declared with `kfac_train.config.one_of` / `within` (choices and numeric ranges,
  lists element by element, milestones in ascending order), in every node, the per-option
  model/data/task schemas included;
- names that live in registries: ``optim.base``, ``schedule.name``, ``logger.name``;
- ``strategy.grad_worker_fraction`` with the K-FAC library's own validator
  (`kfac_train.kfac.resolve_grad_worker_fraction`);
- the rules that relate fields: ``kfac.inv_update_steps`` a multiple of
  ``kfac.factor_update_steps``; ``kfac.skip_layers`` valid regular expressions; the global
  batch split into ``trainer.micro_batch`` x ranks (`kfac_train.engine.batching.plan_batches`);
  ``kfac.fisher=mc`` only with a task that samples labels (`Task.samples_fisher`);
  ``schedule.decay_end`` after ``schedule.decay_start``; a run length
  (``trainer.max_steps``/``max_epochs``); ``trainer.target_value`` with ``target_metric``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from kfac_train.cli import launched_world_size
from kfac_train.config import KFACConfig, Range, RunConfig
from kfac_train.engine.batching import plan_batches
from kfac_train.errors import UserError
from kfac_train.kfac import resolve_grad_worker_fraction
from kfac_train.registry import LOGGERS, OPTIMIZERS, SCHEDULES, TASKS


def show(value: Any) -> str:
    """A value as a user would type it on the command line."""
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    return str(value)


def refuse(key: str, value: Any, rule: str) -> UserError:
    return UserError(f"{key}={show(value)} is not allowed: {rule}")


def check_fields(node: Any, prefix: str) -> None:
    """Check every field of dataclass `node` (recursively) against its declared choices/range."""
    for spec in dataclasses.fields(node):
        value = getattr(node, spec.name)
        key = f"{prefix}.{spec.name}" if prefix else spec.name
        if dataclasses.is_dataclass(value):
            check_fields(value, key)
            continue
        if value is None:
            continue
        choices = spec.metadata.get("choices")
        if choices is not None and value not in choices:
            raise refuse(key, value, f"choose one of {', '.join(choices)}")
        allowed: Range | None = spec.metadata.get("range")
        if allowed is None:
            continue
        values = list(value) if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise refuse(key, value, f"give numbers {allowed}")
            if not allowed.admits(item):
                bounded = allowed.low is not None or allowed.high is not None
                finite = "a finite number " if bounded and not math.isfinite(item) else ""
                rule = f"must be {finite}{allowed}"
                raise refuse(key, value, f"every value {rule}" if isinstance(value, list) else rule)
        if spec.metadata.get("ascending") and values != sorted(values):
            raise refuse(key, value, "milestones must be in ascending order")


def check_kfac(kfac: KFACConfig) -> None:
    factor, inverse = kfac.factor_update_steps, kfac.inv_update_steps
    if inverse % factor:
        raise UserError(
            f"kfac.inv_update_steps={inverse} is not allowed: it must be a multiple of "
            f"kfac.factor_update_steps={factor} (e.g. {factor * max(1, round(inverse / factor))})"
        )
    if kfac.adaptive_damping and kfac.min_damping > kfac.max_damping:
        raise refuse(
            "kfac.min_damping", kfac.min_damping, f"must be <= kfac.max_damping={kfac.max_damping}"
        )
    if kfac.adaptive_damping and kfac.damping_milestones:
        raise refuse(
            "kfac.damping_milestones",
            list(kfac.damping_milestones),
            "must be empty with kfac.adaptive_damping=true (the damping is adapted instead)",
        )
    for pattern in kfac.skip_layers:
        try:
            re.compile(pattern)
        except re.error as error:
            rule = f"{pattern!r} is not a regular expression ({error})"
            raise refuse("kfac.skip_layers", list(kfac.skip_layers), rule) from None


def check_grad_worker_fraction(value: float | str, world_size: int) -> None:
    """The library's validator decides (fractions in (0, 1] and the strategy names); "auto" is
    resolved by the library from ``strategy.memory_budget_mb`` when the model is known."""
    if isinstance(value, str) and value.lower() == "auto":
        return
    try:
        resolve_grad_worker_fraction(value, world_size)
    except (ValueError, TypeError) as error:
        raise refuse("strategy.grad_worker_fraction", value, str(error)) from None


def check_registered(config: RunConfig) -> None:
    for key, name, registry in (
        ("optim.base", config.optim.base, OPTIMIZERS),
        ("schedule.name", config.schedule.name, SCHEDULES),
        ("logger.name", config.logger.name, LOGGERS),
    ):
        if name not in registry:
            raise refuse(key, name, f"choose one of {', '.join(registry.names())}")


def check_fisher(config: RunConfig) -> None:
    """``kfac.fisher=mc`` needs a task that can sample labels from its predictions."""
    if config.optim.preconditioner != "kfac" or config.kfac.fisher != "mc":
        return
    task = config.task.name
    if not TASKS.get(task).samples_fisher():
        raise UserError(
            f"kfac.fisher=mc: task={task} has no rule to sample labels from its predictive "
            "distribution; use kfac.fisher=empirical"
        )


def check_graft(config: RunConfig) -> None:
    """``kfac.graft`` moves whole tensors by the base optimizer's step length: it needs K-FAC,
    unsharded (DDP) parameters and a fixed damping (adaptive damping models the step -lr·V)."""
    if not config.kfac.graft:
        return
    if config.optim.preconditioner != "kfac":
        raise UserError(
            f"kfac.graft=true grafts K-FAC's direction, but optim.preconditioner="
            f"{config.optim.preconditioner}: use optim=kfac or kfac.graft=false"
        )
    if config.trainer.parallelism != "ddp":
        raise UserError(
            f"kfac.graft=true needs whole parameters on every rank, but trainer.parallelism="
            f"{config.trainer.parallelism} shards them: use trainer.parallelism=ddp"
        )
    if config.kfac.adaptive_damping:
        raise UserError(
            "kfac.graft=true with kfac.adaptive_damping=true: the damping's quadratic model "
            "predicts the step -lr·V, but grafting takes the base optimizer's step length; "
            "set one of them to false"
        )


def check_run(config: RunConfig, world_size: int) -> None:
    plan_batches(config.batch.size, config.trainer.micro_batch, world_size)
    trainer, schedule = config.trainer, config.schedule
    if trainer.max_steps is None and trainer.max_epochs is None:
        raise UserError("set trainer.max_steps or trainer.max_epochs (the run has no end)")
    if trainer.target_metric is not None and trainer.target_value is None:
        raise UserError(
            f"trainer.target_metric={trainer.target_metric} needs trainer.target_value=<number>"
        )
    if schedule.decay_end is not None and schedule.decay_end <= schedule.decay_start:
        raise refuse(
            "schedule.decay_end",
            schedule.decay_end,
            f"must be after schedule.decay_start={schedule.decay_start}",
        )


def validate(config: RunConfig, world_size: int | None = None) -> None:
    """Raise `UserError` (one line) for the first value of `config` that is not allowed.

    Args:
        config: the composed, typed configuration.
        world_size: ranks of the run (None = from the launcher's environment, see
            `kfac_train.cli.launched_world_size`).
    """
    world = launched_world_size() if world_size is None else world_size
    check_fields(config, "")
    check_registered(config)
    check_kfac(config.kfac)
    check_fisher(config)
    check_graft(config)
    check_grad_worker_fraction(config.strategy.grad_worker_fraction, world)
    check_run(config, world)
