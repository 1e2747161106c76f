"""Unit-wise natural gradient for normalisation layers' scale and shift (Osawa et al., SP-NGD
§4.2.1), shared by BatchNorm (:mod:`.batchnorm`) and LayerNorm (:mod:`.layernorm`).

A normalisation layer computes ``y = γ_c·x̂ + β_c`` for every unit (channel or feature) ``c``.
Its Fisher is approximated by one 2×2 block per unit — the units are taken as independent — of
per-example gradient moments ``F_c = mean_n [u_{n,c} u_{n,c}ᵀ]`` with
``u_{n,c} = (Σ_s g_{n,c,s} x̂_{n,c,s}, Σ_s g_{n,c,s})``: ``n`` runs over the examples (dimension
0 of the input), ``s`` over everything else that shares the unit's parameters (the spatial
positions of a BatchNorm, the tokens of a LayerNorm), ``g`` is the output gradient. ``u_{n,c}`` is
exactly example ``n``'s gradient of ``(γ_c, β_c)``; ``g`` is scaled as for the Kronecker factors
(accumulation, loss scale, per-example option), so one damping value means the same for both.
The update is ``(F_c + λI)⁻¹ (∇γ_c, ∇β_c)``, inverted in closed form.

Blocks are stored packed as ``(C, 3)``: ``[F_γγ, F_γβ, F_ββ]``; the running average starts from
the identity ``[1, 0, 1]``. Being tiny, the blocks are averaged over ranks with the Kronecker
factors and inverted by every rank (``replicated``): no placement, no broadcast.

A concrete layer type subclasses :class:`UnitWiseBlock` and says how to normalise the input
(:meth:`UnitWiseBlock.normalised`) and how to sum a ``(…)``-shaped tensor to per-example,
per-unit sums (:meth:`UnitWiseBlock.per_example`).
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from .factors import Factor
from .grads import GradAccess, PlainGrads

#: Elements of one packed symmetric 2×2 block: ``[F_γγ, F_γβ, F_ββ]``.
BLOCK_ELEMENTS = 3


class UnitWiseInverse:
    """Second-order method of a unit-wise layer: ``(F_c + λI)⁻¹`` per unit, packed ``(C, 3)``
    like the blocks; a unit whose block cannot be inverted gets the identity."""

    name = "unit_wise"
    keys = ("F_inv",)

    def __init__(self, layer: str, channels: int, dtype: torch.dtype, device: torch.device):
        self.layer, self.channels, self.dtype, self.device = layer, channels, dtype, device
        self.tensors: list[torch.Tensor] | None = None

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.channels, BLOCK_ELEMENTS)]

    def has_data(self) -> bool:
        return self.tensors is not None

    def buffers(self) -> list[torch.Tensor]:
        if self.tensors is None:
            self.tensors = [
                torch.empty(self.channels, BLOCK_ELEMENTS, dtype=self.dtype, device=self.device)
            ]
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


class UnitWiseBlock(abc.ABC):
    """K-FAC state of one normalisation layer with ``C`` units (a replicated block, same
    interface as :class:`~kfac_train.kfac.kfac_layer.KFACLayer`). The layer's ``weight`` and
    ``bias`` hold ``C`` elements each (any shape: a LayerNorm's is ``normalized_shape``)."""

    replicated = True
    state_section = ""  # set by each layer type (its checkpoint section)
    factor_keys = ("F",)

    def __init__(
        self, name: str, module: nn.Module, dtype: torch.dtype, grads: GradAccess | None = None
    ):
        self.name = name
        self.module = module
        self.dtype = dtype
        self.grads = grads or PlainGrads()
        #: Units ``C``: one 2×2 block each.
        self.channels = module.weight.numel()
        device = module.weight.device
        identity = torch.tensor([1.0, 0.0, 1.0], dtype=dtype, device=device)
        self.F = Factor(self.channels, dtype, device, initial=identity.repeat(self.channels, 1))
        self.method = UnitWiseInverse(name, self.channels, dtype, device)
        #: Bytes of the largest ``x̂`` kept from a forward to its backward.
        self.peak_rows_bytes = 0

    # ------------------------------------------------------------------ per layer type
    @abc.abstractmethod
    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """``x̂`` of a training-mode forward (the input normalised as the layer does it)."""

    @abc.abstractmethod
    def per_example(self, t: torch.Tensor) -> torch.Tensor:
        """Sum an output-shaped tensor to ``(B, C)``: per example, per unit."""

    # ------------------------------------------------------------------ statistics
    @property
    def running(self) -> torch.Tensor:
        """The running ``(C, 3)`` blocks."""
        return self.F.running

    def factors(self) -> tuple[Factor, ...]:
        return (self.F,)

    def on_forward(self, inputs: tuple[Any, ...], output: Any):
        """Keep ``x̂`` of this micro-batch; the callback adds the moments once ``g`` is known."""
        x_hat = self.normalised(inputs[0].detach().to(self.dtype))
        self.peak_rows_bytes = max(self.peak_rows_bytes, x_hat.numel() * x_hat.element_size())

        def accumulate(grad_output: torch.Tensor, multiplier: torch.Tensor | float) -> None:
            self.accumulate(x_hat, grad_output, multiplier)

        return accumulate

    def accumulate(self, x_hat: torch.Tensor, grad_output: torch.Tensor, multiplier) -> None:
        """Add one micro-batch's moments; ``x_hat`` and ``grad_output`` have the output's shape."""
        g = grad_output.to(self.dtype) * multiplier
        d_gamma = self.per_example(g * x_hat.to(self.dtype))  # (B, C)
        d_beta = self.per_example(g)
        stat = torch.stack(
            [(d_gamma * d_gamma).mean(0), (d_gamma * d_beta).mean(0), (d_beta * d_beta).mean(0)],
            dim=1,
        )
        self.F.add(stat)

    # ------------------------------------------------------------------ second-order data
    def update_second_order(self, damping: float) -> None:
        self.method.compute(self.F.running, damping)

    def has_second_order(self) -> bool:
        return self.method.has_data()

    def second_order_bytes(self) -> int:
        return self.method.nbytes()

    def factor_bytes(self) -> int:
        return self.F.running_bytes()

    # ------------------------------------------------------------------ gradient
    def grad(self) -> torch.Tensor | None:
        """``(2, C)``: ``∇γ`` and ``∇β`` (flattened), or ``None`` without a gradient."""
        weight, bias = self.grads.read(self.module.weight), self.grads.read(self.module.bias)
        if weight is None or bias is None:
            return None
        return torch.stack([weight.reshape(-1), bias.reshape(-1)])

    @property
    def grad_shape(self) -> tuple[int, int]:
        return (2, self.channels)

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


__all__ = [
    "BLOCK_ELEMENTS",
    "UnitWiseBlock",
    "UnitWiseInverse",
]
