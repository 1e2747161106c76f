"""Layer-wise grafting: K-FAC's direction with the base optimizer's step length (`kfac.graft`).

For every tensor ``θ`` that K-FAC preconditions (the weight and bias of each registered block)
one optimizer step becomes

    Δθ = −‖Δ_base‖ · V / ‖V‖,

where ``V`` is K-FAC's preconditioned gradient of ``θ`` and ``Δ_base`` the update the base
optimizer (LAMB, SGD, ...) makes from the *plain* gradient (Agarwal et al., "Disentangling
Adaptive Gradient Methods from Learning Rates", 2020; distributed Shampoo grafts its direction
the same way). Every other parameter takes the base optimizer's update unchanged. The base
optimizer keeps its state on the plain gradients, so its step-length schedule (warm-up, Adam
normalisation, trust ratio) is the tuned baseline's, and K-FAC decides only where each tensor
moves. Why: an adaptive base optimizer applied *after* the preconditioner (``optim=kfac`` without
grafting) normalises K-FAC's direction away per coordinate (docs/convergence.md, BERT).

The base step's weight decay contributes to the length only: the direction is K-FAC's ``V``
(which carries no decay), as in grafting's published form.

Grafting keeps no state of its own (checkpoints and resume are unchanged). A skipped base step
(AMP's GradScaler on an overflow) leaves ``θ`` where it was: the step length is then 0. Every rank
computes the same thing from the same preconditioned gradients, so the ranks stay identical.
Cost per step: a copy of the plain gradient, of ``V`` and of ``θ`` for the grafted tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch


class LayerwiseGraft:
    """Grafts K-FAC's direction onto the base optimizer's per-tensor step length.

    Args:
        tensors: the parameters K-FAC preconditions; a tensor without a gradient in a step is
            left to the base optimizer.
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)

    @classmethod
    def for_preconditioner(cls, preconditioner: Any) -> LayerwiseGraft:
        """The weights and biases of every block of a `KFACPreconditioner`."""
        return cls(list(_block_parameters(preconditioner.blocks.values())))

    def step(self, precondition: Callable[[], None], base_step: Callable[[], Any]) -> None:
        """One optimizer step: ``precondition()`` turns the ``.grad`` of the grafted tensors
        into K-FAC's ``V``; ``base_step()`` (e.g. ``lambda: scaler.step(optimizer)``) then
        runs on the plain gradients, and each grafted tensor is moved by the base step's length
        along ``-V``."""
        live = [t for t in self.tensors if t.grad is not None]
        plain = [t.grad.clone() for t in live]
        precondition()
        directions = [t.grad.clone() for t in live]
        for tensor, grad in zip(live, plain, strict=True):
            tensor.grad.copy_(grad)
        before = [t.detach().clone() for t in live]
        base_step()
        with torch.no_grad():
            for tensor, start, direction in zip(live, before, directions, strict=True):
                length = torch.linalg.vector_norm(tensor - start)
                norm = torch.linalg.vector_norm(direction)
                # A zero V has no direction: the tensor stays at its start.
                scale = torch.where(norm > 0, length / norm.clamp_min(1e-38), 0.0)
                tensor.copy_(start - scale * direction.to(start.dtype))


def _block_parameters(blocks: Iterable[Any]) -> Iterable[torch.Tensor]:
    seen: set[int] = set()
    for block in blocks:
        for name in ("weight", "bias"):
            tensor = getattr(block.module, name, None)
            if tensor is not None and tensor.requires_grad and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor


__all__ = ["LayerwiseGraft"]
