"""K-FAC for ``nn.Embedding`` (``embedding="diagonal"``): a Kronecker block with a diagonal
input factor (the way TF-KFAC handles embeddings).

An embedding is a Linear layer applied to one-hot inputs: row ``v`` of the ``(V, D)`` weight
is the output for token ``v``. As a Kronecker block its gradient is the ``(g, a) = (D, V)``
matrix ``∇Wᵀ``, ``G = gᵀg / N`` from the ``N`` output-gradient rows exactly as for Linear, and
the input factor ``A = aᵀa / N`` of the one-hot rows ``a`` is *diagonal*:
``A = diag(count_v / N)``, ``count_v`` the occurrences of token ``v`` among the ``N`` tokens. It
is stored as its ``V`` diagonal entries (memory ``V``, not ``V²``; the running average starts
from the identity's diagonal, ones) and applied elementwise:

* eigen (exact Tikhonov): ``Q_A = I`` and ``d_A = A``, so
  ``V = Q_G [(Q_Gᵀ ∇) ⊙ 1/(d_G d_Aᵀ + λ)]`` — second-order data ``Q_G`` and the ``(D, V)``
  reciprocal;
* inverse: ``V = (G + λ_G I)⁻¹ ∇ ⊙ 1/(A + λ_A)`` — second-order data ``(V,)`` and ``(D, D)``;
* factored damping: the same π split, with ``tr A / V`` the mean of the diagonal.

``padding_idx``: tokens equal to it produce no weight gradient, so they enter ``A`` as zero rows
(they count in ``N``, not in ``count``) and the padding row's gradient stays exactly zero after
preconditioning (its column of ``∇`` is zero and ``A`` acts per column). Embeddings with
``sparse=True`` (sparse gradients) or ``scale_grad_by_freq=True`` (a gradient that is not the
one-hot Linear's) are skipped with a log line.
"""

from __future__ import annotations

import torch
from torch import nn

from . import linalg, precision
from .factors import Factor
from .kfac_layer import KFACLayer
from .layers import HandlerOptions, register_handler
from .second_order import EIGEN, INVERSE, EigenMethod, InverseMethod, Parts


def _decomposition_dtype(factor: torch.Tensor) -> torch.dtype:
    return torch.float64 if factor.dtype == torch.float64 else torch.float32


class DiagonalEigenMethod(EigenMethod):
    """The eigen method with a diagonal ``A`` (``(a,)``): tensors ``Q_G`` ``(g, g)`` and
    ``recip`` ``(g, a)``; ``Q_A = I`` is implicit."""

    stackable = False  # no dense Q_A / A_inv: preconditioned by its own method

    keys = ("Q_G", "recip")

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.g, self.g), (self.g, self.a)]

    def identity(self) -> list[torch.Tensor]:
        kw = {"dtype": self.dtype, "device": self.device}
        return [torch.eye(self.g, **kw), torch.ones(self.g, self.a, **kw)]

    def _diagonal(self, A: torch.Tensor) -> torch.Tensor:
        """``d_A``: the diagonal itself, clamped at 0 like eigenvalues."""
        if not bool(torch.isfinite(A).all()):
            raise linalg.DecompositionError("factor contains inf/NaN")
        return A.to(_decomposition_dtype(A)).clamp_min(0.0)

    def requests(self, whiches, A, G, damping) -> list[tuple[torch.Tensor, object] | None]:
        """Only ``G`` is decomposed; ``A``'s eigenvalues are its diagonal."""
        return [(G, None) if which == "G" else None for which in whiches]

    def compute(self, A: torch.Tensor, G: torch.Tensor, damping: float, ready=None) -> None:
        try:
            d_A = self._diagonal(A)
            d_G, Q_G = self._eigh("G", G, ready)
        except linalg.DecompositionError as err:
            self._fallback("eigendecomposition", err, self.has_data())
            if not self.has_data():
                self.tensors = self.identity()
            return
        self._store([Q_G, self._recip(d_A, d_G, A, G, damping)])

    def factor_part(self, which, A, G, damping, ready=None) -> list[torch.Tensor]:
        """``[d_A]`` for ``A`` (NaN when not finite: every rank then keeps its data), ``[Q_G,
        d_G]`` for ``G``."""
        if which == "G":
            return super().factor_part(which, A, G, damping, ready)
        try:
            return [self._diagonal(A)]
        except linalg.DecompositionError as err:
            self._fallback("factor A", err, self.has_data())
            return [torch.full_like(A, float("nan"), dtype=_decomposition_dtype(A))]

    def part_buffers(self, which: str, A: torch.Tensor, G: torch.Tensor) -> list[torch.Tensor]:
        if which == "G":
            return super().part_buffers(which, A, G)
        return [torch.empty(self.a, dtype=_decomposition_dtype(A), device=self.device)]

    def finish_parts(self, parts: Parts, A: torch.Tensor, G: torch.Tensor, damping: float):
        (d_A,), (Q_G, d_G) = parts["A"], parts["G"]
        if not bool(torch.isfinite(d_A).all() & torch.isfinite(d_G).all()):
            if not self.has_data():
                self.tensors = self.identity()
            return
        self._store([Q_G, self._recip(d_A.to(Q_G.dtype), d_G.to(Q_G.dtype), A, G, damping)])

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        Q_G, recip = self.tensors
        dtype = precision.product_dtype(grad.dtype, self.precondition_dtype)
        Q_G, recip = Q_G.to(dtype), recip.to(dtype)
        V = Q_G @ ((Q_G.T @ grad.to(dtype)) * recip)
        return precision.to_finite(V, grad.dtype)


class DiagonalInverseMethod(InverseMethod):
    """The inverse method with a diagonal ``A``: tensors ``A_inv`` ``(a,)`` (the diagonal of
    ``(A + λ_A I)⁻¹``) and ``G_inv`` ``(g, g)``."""

    stackable = False  # no dense Q_A / A_inv: preconditioned by its own method

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.a,), (self.g, self.g)]

    def identity(self) -> list[torch.Tensor]:
        kw = {"dtype": self.dtype, "device": self.device}
        return [torch.ones(self.a, **kw), torch.eye(self.g, **kw)]

    def requests(self, whiches, A, G, damping) -> list[tuple[torch.Tensor, object] | None]:
        """Only ``G`` is inverted by :func:`.batched.decompose_all`; ``A``'s inverse is
        elementwise."""
        lam = self._dampings(A, G, damping)
        return [(G, lam["G"]) if which == "G" else None for which in whiches]

    def _inverse(self, which: str, factor: torch.Tensor, lam, ready=None) -> torch.Tensor:
        if which == "G":
            return super()._inverse(which, factor, lam, ready)
        inverse = 1.0 / (factor.to(_decomposition_dtype(factor)) + lam)
        if bool(torch.isfinite(inverse).all()):
            return self._cast(inverse)
        previous = None if self.tensors is None else self.tensors[0]
        err = linalg.DecompositionError("factor contains inf/NaN")
        self._fallback("inverse of factor A", err, previous is not None)
        return previous if previous is not None else self.identity()[0]

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        A_inv, G_inv = self.tensors
        dtype = precision.product_dtype(grad.dtype, self.precondition_dtype)
        V = (G_inv.to(dtype) @ grad.to(dtype)) * A_inv.to(dtype)
        return precision.to_finite(V, grad.dtype)


class EmbeddingLayer(KFACLayer):
    """A Kronecker block of an ``nn.Embedding`` with ``V`` tokens of dimension ``D``: ``A`` is
    the ``(V,)`` diagonal, ``G`` is ``D × D``, the gradient is ``(D, V)`` (``∇Wᵀ``)."""

    diagonal_input = True
    method_classes = {EIGEN: DiagonalEigenMethod, INVERSE: DiagonalInverseMethod}

    def _input_factor(self, a: int, options: HandlerOptions, device: torch.device) -> Factor:
        identity = torch.ones(a, dtype=torch.float64, device=device)
        return Factor(a, options.factor_dtype, device, initial=identity)

    def accumulate_input(self, x: torch.Tensor, scale: float = 1.0) -> None:
        """Add ``scale · diag(count_v / N)`` of the micro-batch's ``N`` token ids ``x``."""
        ids = x.reshape(-1)
        counts = torch.bincount(ids, minlength=self.shape.a).to(self.A.dtype)
        padding = self.module.padding_idx
        if padding is not None:
            counts[padding] = 0.0  # padding tokens get no gradient: zero rows of a
        self.peak_rows_bytes = max(self.peak_rows_bytes, 2 * counts.numel() * counts.element_size())
        self.A.add(counts * (scale / max(ids.numel(), 1)))

    def grad(self) -> torch.Tensor | None:
        weight_grad = self.grads.read(self.module.weight)
        return None if weight_grad is None else weight_grad.T.contiguous()

    def write_grad(self, matrix: torch.Tensor) -> None:
        if self.module.weight.grad is not None:
            self.grads.write(self.module.weight, matrix.T)


class EmbeddingHandler:
    """``nn.Embedding`` when ``embedding="diagonal"``: ``G`` rows like Linear's (all leading
    dimensions are rows), ``A`` from token counts (:class:`EmbeddingLayer`)."""

    def configure(self, options: HandlerOptions) -> EmbeddingHandler | None:
        return self if options.embedding == "diagonal" else None

    def output_grad_rows(self, module: nn.Module, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim

    def skip_reason(self, module: nn.Module) -> str | None:
        if module.sparse:
            return "embedding with sparse gradients (sparse=True)"
        if module.scale_grad_by_freq:
            return "embedding with scale_grad_by_freq=True (not a one-hot Linear gradient)"
        return None

    def make_block(self, name: str, module: nn.Module, options: HandlerOptions) -> EmbeddingLayer:
        return EmbeddingLayer(name, module, self, options)


register_handler(nn.Embedding, EmbeddingHandler())

__all__ = ["DiagonalEigenMethod", "DiagonalInverseMethod", "EmbeddingHandler", "EmbeddingLayer"]
