"""How blocks read and write parameter gradients, and a layer's gradient as a ``(g, a)`` matrix.

The preconditioner gives its blocks a :class:`GradAccess`: plain ``.grad`` tensors by default
(:class:`PlainGrads`), or :class:`~kfac_train.kfac.sharded.ShardedGrads` for FSDP2 ``DTensor``
gradients, which keeps the math modules free of ``torch.distributed``.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class GradAccess(Protocol):
    """How blocks read and write parameter gradients: plain ``.grad`` tensors here; the
    preconditioner passes :class:`~kfac_train.kfac.sharded.ShardedGrads` (FSDP2 ``DTensor``
    gradients: gathered on read, this rank's shard written), which keeps this module free of
    ``torch.distributed``."""

    def read(self, param: torch.Tensor) -> torch.Tensor | None: ...

    def write(self, param: torch.Tensor, full: torch.Tensor) -> None: ...


class PlainGrads:
    """``param.grad`` as it is (one process, DDP)."""

    def read(self, param: torch.Tensor) -> torch.Tensor | None:
        return param.grad

    def write(self, param: torch.Tensor, full: torch.Tensor) -> None:
        param.grad.copy_(full.reshape(param.grad.shape))


def grad_matrix(module: nn.Module, grads: GradAccess | None = None) -> torch.Tensor | None:
    """The layer gradient ``[∇W, ∇b]`` as a ``(g, a)`` matrix, or ``None`` without a gradient.

    Conv weights ``(out, C_in, kh, kw)`` flatten to ``(out, C_in·kh·kw)``, matching the column
    order of :func:`torch.nn.functional.unfold`. ``grads`` reads the gradients (plain ones by
    default).
    """
    grads = grads or PlainGrads()
    weight_grad = grads.read(module.weight)
    if weight_grad is None:
        return None
    grad = weight_grad.reshape(weight_grad.shape[0], -1)
    bias = getattr(module, "bias", None)
    bias_grad = grads.read(bias) if bias is not None else None
    if bias_grad is not None:
        grad = torch.cat([grad, bias_grad.reshape(-1, 1)], dim=1)
    elif bias is not None:
        grad = torch.cat([grad, torch.zeros_like(grad[:, :1])], dim=1)
    return grad


def write_grad_matrix(
    module: nn.Module, matrix: torch.Tensor, grads: GradAccess | None = None
) -> None:
    """Write a ``(g, a)`` matrix back into ``weight.grad`` (and ``bias.grad``) in place."""
    grads = grads or PlainGrads()
    weight = module.weight
    bias = getattr(module, "bias", None)
    n_weight_cols = weight.grad.numel() // weight.grad.shape[0]  # global shape under FSDP2
    grads.write(weight, matrix[:, :n_weight_cols])
    if bias is not None and bias.grad is not None:
        grads.write(bias, matrix[:, n_weight_cols])
