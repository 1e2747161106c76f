"""Hyperparameters that are either constants or functions of the optimizer step."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from .second_order import COMPUTE_METHODS

T = TypeVar("T", int, float)

#: A hyperparameter value: a constant or a function ``f(step) -> value``.
Scheduled = T | Callable[[int], T]


def resolve(value: Scheduled[T] | None, step: int) -> T | None:
    """Return the value of a (possibly scheduled) hyperparameter at ``step``."""
    if callable(value):
        return value(step)
    return value


def check_positive_interval(name: str, value: int, step: int) -> int:
    """Validate an update interval resolved at ``step``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int at step {step}, got {value!r}")
    return value


def is_due(interval: Scheduled[int], step: int, name: str) -> bool:
    """Whether an event with period ``interval`` happens at ``step`` (step 0 always does)."""
    period = check_positive_interval(name, resolve(interval, step), step)
    return step % period == 0


#: Default Tikhonov damping λ (the one place it is written; the app's default reads it too).
#: On the per-example convention's scale (docs/kfac.md): the best of 1e-3…3e-1 on the digits CNN
#: over 3 seeds (docs/kfac.md, "Factor conventions"); recipes tuned with "mean" set their own.
DEFAULT_DAMPING = 0.1


GRAD_SCALINGS = ("mean", "per_example")
CONV_FACTORS = ("patches", "spatial_mean")
BATCHNORM_MODES = ("skip", "unit_wise")
EMBEDDING_MODES = ("skip", "diagonal")
LAYERNORM_MODES = ("skip", "unit_wise")


def check_choices(
    *,
    compute_method: str,
    grad_scaling: str,
    conv_factor: str,
    batchnorm: str,
    embedding: str = "skip",
    layernorm: str = "skip",
    accumulation_steps: int,
    bucket_cap_mb: float,
) -> None:
    """The preconditioner's choice and count options; a ``ValueError`` naming the bad one."""
    for label, value, choices in (
        ("compute_method", compute_method, COMPUTE_METHODS),
        ("grad_scaling", grad_scaling, GRAD_SCALINGS),
        ("conv_factor", conv_factor, CONV_FACTORS),
        ("batchnorm", batchnorm, BATCHNORM_MODES),
        ("embedding", embedding, EMBEDDING_MODES),
        ("layernorm", layernorm, LAYERNORM_MODES),
    ):
        if value not in choices:
            raise ValueError(f"{label} must be one of {choices}, got {value!r}")
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
    if bucket_cap_mb <= 0:
        raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
