"""A registered layer: its two factors, its second-order data and its preconditioning."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from . import linalg, precision
from .factors import Factor
from .layers import LayerHandler, grad_matrix, write_grad_matrix

EIGEN = "eigen"
INVERSE = "inverse"
COMPUTE_METHODS = (EIGEN, INVERSE)


@dataclass(frozen=True)
class LayerShape:
    """Side lengths of a layer's factors: ``A`` is ``a × a`` (bias column included), ``G`` is
    ``g × g`` and the layer gradient is ``g × a``."""

    name: str
    a: int
    g: int


class KFACLayer:
    """K-FAC state of one module: factors ``A`` and ``G`` plus the data that preconditions.

    Second-order data, by compute method:

    * ``eigen``: ``A.eigvecs`` (``Q_A``), ``G.eigvecs`` (``Q_G``) and ``recip`` =
      ``1/(d_G d_Aᵀ + damping)`` of shape ``(g, a)``;
    * ``inverse``: ``A.inverse`` = ``(A + λI)⁻¹`` and ``G.inverse`` = ``(G + λI)⁻¹``.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        handler: LayerHandler,
        factor_dtype: torch.dtype,
        inv_dtype: torch.dtype,
    ) -> None:
        self.name = name
        self.module = module
        self.handler = handler
        self.inv_dtype = inv_dtype
        a, g = handler.factor_sizes(module)
        self.shape = LayerShape(name, a, g)
        device = module.weight.device
        self.A = Factor(a, factor_dtype, device)
        self.G = Factor(g, factor_dtype, device)
        self.recip: torch.Tensor | None = None
        self._warned_range = False

    # ------------------------------------------------------------------ statistics (hooks)
    def accumulate_input(self, x: torch.Tensor) -> None:
        """Add one micro-batch's input statistic to ``A``."""
        self.A.accumulate(self.handler.input_rows(self.module, x))

    def accumulate_output_grad(self, grad_output: torch.Tensor, multiplier: torch.Tensor | float):
        """Add one micro-batch's output-gradient statistic to ``G``.

        ``multiplier`` rescales ``g`` before the outer product: it undoes the ``1/k`` of gradient
        accumulation, the AMP loss scale, and applies per-example scaling when asked.
        """
        rows = self.handler.output_grad_rows(self.module, grad_output)
        self.G.accumulate(rows.to(self.G.dtype) * multiplier)

    def factors(self) -> tuple[Factor, Factor]:
        return self.A, self.G

    # ------------------------------------------------------------------ second-order data
    def compute_eigen(self, factor: Factor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d, Q)`` of one factor; on failure NaN eigenvalues and ``Q = I`` with a warning
        (NaN eigenvalues make :func:`linalg.eigen_reciprocal` leave the gradient as is)."""
        try:
            return linalg.eigh(factor.running)
        except linalg.DecompositionError as err:
            warnings.warn(
                f"K-FAC: eigendecomposition of layer {self.name!r} failed ({err}); "
                "it uses its plain gradient until the next successful update",
                RuntimeWarning,
                stacklevel=2,
            )
            eye = torch.eye(factor.size, dtype=torch.float32, device=factor.running.device)
            return torch.full((factor.size,), float("nan"), device=eye.device), eye

    def factor_dampings(self, damping: float, factored: bool) -> tuple[float, float]:
        """Damping added to ``A`` and to ``G`` by the inverse method: ``λ`` on each, or the
        π-split ``(π√λ, √λ/π)`` when ``factored``."""
        if not factored:
            return damping, damping
        return linalg.pi_split(
            float(self.A.running.trace()),
            self.shape.a,
            float(self.G.running.trace()),
            self.shape.g,
            damping,
        )

    def update_eigen_colocated(self, damping: float, factored: bool = False) -> None:
        """Decompose both factors and precompute ``recip``; on failure keep the previous data."""
        try:
            d_A, Q_A = linalg.eigh(self.A.running)
            d_G, Q_G = linalg.eigh(self.G.running)
        except linalg.DecompositionError as err:
            kept = "its previous data" if self.recip is not None else "its plain gradient"
            warnings.warn(
                f"K-FAC: eigendecomposition of layer {self.name!r} failed ({err}); it keeps {kept}",
                RuntimeWarning,
                stacklevel=2,
            )
            if self.recip is None:
                self.set_identity_second_order(EIGEN)
            return
        # Row-major copies: a resumed run (which loads contiguous tensors) then multiplies with
        # the same memory layout, hence bit-identical results.
        self.A.eigvecs = Q_A.to(self.inv_dtype).contiguous()
        self.G.eigvecs = Q_G.to(self.inv_dtype).contiguous()
        self.recip = self.to_inv_dtype(linalg.eigen_reciprocal(d_G, d_A, damping, factored))

    def update_inverse(self, factor: Factor, damping: float) -> None:
        """Damped inverse of one factor; on failure keep the previous one (or the identity)."""
        try:
            inverse = linalg.damped_inverse(factor.running, damping)
            factor.inverse = self.to_inv_dtype(inverse)
        except linalg.DecompositionError as err:
            kept = "its previous inverse" if factor.inverse is not None else "an identity inverse"
            warnings.warn(
                f"K-FAC: inverse for layer {self.name!r} failed ({err}); it keeps {kept}",
                RuntimeWarning,
                stacklevel=2,
            )
            if factor.inverse is None:
                factor.inverse = torch.eye(
                    factor.size, dtype=self.inv_dtype, device=factor.running.device
                )

    def to_inv_dtype(self, data: torch.Tensor) -> torch.Tensor:
        """Second-order data (computed in float32 or better) cast to ``inv_dtype``, clamped to its
        finite range: ``1/(d_G d_Aᵀ + λ)`` and ``(F + λI)⁻¹`` reach ``1/λ``, beyond float16's
        65504 when ``λ < 1.53e-5``. Warns once per layer when it clamps (a host sync)."""
        if not self._warned_range and precision.exceeds_range(data, self.inv_dtype):
            self._warned_range = True
            limit = torch.finfo(self.inv_dtype).max
            warnings.warn(
                f"K-FAC: layer {self.name!r}: second-order data exceeds the range of "
                f"inv_dtype={precision.dtype_name(self.inv_dtype)} (damping below "
                f"{1 / limit:.3g}); it is capped at {limit:g}, as if damped more: use "
                f"inv_dtype=bfloat16 or float32, or damping >= {1 / limit:.3g}",
                RuntimeWarning,
                stacklevel=3,
            )
        return precision.to_finite(data, self.inv_dtype).contiguous()

    def set_identity_second_order(self, method: str) -> None:
        """Second-order data that leaves the gradient unchanged."""
        device = self.A.running.device
        if method == EIGEN:
            self.A.eigvecs = torch.eye(self.shape.a, dtype=self.inv_dtype, device=device)
            self.G.eigvecs = torch.eye(self.shape.g, dtype=self.inv_dtype, device=device)
            self.recip = torch.ones(self.shape.g, self.shape.a, dtype=self.inv_dtype, device=device)
        else:
            self.A.inverse = torch.eye(self.shape.a, dtype=self.inv_dtype, device=device)
            self.G.inverse = torch.eye(self.shape.g, dtype=self.inv_dtype, device=device)

    def second_order_tensors(self, method: str) -> list[torch.Tensor]:
        """The tensors gradient workers need, allocating empty ones on receiving ranks."""
        device = self.A.running.device
        a, g, dtype = self.shape.a, self.shape.g, self.inv_dtype
        if method == EIGEN:
            if self.recip is None:
                self.A.eigvecs = torch.empty(a, a, dtype=dtype, device=device)
                self.G.eigvecs = torch.empty(g, g, dtype=dtype, device=device)
                self.recip = torch.empty(g, a, dtype=dtype, device=device)
            return [self.A.eigvecs, self.G.eigvecs, self.recip]
        if self.A.inverse is None or self.G.inverse is None:
            self.A.inverse = torch.empty(a, a, dtype=dtype, device=device)
            self.G.inverse = torch.empty(g, g, dtype=dtype, device=device)
        return [self.A.inverse, self.G.inverse]

    def has_second_order(self) -> bool:
        return self.recip is not None or self.A.inverse is not None

    def second_order_bytes(self) -> int:
        recip = 0 if self.recip is None else self.recip.numel() * self.recip.element_size()
        return self.A.second_order_bytes() + self.G.second_order_bytes() + recip

    def factor_bytes(self) -> int:
        return self.A.running_bytes() + self.G.running_bytes()

    # ------------------------------------------------------------------ preconditioning
    def grad(self) -> torch.Tensor | None:
        """The layer gradient ``(g, a)``, or ``None`` if the layer got no gradient this step."""
        return grad_matrix(self.module)

    def precondition(self, grad: torch.Tensor, method: str) -> torch.Tensor:
        """The preconditioned gradient ``V`` of shape ``(g, a)``."""
        if method == EIGEN:
            return linalg.precondition_eigen(grad, self.A.eigvecs, self.G.eigvecs, self.recip)
        return linalg.precondition_inverse(grad, self.A.inverse, self.G.inverse)

    def write_grad(self, matrix: torch.Tensor) -> None:
        write_grad_matrix(self.module, matrix)
