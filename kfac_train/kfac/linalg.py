"""Linear algebra of K-FAC: decompositions with a robust fallback, and preconditioning.

Nothing here communicates or knows about modules. Shapes follow ``kfac-math.md``: a layer gradient
``grad`` is ``(g, a)`` (output rows × input columns, bias column last), ``A`` is ``(a, a)`` and
``G`` is ``(g, g)``.
"""

from __future__ import annotations

import torch

from . import precision

#: Relative size of the diagonal jitter added on the float64 retry.
JITTER = 1e-6


class DecompositionError(RuntimeError):
    """A factor could not be decomposed even in float64 with jitter."""


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Decompositions run in float32 or better."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _jittered(matrix: torch.Tensor) -> torch.Tensor:
    matrix = matrix.to(torch.float64)
    n = matrix.shape[0]
    scale = torch.nan_to_num(matrix.diagonal().abs().mean(), nan=1.0, posinf=1.0).clamp_min(1e-12)
    return matrix + JITTER * scale * torch.eye(n, dtype=matrix.dtype, device=matrix.device)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def eigh(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition ``factor = Q diag(d) Qᵀ`` with eigenvalues clamped at 0.

    Tries float32 (or the factor's float64); on an exception or a non-finite result retries in
    float64 with a small diagonal jitter. Returns ``(d, Q)`` in the compute dtype.

    Raises:
        DecompositionError: when the retry fails too (also for a non-finite factor).
    """
    if not _finite(factor):
        raise DecompositionError("factor contains inf/NaN")
    dtype = _compute_dtype(factor.dtype)
    try:
        d, q = torch.linalg.eigh(factor.to(dtype))
        if _finite(d, q):
            return d.clamp_min(0.0), q
    except (RuntimeError, torch.linalg.LinAlgError):
        pass  # retried below in float64 with jitter
    try:
        d, q = torch.linalg.eigh(_jittered(factor))
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        raise DecompositionError(f"eigh failed in float64 with jitter: {err}") from err
    if not _finite(d, q):
        raise DecompositionError("eigh returned inf/NaN in float64 with jitter")
    return d.clamp_min(0.0).to(dtype), q.to(dtype)


def damped_inverse(factor: torch.Tensor, damping: float) -> torch.Tensor:
    """``(factor + damping·I)⁻¹``, with the same float64-with-jitter retry as :func:`eigh`."""
    if not _finite(factor):
        raise DecompositionError("factor contains inf/NaN")
    dtype = _compute_dtype(factor.dtype)
    n = factor.shape[0]
    eye = torch.eye(n, dtype=dtype, device=factor.device)
    try:
        inv = torch.linalg.inv(factor.to(dtype) + damping * eye)
        if _finite(inv):
            return inv
    except (RuntimeError, torch.linalg.LinAlgError):
        pass  # retried below in float64 with jitter
    try:
        inv = torch.linalg.inv(_jittered(factor) + damping * eye.to(torch.float64))
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        raise DecompositionError(f"inverse failed in float64 with jitter: {err}") from err
    if not _finite(inv):
        raise DecompositionError("inverse returned inf/NaN in float64 with jitter")
    return inv.to(dtype)


def pi_split(trace_A: float, a: int, trace_G: float, g: int, damping: float) -> tuple[float, float]:
    """Factored Tikhonov damping (Ba et al. Eq. 3; Osawa et al. SP-NGD Eq. 12).

    Returns ``(λ_A, λ_G) = (π√λ, √λ/π)`` with ``π = sqrt((tr A / a) / (tr G / g))``, so that
    ``(A + λ_A I) ⊗ (G + λ_G I)`` spreads the damping by the factors' mean eigenvalues.
    """
    mean_A, mean_G = trace_A / a, trace_G / g
    pi = (mean_A / mean_G) ** 0.5 if mean_A > 0 and mean_G > 0 else 1.0
    root = damping**0.5
    return pi * root, root / pi


def eigen_reciprocal(
    d_G: torch.Tensor, d_A: torch.Tensor, damping: float, factored: bool = False
) -> torch.Tensor:
    """The eigenbasis scaling of the eigen method, shape ``(g, a)``.

    ``1 / (d_G d_Aᵀ + damping)`` (exact Tikhonov, the default), or with ``factored`` damping
    ``1 / ((d_G + λ_G)(d_A + λ_A)ᵀ)`` (see :func:`pi_split`). Non-finite entries (a factor whose
    decomposition failed is marked by NaN eigenvalues) become 1, which leaves that layer's
    gradient unpreconditioned.
    """
    if factored:
        lam_A, lam_G = pi_split(
            float(d_A.sum()), d_A.numel(), float(d_G.sum()), d_G.numel(), damping
        )
        recip = 1.0 / torch.outer(d_G + lam_G, d_A + lam_A)
    else:
        recip = 1.0 / (torch.outer(d_G, d_A) + damping)
    return torch.where(torch.isfinite(recip), recip, torch.ones_like(recip))


def precondition_eigen(
    grad: torch.Tensor, Q_A: torch.Tensor, Q_G: torch.Tensor, recip: torch.Tensor
) -> torch.Tensor:
    """``V = Q_G [(Q_Gᵀ grad Q_A) ⊙ recip] Q_Aᵀ`` in ``grad.dtype``, computed in float32 or
    better (:func:`precision.compute_dtype`) and clamped to ``grad.dtype``'s finite range."""
    dtype = precision.compute_dtype(grad.dtype)
    Q_A, Q_G, recip = Q_A.to(dtype), Q_G.to(dtype), recip.to(dtype)
    V = Q_G @ ((Q_G.T @ grad.to(dtype) @ Q_A) * recip) @ Q_A.T
    return precision.to_finite(V, grad.dtype)


def precondition_inverse(
    grad: torch.Tensor, A_inv: torch.Tensor, G_inv: torch.Tensor
) -> torch.Tensor:
    """``V = (G + λI)⁻¹ grad (A + λI)⁻¹`` given the damped inverses (computed and returned like
    :func:`precondition_eigen`)."""
    dtype = precision.compute_dtype(grad.dtype)
    V = G_inv.to(dtype) @ grad.to(dtype) @ A_inv.to(dtype)
    return precision.to_finite(V, grad.dtype)
