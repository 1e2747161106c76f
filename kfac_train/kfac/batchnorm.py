"""Unit-wise natural gradient for BatchNorm (Osawa et al., SP-NGD §4.2.1).

For each channel ``c`` the Fisher block of ``(γ_c, β_c)`` is the 2×2 matrix of per-example
gradient moments ``F_c = mean_n [u_n u_nᵀ]``, ``u_n = (Σ_s g_{n,c,s} x̂_{n,c,s}, Σ_s g_{n,c,s})``
(``s`` runs over the spatial positions, ``x̂`` is the normalised input, ``g`` the output gradient);
the block machinery is :mod:`.unit_wise`'s, shared with LayerNorm.

:class:`BatchNormHandler` is registered for ``_BatchNorm`` in the handler registry.
``nn.SyncBatchNorm`` on more than one rank is refused: it normalises with statistics over all
ranks, which :func:`normalised_input` (local statistics) would not reproduce.
"""

from __future__ import annotations

import torch
from torch import nn

from . import precision
from .layers import HandlerOptions, register_handler
from .unit_wise import UnitWiseBlock, UnitWiseInverse


def normalised_input(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``x̂`` of a training-mode forward: ``x`` normalised with its own batch statistics."""
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + module.eps)


class UnitWiseBatchNorm(UnitWiseBlock):
    """K-FAC state of one affine BatchNorm layer with ``C`` channels (input ``(B, C, ...)``)."""

    state_section = "batchnorm"

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        return normalised_input(self.module, x)

    def per_example(self, t: torch.Tensor) -> torch.Tensor:
        spatial = list(range(2, t.dim()))
        return t.sum(dim=spatial) if spatial else t


class BatchNormHandler:
    """Registers affine BatchNorm layers as unit-wise blocks when ``batchnorm="unit_wise"``."""

    def configure(self, options: HandlerOptions) -> BatchNormHandler | None:
        return self if options.batchnorm == "unit_wise" else None

    def skip_reason(self, module: nn.Module) -> str | None:
        return None if module.affine else "BatchNorm without affine parameters"

    def make_block(
        self, name: str, module: nn.Module, options: HandlerOptions
    ) -> UnitWiseBatchNorm:
        if isinstance(module, nn.SyncBatchNorm) and options.world_size > 1:
            raise ValueError(
                f"K-FAC batchnorm='unit_wise' cannot precondition nn.SyncBatchNorm layer {name!r} "
                f"on {options.world_size} ranks: it normalises with statistics over all ranks, "
                "which the unit-wise blocks (local statistics) would not match; use "
                "batchnorm='skip' or per-rank nn.BatchNorm layers"
            )
        # float32 blocks for 16-bit factor dtypes (precision.py)
        storage = precision.factor_storage_dtype(options.factor_dtype)
        return UnitWiseBatchNorm(name, module, storage, options.grads)


register_handler(nn.modules.batchnorm._BatchNorm, BatchNormHandler())

__all__ = ["BatchNormHandler", "UnitWiseBatchNorm", "UnitWiseInverse", "normalised_input"]
