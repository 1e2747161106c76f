"""Unit-wise natural gradient for BatchNorm (Osawa et al., SP-NGD §4.2.1).

For each channel ``c`` the Fisher block of ``(γ_c, β_c)`` is the 2×2 matrix of per-example
gradient moments ``F_c = mean_n [u_n u_nᵀ]``, ``u_n = (Σ_s g_{n,c,s} x̂_{n,c,s}, Σ_s g_{n,c,s})``
(``s`` runs over the spatial positions, ``x̂`` is the normalised input, ``g`` the output gradient).
The update is ``(F_c + λI)⁻¹ (∇γ_c, ∇β_c)``, inverted in closed form. ``g`` is scaled exactly as
for the Kronecker factors (accumulation, loss scale, per-example option), so one damping value
means the same for both.

Blocks are stored packed as ``(C, 3)``: ``[F_γγ, F_γβ, F_ββ]``; the running average starts from
the identity ``[1, 0, 1]``.

The layer is a block like :class:`~kfac_train.kfac.kfac_layer.KFACLayer` (same interface) built
by :class:`BatchNormHandler`, registered for ``_BatchNorm`` in the handler registry. Its blocks are
averaged over ranks with the Kronecker factors; being tiny, they are inverted by every rank
(``replicated``), so they need no placement and no broadcast. ``nn.SyncBatchNorm`` on more than
one rank is refused: it normalises with statistics over all ranks, which :func:`normalised_input`
(local statistics) would not reproduce.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import precision
from .factors import Factor
from .layers import GradAccess, HandlerOptions, PlainGrads, register_handler


def normalised_input(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``x̂`` of a training-mode forward: ``x`` normalised with its own batch statistics."""
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + module.eps)


class UnitWiseInverse:
    """Second-order method of a unit-wise BatchNorm layer: ``(F_c + λI)⁻¹`` per channel, packed
    ``(C, 3)`` like the blocks; a channel whose block cannot be inverted gets the identity."""

    name = "unit_wise"
    keys = ("F_inv",)

    def __init__(self, layer: str, channels: int, dtype: torch.dtype, device: torch.device):
        self.layer, self.channels, self.dtype, self.device = layer, channels, dtype, device
        self.tensors: list[torch.Tensor] | None = None

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.channels, 3)]

    def has_data(self) -> bool:
        return self.tensors is not None

    def buffers(self) -> list[torch.Tensor]:
        if self.tensors is None:
            self.tensors = [torch.empty(self.channels, 3, dtype=self.dtype, device=self.device)]
        return self.tensors

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors or ())

    def compute(self, running: torch.Tensor, damping: float) -> None:
        f_gg, f_gb, f_bb = (running[:, i].to(torch.float64) for i in range(3))
        f_gg, f_bb = f_gg + damping, f_bb + damping
        det = f_gg * f_bb - f_gb * f_gb
        inverse = torch.stack([f_bb / det, -f_gb / det, f_gg / det], dim=1)
        finite = torch.isfinite(inverse).all(dim=1, keepdim=True) & (det > 0).unsqueeze(1)
        identity = torch.tensor([1.0, 0.0, 1.0], dtype=inverse.dtype, device=inverse.device)
        self.tensors = [torch.where(finite, inverse, identity).to(self.dtype)]

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """``grad`` is ``(2, C)``: rows ``∇γ`` and ``∇β``; returns ``(v_γ, v_β)`` stacked."""
        d_gamma, d_beta = grad[0], grad[1]
        i_gg, i_gb, i_bb = (self.tensors[0][:, i].to(grad.dtype) for i in range(3))
        return torch.stack([i_gg * d_gamma + i_gb * d_beta, i_gb * d_gamma + i_bb * d_beta])


class UnitWiseBatchNorm:
    """K-FAC state of one affine BatchNorm layer with ``C`` channels (a replicated block)."""

    replicated = True
    state_section = "batchnorm"
    factor_keys = ("F",)

    def __init__(
        self,
        name: str,
        module: nn.modules.batchnorm._BatchNorm,
        dtype: torch.dtype,
        grads: GradAccess | None = None,
    ):
        self.name = name
        self.module = module
        self.dtype = dtype
        self.grads = grads or PlainGrads()
        channels = module.num_features
        device = module.weight.device
        identity = torch.tensor([1.0, 0.0, 1.0], dtype=dtype, device=device).repeat(channels, 1)
        self.F = Factor(channels, dtype, device, initial=identity)
        self.method = UnitWiseInverse(name, channels, dtype, device)
        self.peak_rows_bytes = 0

    @property
    def running(self) -> torch.Tensor:
        """The running ``(C, 3)`` blocks."""
        return self.F.running

    def factors(self) -> tuple[Factor, ...]:
        return (self.F,)

    def on_forward(self, inputs: tuple[Any, ...], output: Any):
        """Keep ``x̂`` of this micro-batch; the callback adds the moments once ``g`` is known."""
        x_hat = normalised_input(self.module, inputs[0].detach().to(self.dtype))
        self.peak_rows_bytes = max(self.peak_rows_bytes, x_hat.numel() * x_hat.element_size())

        def accumulate(grad_output: torch.Tensor, multiplier: torch.Tensor | float) -> None:
            self.accumulate(x_hat, grad_output, multiplier)

        return accumulate

    def accumulate(self, x_hat: torch.Tensor, grad_output: torch.Tensor, multiplier) -> None:
        """Add one micro-batch's moments; ``x_hat`` and ``grad_output`` are ``(B, C, ...)``."""
        g = grad_output.to(self.dtype) * multiplier
        spatial = list(range(2, g.dim()))
        d_gamma = (g * x_hat.to(self.dtype)).sum(dim=spatial) if spatial else g * x_hat
        d_beta = g.sum(dim=spatial) if spatial else g
        stat = torch.stack(
            [(d_gamma * d_gamma).mean(0), (d_gamma * d_beta).mean(0), (d_beta * d_beta).mean(0)],
            dim=1,
        )
        self.F.add(stat)

    def update_second_order(self, damping: float) -> None:
        self.method.compute(self.F.running, damping)

    def has_second_order(self) -> bool:
        return self.method.has_data()

    def second_order_bytes(self) -> int:
        return self.method.nbytes()

    def factor_bytes(self) -> int:
        return self.F.running_bytes()

    def grad(self) -> torch.Tensor | None:
        """``(2, C)``: ``∇γ`` and ``∇β``, or ``None`` without a gradient."""
        weight, bias = self.grads.read(self.module.weight), self.grads.read(self.module.bias)
        if weight is None or bias is None:
            return None
        return torch.stack([weight, bias])

    @property
    def grad_shape(self) -> tuple[int, int]:
        return (2, self.module.num_features)

    def zero_grad(self) -> torch.Tensor:
        weight = self.module.weight
        return torch.zeros(self.grad_shape, dtype=weight.dtype, device=weight.device)

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        return self.method.precondition(grad)

    def write_grad(self, V: torch.Tensor) -> None:
        if self.module.weight.grad is None or self.module.bias.grad is None:
            return
        self.grads.write(self.module.weight, V[0])
        self.grads.write(self.module.bias, V[1])


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
