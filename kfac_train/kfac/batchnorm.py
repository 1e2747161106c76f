"""Unit-wise natural gradient for BatchNorm (Osawa et al., SP-NGD §4.2.1).

For each channel ``c`` the Fisher block of ``(γ_c, β_c)`` is the 2×2 matrix of per-example
gradient moments ``F_c = mean_n [u_n u_nᵀ]``, ``u_n = (Σ_s g_{n,c,s} x̂_{n,c,s}, Σ_s g_{n,c,s})``
(``s`` runs over the spatial positions, ``x̂`` is the normalised input, ``g`` the output gradient).
The update is ``(F_c + λI)⁻¹ (∇γ_c, ∇β_c)``, inverted in closed form. ``g`` is scaled exactly as
for the Kronecker factors (accumulation, loss scale, per-example option), so one damping value
means the same for both.

Blocks are stored packed as ``(C, 3)``: ``[F_γγ, F_γβ, F_ββ]``; the running average starts from
the identity ``[1, 0, 1]``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import sharded


def normalised_input(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``x̂`` of a training-mode forward: ``x`` normalised with its own batch statistics."""
    dims = [d for d in range(x.dim()) if d != 1]
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + module.eps)


class UnitWiseBatchNorm:
    """K-FAC state of one affine BatchNorm layer with ``C`` channels."""

    def __init__(self, name: str, module: nn.modules.batchnorm._BatchNorm, dtype: torch.dtype):
        self.name = name
        self.module = module
        self.dtype = dtype
        channels = module.num_features
        device = module.weight.device
        self.running = torch.tensor([1.0, 0.0, 1.0], dtype=dtype, device=device).repeat(channels, 1)
        self.inverse: torch.Tensor | None = None
        self._batch_sum: torch.Tensor | None = None
        self.batch_count = 0

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
        if self.running.device != stat.device:
            self.running = self.running.to(stat.device)
        self._batch_sum = stat if self._batch_sum is None else self._batch_sum + stat
        self.batch_count += 1

    def batch(self) -> torch.Tensor | None:
        return None if self._batch_sum is None else self._batch_sum / self.batch_count

    def reset_batch(self) -> None:
        self._batch_sum = None
        self.batch_count = 0

    def update_running(self, batch: torch.Tensor, decay: float) -> torch.Tensor:
        """Fold ``batch`` in unless it has inf/NaN; returns the 0-d "dropped" flag (no sync)."""
        keep = torch.isfinite(batch).all()
        updated = self.running * decay + batch.to(self.dtype) * (1.0 - decay)
        self.running = torch.where(keep, updated, self.running)
        return ~keep

    def update_inverse(self, damping: float) -> None:
        """``(F_c + λI)⁻¹`` for every channel, packed like the blocks."""
        f_gg, f_gb, f_bb = (self.running[:, i].to(torch.float64) for i in range(3))
        f_gg, f_bb = f_gg + damping, f_bb + damping
        det = f_gg * f_bb - f_gb * f_gb
        inverse = torch.stack([f_bb / det, -f_gb / det, f_gg / det], dim=1)
        finite = torch.isfinite(inverse).all(dim=1, keepdim=True) & (det > 0).unsqueeze(1)
        identity = torch.tensor([1.0, 0.0, 1.0], dtype=inverse.dtype, device=inverse.device)
        self.inverse = torch.where(finite, inverse, identity).to(self.dtype)

    def grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        weight, bias = sharded.full_grad(self.module.weight), sharded.full_grad(self.module.bias)
        if weight is None or bias is None:
            return None
        return weight, bias

    def precondition(self, d_gamma: torch.Tensor, d_beta: torch.Tensor):
        """``(v_γ, v_β)`` per channel; the plain gradient before the first inverse."""
        if self.inverse is None:
            return d_gamma.clone(), d_beta.clone()
        i_gg, i_gb, i_bb = (self.inverse[:, i].to(d_gamma.dtype) for i in range(3))
        return i_gg * d_gamma + i_gb * d_beta, i_gb * d_gamma + i_bb * d_beta

    def write(self, v_gamma: torch.Tensor, v_beta: torch.Tensor) -> None:
        sharded.write_grad(self.module.weight, v_gamma)
        sharded.write_grad(self.module.bias, v_beta)

    def factor_bytes(self) -> int:
        return self.running.numel() * self.running.element_size()

    def second_order_bytes(self) -> int:
        return 0 if self.inverse is None else self.inverse.numel() * self.inverse.element_size()
