"""Batched second-order computations: the hot path of inverse-update steps and of every step.

* :func:`decompose_all` — every eigendecomposition (or damped inverse) a rank owes in one
  inverse-update step, equal-size factors stacked into one ``(k, n, n)`` call. Whether each
  result is usable (finite factor and result) is decided on the device; the host reads all the
  verdicts with **one** synchronisation per step. An unusable result (or a batch that raised)
  is returned as ``None``: the caller then takes the per-factor path of :mod:`.linalg`
  (float64 retry with jitter, warnings, fallback), so failures behave exactly as before.
* :class:`StackedPreconditioner` — layers whose second-order data have equal shapes are
  preconditioned together with batched matrix products; the stacked data (already in the
  products' dtype, :func:`.precision.product_dtype`) is built once when the second-order data
  changes, not on every step.
* :func:`kl_terms` — the KL-clip sum ``Σ_l ⟨V_l, ∇_l⟩`` from one dot product per layer, without
  float64 copies of the gradients.

Nothing here communicates. Shapes: a factor is ``(n, n)``; a layer gradient ``(g, a)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import precision

EIGH = "eigh"
INVERSE = "inverse"

#: A decomposition request: ``(factor, damping)``; ``damping`` is ``None`` for an eigh and a
#: float or 0-d tensor for a damped inverse ``(factor + damping·I)⁻¹``.
Request = tuple[torch.Tensor, "float | torch.Tensor | None"]

#: Layers are stacked for preconditioning only while their second-order data is small
#: (``a² + g²`` entries at most): there per-operation overhead dominates, and the stacked copy
#: costs little memory. Large layers gain nothing from ``bmm`` and keep their own products.
STACK_MAX_ENTRIES = 1 << 18


def _stacked_eigen(grads: torch.Tensor, data: list[torch.Tensor]) -> torch.Tensor:
    """``V = Q_G [(Q_Gᵀ ∇ Q_A) ⊙ recip] Q_Aᵀ`` for ``(k, g, a)`` gradients, stacked data."""
    Q_A, Q_G, recip = data
    return Q_G @ ((Q_G.mT @ grads @ Q_A) * recip) @ Q_A.mT


def _stacked_inverse(grads: torch.Tensor, data: list[torch.Tensor]) -> torch.Tensor:
    """``V = G⁻¹ ∇ A⁻¹`` (damped inverses) for ``(k, g, a)`` gradients, stacked data."""
    A_inv, G_inv = data
    return G_inv @ grads @ A_inv


#: Batched preconditioning by second-order method name (:mod:`.second_order`).
STACKED = {"eigen": _stacked_eigen, "inverse": _stacked_inverse}


def decompose_all(kind: str, requests: Sequence[Request]) -> list[Any]:
    """Run every request, equal sizes batched; one host synchronisation in all.

    Returns, per request, ``(d, Q)`` (eigenvalues clamped at 0, in float32 or the factor's
    float64) for ``kind="eigh"``, the damped inverse for ``kind="inverse"``, or ``None`` where
    the fast attempt failed (the caller retries that factor alone with :mod:`.linalg`).
    """
    groups: dict[tuple, list[int]] = {}
    for index, (factor, _) in enumerate(requests):
        dtype = precision.compute_dtype(factor.dtype)
        groups.setdefault((factor.shape[0], dtype, factor.device), []).append(index)
    results: list[Any] = [None] * len(requests)
    verdicts: list[tuple[list[int], torch.Tensor, Any]] = []
    for (n, dtype, device), members in groups.items():
        factors = [requests[i][0].to(dtype) for i in members]
        stack = factors[0].unsqueeze(0) if len(factors) == 1 else torch.stack(factors)
        ok = precision.all_finite(stack, batched=True)
        # A non-finite factor would spoil (or raise for) its whole batch: it is decomposed as
        # the identity instead, and its verdict already says "take the per-factor path".
        eye = torch.eye(n, dtype=dtype, device=device)
        stack = torch.where(ok[:, None, None], stack, eye)
        try:
            if kind == EIGH:
                d, q = torch.linalg.eigh(stack)
                ok = (
                    ok
                    & precision.all_finite(d, batched=True)
                    & precision.all_finite(q, batched=True)
                )
                out: Any = (d.clamp_min(0.0), q)
            else:
                lams = [requests[i][1] for i in members]
                lam = torch.stack([torch.as_tensor(x, dtype=dtype, device=device) for x in lams])
                # Cholesky, not LU: the damped factors are SPD, it is half the work, and this
                # torch build's batched float32 LU on CPU fails (MKL SLASWP) for n >~ 512 with
                # several threads. A factor that is not positive definite (info > 0) takes the
                # per-factor path (float64 with jitter).
                chol, info = torch.linalg.cholesky_ex(stack + lam[:, None, None] * eye)
                inv = torch.cholesky_inverse(chol)
                ok = ok & (info == 0) & precision.all_finite(inv, batched=True)
                out = inv
        except (RuntimeError, torch.linalg.LinAlgError):
            continue  # the whole group takes the per-factor path
        verdicts.append((members, ok, out))
    if not verdicts:
        return results
    flags = torch.cat([ok for _, ok, _ in verdicts]).tolist()  # the one host sync
    position = 0
    for members, _, out in verdicts:
        for j, index in enumerate(members):
            if flags[position + j]:
                results[index] = (out[0][j], out[1][j]) if kind == EIGH else out[j]
        position += len(members)
    return results


def kl_terms(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``Σ ⟨V, ∇⟩`` over ``(V, ∇)`` pairs as a 0-d float64 tensor: one dot product per layer
    in the gradients' compute dtype (float32 or float64), no float64 copies."""
    dots = []
    for V, grad in pairs:
        dtype = precision.compute_dtype(grad.dtype)
        dots.append(torch.dot(V.reshape(-1).to(dtype), grad.reshape(-1).to(dtype)))
    return torch.stack([d.to(torch.float64) for d in dots]).sum()


class StackedPreconditioner:
    """Preconditions groups of layers with equal shapes by batched products.

    A group is the layers whose method has the same kind, the same second-order shapes and
    dtype and the same products' dtype, and whose gradients share a dtype; members of a group
    of one, and large layers (:data:`STACK_MAX_ENTRIES`), use their method's own
    :meth:`precondition`. The stacked data is cached and rebuilt when any member's tensors
    change (new tensors, or an in-place write such as a broadcast into them, detected by the
    tensors' version counters).
    """

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[tuple, list[torch.Tensor]]] = {}

    @staticmethod
    def _stackable(method: Any) -> bool:
        return (
            getattr(method, "stackable", False)
            and method.name in STACKED
            and (method.a * method.a + method.g * method.g <= STACK_MAX_ENTRIES)
        )

    def _stacked(self, key: tuple, methods: list[Any], dtype: torch.dtype) -> list[torch.Tensor]:
        # The cache holds the tensors themselves, so an identity test cannot be fooled by a
        # reused id; the version counter catches in-place writes.
        stamp = tuple((t, t._version) for m in methods for t in m.tensors)
        cached = self._cache.get(key)
        fresh = cached is not None and all(
            t is u and v == w for (t, v), (u, w) in zip(cached[0], stamp, strict=True)
        )
        if not fresh:
            columns = zip(*(m.tensors for m in methods), strict=True)
            cached = (stamp, [torch.stack([t.to(dtype) for t in col]) for col in columns])
            self._cache[key] = cached
        return cached[1]

    def __call__(self, work: dict[str, tuple[Any, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``work`` maps a layer name to ``(method, grad)``; returns the preconditioned ``V``."""
        groups: dict[tuple, list[str]] = {}
        out: dict[str, torch.Tensor] = {}
        for name, (method, grad) in work.items():
            if not self._stackable(method):
                out[name] = method.precondition(grad)
                continue
            shapes = tuple(tuple(t.shape) for t in method.tensors)
            dtype = precision.product_dtype(grad.dtype, method.precondition_dtype)
            key = (type(method), shapes, method.dtype, grad.dtype, grad.device, dtype)
            groups.setdefault(key, []).append(name)
        for key, names in groups.items():
            methods = [work[n][0] for n in names]
            if len(names) == 1:
                out[names[0]] = methods[0].precondition(work[names[0]][1])
                continue
            grad_dtype, dtype = key[3], key[5]
            data = self._stacked(key + (tuple(names),), methods, dtype)
            grads = torch.stack([work[n][1].to(dtype) for n in names])
            V = STACKED[methods[0].name](grads, data)
            V = precision.to_finite(V, grad_dtype)
            out.update(zip(names, V.unbind(0), strict=True))
        return out


__all__ = ["EIGH", "INVERSE", "StackedPreconditioner", "decompose_all", "kl_terms"]
