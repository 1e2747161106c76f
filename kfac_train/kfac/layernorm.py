"""Unit-wise natural gradient for LayerNorm's scale and shift (``layernorm="unit_wise"``).

The approximation is SP-NGD's unit-wise one for BatchNorm (§4.2.1; machinery in
:mod:`.unit_wise`), applied per feature: for each of the ``C = prod(normalized_shape)`` features,
the Fisher block of ``(γ_c, β_c)`` is ``F_c = mean_n [u_{n,c} u_{n,c}ᵀ]`` with example ``n``'s
gradient ``u_{n,c} = (Σ_t g_{n,t,c} x̂_{n,t,c}, Σ_t g_{n,t,c})``, ``t`` running over the example's
tokens (every dimension between the first and the normalised ones; none for a ``(B, C)`` input)
and ``x̂`` the input normalised over its last dimensions (``F.layer_norm`` without affine).
Features are taken as independent (a block-diagonal Fisher over features); within a feature the
2×2 block is exact. The update is ``(F_c + λI)⁻¹ (∇γ_c, ∇β_c)``.

Handled: ``nn.LayerNorm`` with ``elementwise_affine=True`` and a bias; other LayerNorms are
skipped with a log line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import precision
from .layers import HandlerOptions, register_handler
from .unit_wise import UnitWiseBlock


class UnitWiseLayerNorm(UnitWiseBlock):
    """K-FAC state of one affine ``nn.LayerNorm`` (input ``(B, ..., *normalized_shape)``)."""

    state_section = "layernorm"

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.module.normalized_shape, eps=self.module.eps)

    def per_example(self, t: torch.Tensor) -> torch.Tensor:
        examples = t.shape[0] if t.dim() > len(self.module.normalized_shape) else 1
        return t.reshape(examples, -1, self.channels).sum(dim=1)


class LayerNormHandler:
    """Registers affine LayerNorm layers as unit-wise blocks when ``layernorm="unit_wise"``."""

    def configure(self, options: HandlerOptions) -> LayerNormHandler | None:
        return self if options.layernorm == "unit_wise" else None

    def skip_reason(self, module: nn.Module) -> str | None:
        if module.weight is None:
            return "LayerNorm without affine parameters"
        if module.bias is None:
            return "LayerNorm without a bias (the 2x2 blocks need scale and shift)"
        return None

    def make_block(
        self, name: str, module: nn.Module, options: HandlerOptions
    ) -> UnitWiseLayerNorm:
        # float32 blocks for 16-bit factor dtypes (precision.py)
        storage = precision.factor_storage_dtype(options.factor_dtype)
        return UnitWiseLayerNorm(name, module, storage, options.grads)


register_handler(nn.LayerNorm, LayerNormHandler())

__all__ = ["LayerNormHandler", "UnitWiseLayerNorm"]
