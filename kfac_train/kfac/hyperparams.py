"""Hyperparameters that are either constants or functions of the optimizer step."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

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
DEFAULT_DAMPING = 0.001
