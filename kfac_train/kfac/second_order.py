"""Second-order methods: how a Kronecker layer turns its factors into a preconditioner.

Each method object belongs to one layer and owns its second-order tensors (their checkpoint
keys, shapes and dtype), how they are computed, how they precondition a gradient, the identity
fallback and the damping (including the one π split, :func:`.linalg.pi_split`). Two placements
use the same object:

* **colocated** (:meth:`SecondOrderMethod.compute`): one rank decomposes or inverts both factors;
* **per factor** (non-colocated COMM-OPT): the owner of ``A`` runs :meth:`factor_part` for
  ``"A"``, the owner of ``G`` for ``"G"``; the parts are broadcast to every rank (receivers use
  :meth:`part_buffers`) and every rank runs :meth:`finish_parts`.

Failures (``docs/kfac.md``): a float64 retry is reported (rate-limited); a failed one keeps the
previous data (the same on every rank and placement) or else the identity (plain gradient).
Shapes: ``A`` is ``(a, a)``, ``G`` is ``(g, g)``, a gradient is ``(g, a)``.
"""

from __future__ import annotations

import abc

import torch

from . import linalg, precision
from .damping import warn_if_swamped
from .diagnostics import RateLimitedWarner

EIGEN = "eigen"
INVERSE = "inverse"
COMPUTE_METHODS = (EIGEN, INVERSE)

Parts = dict[str, list[torch.Tensor]]
#: :func:`.batched.decompose_all` results by factor; a missing one is computed by :mod:`.linalg`.
Ready = dict[str, object] | None


class SecondOrderMethod(abc.ABC):
    """Base class: the tensors of one layer and the bookkeeping every method shares."""

    name: str = ""
    #: Checkpoint keys of :attr:`tensors`, in order.
    keys: tuple[str, ...] = ()
    #: Whether :data:`.batched.STACKED` ``[name]`` computes :meth:`precondition` from tensors.
    stackable: bool = True

    def __init__(
        self,
        layer: str,
        a: int,
        g: int,
        dtype: torch.dtype,
        device: torch.device,
        warner: RateLimitedWarner,
        factored_damping: bool = False,
        precondition_dtype: torch.dtype | None = None,
    ) -> None:
        self.layer, self.a, self.g = layer, a, g
        self.dtype, self.device = dtype, device
        self.warner, self.factored_damping = warner, factored_damping
        #: The dtype of the preconditioning products; ``None``: float32 or better.
        self.precondition_dtype = precondition_dtype
        #: The data in force, or ``None`` before the first update on a rank that holds it.
        self.tensors: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------ tensors
    @abc.abstractmethod
    def shapes(self) -> list[tuple[int, ...]]: ...

    @abc.abstractmethod
    def identity(self) -> list[torch.Tensor]:
        """Second-order data that leaves a gradient unchanged."""

    def has_data(self) -> bool:
        return self.tensors is not None

    def buffers(self) -> list[torch.Tensor]:
        """The tensors in force, allocating empty ones on a rank that is about to receive them."""
        if self.tensors is None:
            self.tensors = [
                torch.empty(s, dtype=self.dtype, device=self.device) for s in self.shapes()
            ]
        return self.tensors

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors or ())

    def _store(self, tensors: list[torch.Tensor]) -> None:
        # Row-major copies: a resumed run (which loads contiguous tensors) then multiplies with
        # the same memory layout, hence bit-identical results.
        self.tensors = [self._cast(t) for t in tensors]

    def _cast(self, data: torch.Tensor) -> torch.Tensor:
        """Cast to ``inv_dtype``, clamped to its finite range (``1/λ`` exceeds float16's 65504
        when ``λ < 1.53e-5``); warns when it clamps (:func:`precision.exceeds_range`)."""
        if precision.exceeds_range(data, self.dtype):
            limit = torch.finfo(self.dtype).max
            self.warner.warn(
                "range",
                self.layer,
                f"layer {self.layer!r}: second-order data exceeds the range of "
                f"inv_dtype={precision.dtype_name(self.dtype)} (damping below {1 / limit:.3g}); "
                f"it is capped at {limit:g}, as if damped more: use inv_dtype=bfloat16 or "
                f"float32, or damping >= {1 / limit:.3g}",
            )
        return precision.to_finite(data, self.dtype).contiguous()

    # ------------------------------------------------------------------ failures
    def _on_retry(self, factor: str):
        def report(reason: str) -> None:
            self.warner.warn(
                "float64 retry",
                self.layer,
                f"{reason} for factor {factor} of layer {self.layer!r}; retried in float64 with "
                "jitter",
            )

        return report

    def _fallback(self, what: str, err: Exception, previous: bool) -> None:
        kept = "its previous second-order data" if previous else "its plain gradient"
        self.warner.warn(
            "fallback",
            self.layer,
            f"{what} of layer {self.layer!r} failed ({err}); it keeps {kept}",
        )

    # ------------------------------------------------------------------ compute
    def requests(self, whiches, A, G, damping) -> list[tuple[torch.Tensor, object]]:
        """The decompositions factors ``whiches`` need, for :func:`.batched.decompose_all`."""
        return [(A if which == "A" else G, None) for which in whiches]

    @abc.abstractmethod
    def compute(self, A: torch.Tensor, G: torch.Tensor, damping: float, ready: Ready = None):
        """Colocated update from the running factors ``A`` and ``G``."""

    @abc.abstractmethod
    def factor_part(
        self, which: str, A: torch.Tensor, G: torch.Tensor, damping: float, ready: Ready = None
    ) -> list[torch.Tensor]:
        """Per-factor update on the owner of factor ``which`` (``"A"`` or ``"G"``); returns the
        tensors to broadcast."""

    @abc.abstractmethod
    def part_buffers(self, which: str, A: torch.Tensor, G: torch.Tensor) -> list[torch.Tensor]:
        """Buffers that receive factor ``which``'s part on the other ranks."""

    def finish_parts(self, parts: Parts, A: torch.Tensor, G: torch.Tensor, damping: float):
        """Combine the received parts into the data in force (every rank, same result). By
        default the received parts already are the data (the inverse method)."""
        del parts, A, G, damping

    @abc.abstractmethod
    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """The preconditioned gradient ``V`` of shape ``(g, a)``."""


class EigenMethod(SecondOrderMethod):
    """Exact-Tikhonov eigen method: ``V = Q_G[(Q_Gᵀ ∇ Q_A) ⊙ recip]Q_Aᵀ`` with
    ``recip = 1/(d_G d_Aᵀ + λ)``, or ``1/((d_G + λ_G)(d_A + λ_A)ᵀ)`` with factored damping."""

    name = EIGEN
    keys = ("Q_A", "Q_G", "recip")

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.a, self.a), (self.g, self.g), (self.g, self.a)]

    def identity(self) -> list[torch.Tensor]:
        kw = {"dtype": self.dtype, "device": self.device}
        return [torch.eye(self.a, **kw), torch.eye(self.g, **kw), torch.ones(self.g, self.a, **kw)]

    def _recip(self, d_A, d_G, A, G, damping: float) -> torch.Tensor:
        split = linalg.pi_split(A, G, damping) if self.factored_damping else None
        return linalg.eigen_reciprocal(d_G, d_A, damping, split)

    def _eigh(self, which: str, factor: torch.Tensor, ready: Ready):
        done = (ready or {}).get(which)
        return done if done is not None else linalg.eigh(factor, self._on_retry(which))

    def compute(self, A: torch.Tensor, G: torch.Tensor, damping: float, ready: Ready = None):
        try:
            d_A, Q_A = self._eigh("A", A, ready)
            d_G, Q_G = self._eigh("G", G, ready)
        except linalg.DecompositionError as err:
            self._fallback("eigendecomposition", err, self.has_data())
            if not self.has_data():
                self.tensors = self.identity()
            return
        warn_if_swamped(self.warner, self.layer, damping, d_A.max(), d_G.max())
        self._store([Q_A, Q_G, self._recip(d_A, d_G, A, G, damping)])

    def _part_dtype(self, factor: torch.Tensor) -> torch.dtype:
        return torch.float64 if factor.dtype == torch.float64 else torch.float32

    def factor_part(self, which, A, G, damping, ready: Ready = None) -> list[torch.Tensor]:
        """``[Q, d]`` of one factor; a failure is sent as NaN eigenvalues, which makes every rank
        keep its previous data in :meth:`finish_parts`."""
        factor = A if which == "A" else G
        try:
            d, Q = self._eigh(which, factor, ready)
        except linalg.DecompositionError as err:
            self._fallback(f"eigendecomposition of factor {which}", err, self.has_data())
            n, dtype = factor.shape[0], self._part_dtype(factor)
            Q = torch.eye(n, dtype=dtype, device=factor.device)
            d = torch.full((n,), float("nan"), dtype=dtype, device=factor.device)
        return [Q, d]

    def part_buffers(self, which: str, A: torch.Tensor, G: torch.Tensor) -> list[torch.Tensor]:
        n, dtype = (self.a, self._part_dtype(A)) if which == "A" else (self.g, self._part_dtype(G))
        kw = {"dtype": dtype, "device": self.device}
        return [torch.empty(n, n, **kw), torch.empty(n, **kw)]

    def finish_parts(self, parts: Parts, A: torch.Tensor, G: torch.Tensor, damping: float):
        (Q_A, d_A), (Q_G, d_G) = parts["A"], parts["G"]
        if not bool(torch.isfinite(d_A).all() & torch.isfinite(d_G).all()):
            # The owner warned; every rank received the same marker and decides the same.
            if not self.has_data():
                self.tensors = self.identity()
            return
        warn_if_swamped(self.warner, self.layer, damping, d_A.max(), d_G.max())
        self._store([Q_A, Q_G, self._recip(d_A.to(Q_A.dtype), d_G.to(Q_G.dtype), A, G, damping)])

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        Q_A, Q_G, recip = self.tensors
        return linalg.precondition_eigen(grad, Q_A, Q_G, recip, self.precondition_dtype)


class InverseMethod(SecondOrderMethod):
    """Factored inverse method: ``V = (G + λ_G I)⁻¹ ∇ (A + λ_A I)⁻¹`` with ``λ_A = λ_G = λ``,
    or the π split of :func:`.linalg.pi_split` with factored damping."""

    name = INVERSE
    keys = ("A_inv", "G_inv")

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.a, self.a), (self.g, self.g)]

    def identity(self) -> list[torch.Tensor]:
        kw = {"dtype": self.dtype, "device": self.device}
        return [torch.eye(self.a, **kw), torch.eye(self.g, **kw)]

    def _dampings(self, A, G, damping: float) -> dict[str, float | torch.Tensor]:
        if not self.factored_damping:
            return {"A": damping, "G": damping}
        lam_A, lam_G = linalg.pi_split(A, G, damping)
        return {"A": lam_A, "G": lam_G}

    def requests(self, whiches, A, G, damping) -> list[tuple[torch.Tensor, object]]:
        lam = self._dampings(A, G, damping)
        return [(A if which == "A" else G, lam[which]) for which in whiches]

    def _inverse(self, which: str, factor: torch.Tensor, lam, ready: Ready) -> torch.Tensor:
        index = 0 if which == "A" else 1
        previous = None if self.tensors is None else self.tensors[index]
        done = (ready or {}).get(which)
        if done is not None:
            return self._cast(done)
        try:
            inverse = linalg.damped_inverse(factor, lam, self._on_retry(which))
            return self._cast(inverse)
        except linalg.DecompositionError as err:
            self._fallback(f"inverse of factor {which}", err, previous is not None)
            return previous if previous is not None else self.identity()[index]

    def compute(self, A: torch.Tensor, G: torch.Tensor, damping: float, ready: Ready = None):
        norms = [torch.linalg.norm(F.double()) for F in (A, G)]  # ≥ the largest eigenvalue
        warn_if_swamped(self.warner, self.layer, damping, *norms, bound="‖A‖_F·‖G‖_F")
        lam = self._dampings(A, G, damping)
        inverses = [self._inverse(w, f, lam[w], ready) for w, f in (("A", A), ("G", G))]
        self.tensors = inverses

    def factor_part(self, which, A, G, damping, ready: Ready = None) -> list[torch.Tensor]:
        index = 0 if which == "A" else 1
        lam = self._dampings(A, G, damping)[which]
        inverse = self._inverse(which, A if which == "A" else G, lam, ready)
        self.buffers()[index] = inverse
        return [inverse]

    def part_buffers(self, which: str, A: torch.Tensor, G: torch.Tensor) -> list[torch.Tensor]:
        return [self.buffers()[0 if which == "A" else 1]]

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        A_inv, G_inv = self.tensors
        return linalg.precondition_inverse(grad, A_inv, G_inv, self.precondition_dtype)


#: The method classes by ``compute_method`` name (one of :data:`COMPUTE_METHODS`).
METHODS: dict[str, type[SecondOrderMethod]] = {EIGEN: EigenMethod, INVERSE: InverseMethod}

__all__ = ["COMPUTE_METHODS", "EIGEN", "INVERSE", "METHODS", "EigenMethod", "InverseMethod"]
__all__ += ["SecondOrderMethod"]
