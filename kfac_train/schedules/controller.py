"""Applies a learning-rate multiplier (and optionally a tied momentum) to an optimizer."""

from __future__ import annotations

import torch

from kfac_train.schedules.lr import Multiplier


class ScheduleController:
    """Sets every param group's lr to ``base_lr · f(step)`` before each optimizer step.

    With `momentum_tied`, the momentum follows the rate (Osawa et al.):
    ``m(step) = base_momentum · f(step)`` — the "momentum" of SGD/LARS groups, or the first
    beta of Adam-style groups. The controller holds no state besides the base values, so a
    checkpoint only needs the step.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, multiplier: Multiplier, momentum_tied: bool
    ) -> None:
        self.optimizer = optimizer
        self.multiplier = multiplier
        self.momentum_tied = momentum_tied
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.base_momenta = [
            group.get("momentum", group["betas"][0] if "betas" in group else None)
            for group in optimizer.param_groups
        ]

    def apply(self, step: int) -> float:
        """Set lr (and tied momentum) for optimizer step `step`; returns the first group's lr."""
        factor = self.multiplier(step)
        for group, base_lr, base_momentum in zip(
            self.optimizer.param_groups, self.base_lrs, self.base_momenta, strict=True
        ):
            group["lr"] = base_lr * factor
            if self.momentum_tied and base_momentum is not None:
                if "momentum" in group:
                    group["momentum"] = base_momentum * factor
                else:
                    group["betas"] = (base_momentum * factor, group["betas"][1])
        return self.optimizer.param_groups[0]["lr"]

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])
