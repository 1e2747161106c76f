"""Step phases 3 and 5: precondition the held gradients, then clip by KL and write ``.grad``.

Layers with equal shapes are preconditioned together (:class:`.batched.StackedPreconditioner`);
the KL-clip sum uses one dot product per layer (:func:`.batched.kl_terms`); :class:`KLClipMonitor`
keeps each step's scale and how often the clip acted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .batched import StackedPreconditioner, kl_terms


def precondition_all(
    blocks: dict[str, Any],
    grads: dict[str, torch.Tensor | None],
    holds: Callable[[str], bool],
    stacker: StackedPreconditioner,
) -> dict[str, torch.Tensor]:
    """The preconditioned gradient of every block: computed where this rank ``holds`` the block
    and has second-order data, the plain gradient (a copy) where it holds it without data, an
    empty buffer (received in phase 4) elsewhere. A missing gradient counts as zero."""
    out: dict[str, torch.Tensor] = {}
    work: dict[str, tuple[Any, torch.Tensor]] = {}
    for name, grad in grads.items():
        block = blocks[name]
        grad = grad if grad is not None else block.zero_grad()
        if not holds(name):
            out[name] = torch.empty_like(grad)
        elif block.has_second_order():
            work[name] = (block.method, grad)
        else:
            out[name] = grad.clone()  # no second-order data yet: plain gradient
    out.update(stacker(work))
    return {name: out[name] for name in grads}  # model order


def kl_scale(
    preconditioned: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    kl_clip: float | None,
    lr: float,
    device: torch.device,
) -> torch.Tensor:
    """``ν = min(1, sqrt(κ / (lr² |Σ_l ⟨V_l, ∇_l⟩|)))`` as a 0-d float64 tensor (1 without a
    clip or when the sum is 0); no host synchronisation."""
    if kl_clip is None:
        return torch.ones((), dtype=torch.float64, device=device)
    vg = kl_terms([(preconditioned[n], g) for n, g in grads.items()]).abs() * lr**2
    return torch.where(vg > 0, torch.sqrt(kl_clip / vg).clamp(max=1.0), torch.ones_like(vg))


class KLClipMonitor:
    """The KL clip's scale ``ν`` of every step, and its totals since the last :meth:`take`.

    ``last`` is the latest ``ν`` (a 0-d float64 tensor). The totals (sum of ``ν``, steps with
    ``ν < 1``) stay on the device, so a step costs no host synchronisation; :meth:`take` reads
    them once (for a log line) and starts a new window.
    """

    def __init__(self, device: torch.device) -> None:
        self.last = torch.ones((), dtype=torch.float64, device=device)
        self._totals = torch.zeros(2, dtype=torch.float64, device=device)
        self._steps = 0

    def add(self, scale: torch.Tensor) -> None:
        """Record one step's ``ν``."""
        self.last = scale
        self._totals += torch.stack([scale, (scale < 1).to(scale.dtype)])
        self._steps += 1

    def take(self) -> dict[str, float]:
        """``{"kl_scale_mean": mean ν, "kl_clipped_fraction": share of steps with ν < 1}`` over
        the steps since the last call (``{}`` if there were none), then a new window."""
        if self._steps == 0:
            return {}
        total, clipped = self._totals.tolist()
        steps = self._steps
        summary = {"kl_scale_mean": total / steps, "kl_clipped_fraction": clipped / steps}
        self._totals.zero_()
        self._steps = 0
        return summary
