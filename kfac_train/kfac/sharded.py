"""Gradients of sharded parameters (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Under FSDP2 a parameter and its ``.grad`` are ``DTensor`` shards (``Shard(0)`` over the
data-parallel mesh), while a layer's forward inputs and output gradients (what the K-FAC hooks
see) are full per rank, so factors stay data-parallel exactly as under DDP. K-FAC needs the whole
layer gradient: :func:`full_grad` all-gathers it (every rank of the mesh takes part, so every rank
calls it for the same parameters in the same order), and :func:`write_grad` writes back this
rank's shard of the preconditioned gradient, which every rank holds in full, without
communication. Plain tensors pass through unchanged (DDP or one process).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def is_sharded(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter or gradient)."""
    return isinstance(tensor, DTensor)


def full_grad(param: torch.Tensor) -> torch.Tensor | None:
    """``param.grad`` as a full, plain tensor (an all-gather when sharded), or ``None``."""
    grad = param.grad
    if grad is None:
        return None
    return grad.full_tensor() if isinstance(grad, DTensor) else grad


def write_grad(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy ``full`` (the whole gradient, the same on every rank) into ``param.grad`` in place:
    all of it for a plain tensor, this rank's shard for a ``DTensor`` (sliced locally)."""
    grad = param.grad
    if not isinstance(grad, DTensor):
        grad.copy_(full.reshape(grad.shape))
        return
    # src_data_rank=None: every rank already holds the full tensor and just keeps its own piece.
    shard = distribute_tensor(
        full.reshape(grad.shape).to(grad.dtype),
        grad.device_mesh,
        grad.placements,
        src_data_rank=None,
    )
    grad.to_local().copy_(shard.to_local())


class ShardedGrads:
    """The :class:`~kfac_train.kfac.grads.GradAccess` the preconditioner gives its blocks:
    :func:`full_grad` on read, :func:`write_grad` on write (plain tensors pass through)."""

    def read(self, param: torch.Tensor) -> torch.Tensor | None:
        return full_grad(param)

    def write(self, param: torch.Tensor, full: torch.Tensor) -> None:
        write_grad(param, full)
