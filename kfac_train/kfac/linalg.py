"""Linear algebra of K-FAC: decompositions with a robust fallback, and preconditioning.

Nothing here communicates or knows about modules. Shapes follow ``kfac-math.md``: a layer gradient
``grad`` is ``(g, a)`` (output rows × input columns, bias column last), ``A`` is ``(a, a)`` and
``G`` is ``(g, g)``.
"""

from __future__ import annotations

from collections.abc import Callable

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


#: Called with the reason when the first attempt failed and the float64 retry is taken.
OnRetry = Callable[[str], None]


def eigh(
    factor: torch.Tensor, on_retry: OnRetry | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition ``factor = Q diag(d) Qᵀ`` with eigenvalues clamped at 0.

    Tries float32 (or the factor's float64); on an exception or a non-finite result retries in
    float64 with a small diagonal jitter (``on_retry`` is told why). Returns ``(d, Q)`` in the
    compute dtype.

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
        reason = f"eigh in {dtype} returned inf/NaN"
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        reason = f"eigh in {dtype} failed: {err}"
    if on_retry is not None:
        on_retry(reason)
    try:
        d, q = torch.linalg.eigh(_jittered(factor))
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        raise DecompositionError(f"eigh failed in float64 with jitter: {err}") from err
    if not _finite(d, q):
        raise DecompositionError("eigh returned inf/NaN in float64 with jitter")
    return d.clamp_min(0.0).to(dtype), q.to(dtype)


def damped_inverse(
    factor: torch.Tensor, damping: float | torch.Tensor, on_retry: OnRetry | None = None
) -> torch.Tensor:
    """``(factor + damping·I)⁻¹``, with the same float64-with-jitter retry as :func:`eigh`
    (``damping`` may be a 0-d tensor: no host synchronisation)."""
    if not _finite(factor):
        raise DecompositionError("factor contains inf/NaN")
    dtype = _compute_dtype(factor.dtype)
    n = factor.shape[0]
    eye = torch.eye(n, dtype=dtype, device=factor.device)
    try:
        inv = torch.linalg.inv(factor.to(dtype) + damping * eye)
        if _finite(inv):
            return inv
        reason = f"inverse in {dtype} returned inf/NaN"
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        reason = f"inverse in {dtype} failed: {err}"
    if on_retry is not None:
        on_retry(reason)
    try:
        inv = torch.linalg.inv(_jittered(factor) + damping * eye.to(torch.float64))
    except (RuntimeError, torch.linalg.LinAlgError) as err:
        raise DecompositionError(f"inverse failed in float64 with jitter: {err}") from err
    if not _finite(inv):
        raise DecompositionError("inverse returned inf/NaN in float64 with jitter")
    return inv.to(dtype)


def pi_split(A: torch.Tensor, G: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factored Tikhonov damping (Ba et al. Eq. 3; Osawa et al. SP-NGD Eq. 12), the one
    definition used by every compute method and placement.

    Returns 0-d float64 tensors ``(λ_A, λ_G) = (π√λ, √λ/π)`` with
    ``π = sqrt((tr A / a) / (tr G / g))`` from the *running factors* (every rank holds them after
    the factor all-reduce, so any rank computes the same π without communication and without a
    host synchronisation). ``π = 1`` when a mean trace is not positive and finite. A 1-D ``A``
    is a diagonal factor given by its diagonal (embeddings).
    """
    mean_A = (A if A.dim() == 1 else A.diagonal()).to(torch.float64).mean()
    mean_G = G.diagonal().to(torch.float64).mean()
    ratio = mean_A / mean_G
    valid = (mean_A > 0) & (mean_G > 0) & torch.isfinite(ratio)
    pi = torch.where(valid, ratio, torch.ones_like(ratio)).sqrt()
    root = damping**0.5
    return pi * root, root / pi


def eigen_reciprocal(
    d_G: torch.Tensor,
    d_A: torch.Tensor,
    damping: float,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The eigenbasis scaling of the eigen method, shape ``(g, a)``.

    ``1 / (d_G d_Aᵀ + damping)`` (exact Tikhonov, the default), or with the factored damping
    ``split = (λ_A, λ_G)`` of :func:`pi_split`: ``1 / ((d_G + λ_G)(d_A + λ_A)ᵀ)``.
    """
    if split is not None:
        lam_A, lam_G = (lam.to(d_A.dtype) for lam in split)
        return 1.0 / torch.outer(d_G + lam_G, d_A + lam_A)
    return 1.0 / (torch.outer(d_G, d_A) + damping)


def precondition_eigen(
    grad: torch.Tensor,
    Q_A: torch.Tensor,
    Q_G: torch.Tensor,
    recip: torch.Tensor,
    precondition_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``V = Q_G [(Q_Gᵀ grad Q_A) ⊙ recip] Q_Aᵀ`` in ``grad.dtype``, computed in
    ``precondition_dtype`` or else float32 or better (:func:`precision.product_dtype`) and
    clamped to ``grad.dtype``'s finite range."""
    dtype = precision.product_dtype(grad.dtype, precondition_dtype)
    Q_A, Q_G, recip = Q_A.to(dtype), Q_G.to(dtype), recip.to(dtype)
    V = Q_G @ ((Q_G.T @ grad.to(dtype) @ Q_A) * recip) @ Q_A.T
    return precision.to_finite(V, grad.dtype)


def precondition_inverse(
    grad: torch.Tensor,
    A_inv: torch.Tensor,
    G_inv: torch.Tensor,
    precondition_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``V = (G + λI)⁻¹ grad (A + λI)⁻¹`` given the damped inverses (computed and returned like
    :func:`precondition_eigen`)."""
    dtype = precision.product_dtype(grad.dtype, precondition_dtype)
    V = G_inv.to(dtype) @ grad.to(dtype) @ A_inv.to(dtype)
    return precision.to_finite(V, grad.dtype)
