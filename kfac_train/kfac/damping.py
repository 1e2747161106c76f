"""Update-size controls: damping diagnostics and
Levenberg–Marquardt adaptive damping (Martens & Grosse 2015, §6.5).

* :func:`warn_if_swamped` — called where second-order data is computed (the eigenvalues or the
  factors are at hand): reports, rate-limited per layer, a damping more than
  :data:`SWAMP_RATIO` times the largest curvature of the layer's Kronecker block, i.e. a layer
  whose update is about ``gradient / damping`` (rescaled SGD).
* :class:`AdaptiveDamping` (the options) and :class:`DampingController` (the state): every
  ``interval`` steps the preconditioner saves the value of the quadratic model

      ``M(δ) = ∇ᵀδ + ½ δᵀ(F + λI)δ``,  ``F`` the K-FAC blocks ``A ⊗ G``,

  for the update ``δ = −lr·V`` it wrote (``V`` the clipped, preconditioned gradient); per layer
  ``δᵀ(A ⊗ G)δ = lr²·⟨G V A, V⟩`` (``vec`` stacks columns; ``V`` is ``(g, a)``). The caller
  evaluates the loss on the same batch before and after the optimizer step, and
  ``ρ = (L(θ + δ) − L(θ)) / M(δ)`` adapts ``λ``: ``ρ > 0.75`` → ``λ·ω``; ``ρ < 0.25`` →
  ``λ/ω``; ``ω = decay^interval``; clamped to ``[min_damping, max_damping]``.

This module is pure math: the preconditioner averages the losses over ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .diagnostics import RateLimitedWarner

#: Report a layer when ``damping > SWAMP_RATIO · max eig(A) · max eig(G)``.
SWAMP_RATIO = 100.0
#: Martens & Grosse's thresholds on the reduction ratio ρ.
RHO_LOW, RHO_HIGH = 0.25, 0.75


def warn_if_swamped(
    warner: RateLimitedWarner,
    layer: str,
    damping: float,
    top_A: torch.Tensor,
    top_G: torch.Tensor,
    bound: str = "max eig(A)·max eig(G)",
) -> None:
    """Queue the check ``damping > SWAMP_RATIO · top_A · top_G`` on the device (no host sync);
    :func:`report_swamped` reads every queued check with one sync per second-order update.
    ``top_*`` are the factors' largest eigenvalues, or an upper bound of them (``bound``)."""
    curvature = (top_A.double() * top_G.double()).reshape(())
    warner.pending.append((layer, damping, curvature, bound))


def report_swamped(warner: RateLimitedWarner) -> None:
    """Warn (rate-limited, per layer) for each queued check whose curvature the damping swamps:
    one host read for all layers."""
    pending, warner.pending = warner.pending, []
    if not pending:
        return
    curvatures = torch.stack([c.to(pending[0][2].device) for _, _, c, _ in pending]).tolist()
    for (layer, damping, _, bound), curvature in zip(pending, curvatures, strict=True):
        if not damping > SWAMP_RATIO * curvature:
            continue
        ratio = damping / curvature if curvature > 0 else math.inf
        warner.warn(
            "swamped curvature",
            layer,
            f"layer {layer!r}: damping={damping:g} swamps the curvature: it is {ratio:.3g}x "
            f"{bound} = {curvature:.3g} (more than {SWAMP_RATIO:g}x), so this layer's update is "
            "about gradient/damping; use grad_scaling='per_example' (the default) or a smaller "
            "damping",
        )


@dataclass(frozen=True)
class AdaptiveDamping:
    """Options of Levenberg–Marquardt damping (published defaults: ``interval=5``,
    ``decay=0.95``). ``min_damping`` / ``max_damping`` bound the adapted value."""

    interval: int = 5
    decay: float = 0.95
    min_damping: float = 1e-8
    max_damping: float = 1e2

    def __post_init__(self) -> None:
        if not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"damping_adapt_interval must be a positive int, got {self.interval}")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"damping_adapt_decay must be in (0, 1), got {self.decay}")
        if not 0.0 < self.min_damping <= self.max_damping:
            raise ValueError(
                f"need 0 < min_damping <= max_damping, got {self.min_damping}, {self.max_damping}"
            )

    @property
    def omega(self) -> float:
        """The factor ``ω = decay^interval`` applied per adaptation."""
        return self.decay**self.interval


def quadratic_model(
    blocks: dict[str, Any],
    grads: dict[str, torch.Tensor | None],
    updates: dict[str, torch.Tensor],
    lr: float,
    damping: float,
) -> torch.Tensor:
    """``M(δ)`` for ``δ = −lr·V`` over the Kronecker blocks (0-d float64 tensor, on the device).

    ``grads[n]`` is the layer gradient ``∇`` and ``updates[n]`` the written ``V`` (both
    ``(g, a)``); blocks without a gradient or without factors ``A``/``G`` are left out.
    """
    terms = []
    for name, grad in grads.items():
        block = blocks[name]
        if grad is None or not hasattr(block, "A"):
            continue
        V = updates[name].double()
        A, G = block.A.running.double(), block.G.running.double()
        curvature = ((G @ V) * (V @ A)).sum()  # ⟨G V A, V⟩, A and G symmetric
        linear = -lr * (V * grad.double()).sum()
        terms.append(linear + 0.5 * lr**2 * (curvature + damping * (V * V).sum()))
    if not terms:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack(terms).sum()


class DampingController:
    """The adapted damping and the quadratic-model value of the last due step."""

    def __init__(self, options: AdaptiveDamping, initial: float) -> None:
        self.options = options
        self.damping = min(max(float(initial), options.min_damping), options.max_damping)
        #: ``M(δ)`` saved by the last due step, until :meth:`update` consumes it.
        self.pending: torch.Tensor | None = None
        #: The last reduction ratio (``None`` before the first adaptation).
        self.last_rho: float | None = None

    def is_due(self, step: int) -> bool:
        """Steps ``interval − 1, 2·interval − 1, ...`` (the ``interval``-th of each period)."""
        return (step + 1) % self.options.interval == 0

    def record(
        self,
        blocks: dict[str, Any],
        grads: dict[str, torch.Tensor | None],
        preconditioned: dict[str, torch.Tensor],
        kl_scale: torch.Tensor,
        lr: float,
    ) -> None:
        """Save ``M(δ)`` of a due step; ``V = kl_scale · preconditioned`` is what was written."""
        updates = {n: v * kl_scale.to(v.dtype) for n, v in preconditioned.items()}
        self.pending = quadratic_model(blocks, grads, updates, lr, self.damping)

    def update_from_losses(self, comm: Any, loss_before: Any, loss_after: Any) -> float:
        """Average ``[loss_before, loss_after, M]`` over ranks with ``comm`` (a
        :class:`~kfac_train.kfac.comm.Communicator`; counted as ``factor_allreduce`` traffic:
        24 bytes) and :meth:`update`; every rank gets the same values, hence the same damping."""
        if self.pending is None:
            raise RuntimeError(
                "update_damping() needs a due step: call it after step() only when "
                "adaptive_damping_due() is true"
            )
        device = self.pending.device
        losses = [
            torch.as_tensor(v).to(device, torch.float64).reshape(())
            for v in (loss_before, loss_after)
        ]
        buffer = torch.stack([*losses, self.pending.reshape(())])
        comm.allreduce_sum(buffer, "factor_allreduce").wait()
        before, after, model = (buffer / comm.world_size).tolist()
        self.pending = None
        return self.update(before, after, model)

    def update(self, loss_before: float, loss_after: float, model: float) -> float:
        """Apply ``ρ = (loss_after − loss_before) / model``; returns the new damping. A
        non-finite loss, or a model that predicts no decrease, counts as a failed step."""
        if model == 0.0:
            return self.damping  # nothing was preconditioned: no evidence either way
        change = loss_after - loss_before
        rho = change / model if model < 0 and math.isfinite(change) else -math.inf
        self.last_rho = rho
        if rho > RHO_HIGH:
            self.damping *= self.options.omega
        elif rho < RHO_LOW:
            self.damping /= self.options.omega
        self.damping = min(max(self.damping, self.options.min_damping), self.options.max_damping)
        return self.damping


def make_controller(options: AdaptiveDamping | None, initial: float) -> DampingController | None:
    """The controller for ``options`` starting at ``initial``, or ``None`` (fixed damping)."""
    return None if options is None else DampingController(options, float(initial))


def _at(value: Any, step: int) -> Any:
    return value(step) if callable(value) else value


class DampingMixin:
    """The preconditioner's damping methods (``KFACPreconditioner`` inherits them). Uses its
    ``adaptive`` (a :class:`DampingController` or ``None``), ``damping``, ``lr``, ``steps``,
    ``blocks``, ``comm`` and ``kl_monitor``."""

    adaptive: DampingController | None
    kl_monitor: Any  # a precondition_phase.KLClipMonitor

    @property
    def last_kl_scale(self) -> torch.Tensor:
        """The last step's KL-clip scale ``ν`` (0-d float64; 1 when nothing was clipped)."""
        return self.kl_monitor.last

    def kl_clip_summary(self) -> dict[str, float]:
        """Mean ``ν`` and the share of steps the KL clip scaled down, since the last call (for
        a log line: one host synchronisation); ``{}`` if no step ran since."""
        return self.kl_monitor.take()

    def current_damping(self, step: int | None = None) -> float:
        """The damping in force: the adapted value, or ``damping`` at ``step`` (default: now)."""
        if self.adaptive is not None:
            return self.adaptive.damping
        return float(_at(self.damping, self.steps if step is None else step))

    def adaptive_damping_due(self) -> bool:
        """Whether the last ``step()`` saved a quadratic model: then evaluate the loss on the
        same batch after ``optimizer.step()`` and call :meth:`update_damping`."""
        return self.adaptive is not None and self.adaptive.pending is not None

    def update_damping(self, loss_before: Any, loss_after: Any) -> float:
        """Adapt the damping from this rank's losses (floats or 0-d tensors) on the batch before
        and after the update. A collective in distributed runs (every rank calls it; losses and
        model are averaged, so every rank decides alike). Returns the new damping."""
        if self.adaptive is None:
            raise RuntimeError("update_damping() needs adaptive_damping=AdaptiveDamping(...)")
        return self.adaptive.update_from_losses(self.comm, loss_before, loss_after)

    def _record_quadratic_model(
        self,
        step: int,
        grads: dict[str, torch.Tensor | None],
        preconditioned: dict[str, torch.Tensor],
    ) -> None:
        if self.adaptive is not None and self.adaptive.is_due(step):
            lr = float(_at(self.lr, step))
            self.adaptive.record(self.blocks, grads, preconditioned, self.last_kl_scale, lr)

    def _damping_state(self) -> dict[str, float]:
        """Checkpoint entry: ``{"damping": λ}`` while adapting, else nothing."""
        return {} if self.adaptive is None else {"damping": self.adaptive.damping}

    def _load_damping_state(self, state: dict[str, Any]) -> None:
        """Restore the adapted damping; states saved without it keep the initial value."""
        if self.adaptive is not None and "damping" in state:
            self.adaptive.damping = float(state["damping"])
