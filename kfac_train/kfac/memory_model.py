"""Predicted K-FAC memory and communication per rank (used by ``grad_worker_fraction="auto"``).

A pure function of the registered layer shapes, the world size, the gradient-worker fraction and
the dtypes: no process group, no model. It reproduces exactly what
:meth:`KFACPreconditioner.memory_bytes` and :meth:`KFACPreconditioner.comm_bytes` report (see
``docs/kfac.md``, "What the preconditioner reports"), which ``tests/kfac/test_memory_model.py``
checks on real gloo ranks. Layer ``ℓ`` has ``A`` of size ``a × a`` (bias column included), ``G`` of
size ``g × g`` and a ``g × a`` gradient; ``P`` ranks; ``m = max(1, round(f·P))`` gradient workers.

* ``factors`` (every rank): ``Σ (a² + g²)`` in ``factor_dtype`` plus ``3C`` per unit-wise
  layer (BatchNorm, LayerNorm) with ``C`` channels or features;
* ``second_order`` (rank ``r``, after the first inverse update): ``Σ`` over the layers ``r`` is a
  gradient worker of ``(a² + g² + g·a)`` (eigen) or ``(a² + g²)`` (inverse) in ``inv_dtype``, plus
  ``3C`` per unit-wise layer in ``factor_dtype`` (every rank inverts those);
* ``factor_allreduce`` (every factor-update step, every rank): ``Σ (a² + g²)`` or, with
  ``symmetry_aware``, ``Σ (a(a+1)/2 + g(g+1)/2)``, plus ``3C`` per unit-wise layer, all in
  ``comm_dtype``;
* ``second_order_broadcast`` (every inverse-update step, rank ``r``): the second-order data of the
  layers whose ``m > 1`` gradient workers include ``r``; COMM-OPT with ``colocate_factors=False``
  sends eigenvectors and eigenvalues (``a² + a + g² + g`` in the decomposition dtype) instead;
* a layer with a diagonal ``A`` (``LayerShape.diagonal_a``, embeddings) stores ``A`` as ``a``
  entries: ``a`` replaces ``a²`` (and ``a(a+1)/2``) in the factors and the all-reduce; its eigen
  data is ``g² + g·a`` (no ``Q_A``), its inverse data ``a + g²``, its split-factor broadcast
  ``a + g² + g``;
* ``grad_broadcast`` (every step, every rank, when ``m < P``): ``Σ g·a`` in the gradient dtype.

:func:`.auto_strategy.choose_grad_worker_fraction` picks, among the fractions ``m/P`` (``m``
dividing ``P``), the one with the least predicted network traffic per step whose largest per-rank
memory fits a budget (payload bytes times the number of ranks they reach, so a broadcast inside a
smaller group costs less: the reason HYBRID-OPT exists).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .assignment import LayerShape, num_grad_workers, plan_work
from .precision import default_comm_dtype, factor_storage_dtype
from .second_order import EIGEN
from .unit_wise import BLOCK_ELEMENTS


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Footprint:
    """Predicted K-FAC state and traffic of every rank for one gradient-worker fraction.

    ``memory[r]`` is ``{"factors": bytes, "second_order": bytes}`` of rank ``r`` (as
    ``memory_bytes()`` reports once second-order data exists), plus ``"stale_history"`` (the
    two kept values ``X₋₁``, ``X₋₂`` of every statistic) under ``stale="adaptive"``.
    Communication is payload bytes per occurrence, as ``comm_bytes()`` counts them:
    ``factor_allreduce`` per factor-update step and ``grad_broadcast`` per step (the same on
    every rank), ``second_order_broadcast[r]`` per inverse-update step. ``network_*``: bytes
    delivered over the network per occurrence, all ranks together
    (:meth:`network_bytes_per_step`).
    """

    fraction: float
    grad_workers: int
    memory: tuple[dict[str, int], ...]
    factor_allreduce: int
    second_order_broadcast: tuple[int, ...]
    grad_broadcast: int
    network_factor_allreduce: int = 0
    network_second_order: int = 0
    network_grad: int = 0

    @property
    def max_memory(self) -> int:
        """The largest K-FAC state any rank holds (what a per-rank budget must cover)."""
        return max(sum(m.values()) for m in self.memory)

    def step_bytes(self, rank: int, *, factor_update: bool, inverse_update: bool) -> dict[str, int]:
        """``comm_bytes()["step"]`` of ``rank`` for a step of the given kind."""
        return {
            "factor_allreduce": self.factor_allreduce if factor_update else 0,
            "second_order_broadcast": self.second_order_broadcast[rank] if inverse_update else 0,
            "grad_broadcast": self.grad_broadcast,
        }

    def network_bytes_per_step(self, factor_update_steps: int, inv_update_steps: int) -> float:
        """Mean bytes delivered over the network per step, all ranks together: what the choice
        minimises.

        A broadcast inside a group of ``k`` ranks delivers its payload to ``k − 1`` ranks, and a
        ring all-reduce of ``n`` bytes moves ``2(P − 1)·n``. So with ``m`` gradient workers
        (``S_ℓ`` second-order and ``G_ℓ`` gradient bytes of layer ``ℓ``) the fraction costs
        ``(m − 1)·Σ S_ℓ / inv_update_steps + (P − m)·Σ G_ℓ`` per step: COMM-OPT (``m = P``) when
        second-order data is rarely refreshed, unless memory rules it out; then the largest
        ``m`` that fits.
        """
        return (
            self.network_factor_allreduce / factor_update_steps
            + self.network_second_order / inv_update_steps
            + self.network_grad
        )


def candidate_fractions(world_size: int) -> list[float]:
    """Every valid fraction ``m/P`` (``m`` divides ``P``), from COMM-OPT (1) down to MEM-OPT."""
    return [m / world_size for m in range(world_size, 0, -1) if world_size % m == 0]


def predict_footprint(
    shapes: Sequence[LayerShape],
    world_size: int,
    fraction: float,
    *,
    compute_method: str = EIGEN,
    factor_dtype: torch.dtype = torch.float32,
    inv_dtype: torch.dtype = torch.float32,
    comm_dtype: torch.dtype | None = None,
    grad_dtype: torch.dtype = torch.float32,
    symmetry_aware: bool = False,
    colocate_factors: bool = True,
    assignment_cost: str = "compute",
    unit_wise_channels: Sequence[int] = (),
    stale_history: bool = False,
) -> Footprint:
    """Predict what each rank holds and sends for ``fraction`` (module docstring: formulas).

    ``unit_wise_channels``: ``C`` of every unit-wise BatchNorm / LayerNorm layer;
    ``stale_history``: the stale schedule keeps two more copies of every factor (``.stale``)."""
    plan = plan_work(
        shapes, world_size, fraction, colocate_factors=colocate_factors, cost=assignment_cost
    )
    m = num_grad_workers(fraction, world_size)
    # 16-bit factor dtypes keep their sums and running averages in float32 (precision.py).
    f_size, i_size = _size(factor_storage_dtype(factor_dtype)), _size(inv_dtype)
    c_size, g_size = _size(comm_dtype or default_comm_dtype(factor_dtype)), _size(grad_dtype)
    bn_elems = sum(BLOCK_ELEMENTS * c for c in unit_wise_channels)
    eigen = compute_method == EIGEN

    def a_elems(s: LayerShape) -> int:
        return s.a if s.diagonal_a else s.a * s.a

    def second_order_elems(s: LayerShape) -> int:
        if eigen:
            return (0 if s.diagonal_a else s.a * s.a) + s.g * s.g + s.g * s.a
        return a_elems(s) + s.g * s.g

    factors = sum(a_elems(s) + s.g * s.g for s in shapes) * f_size + bn_elems * f_size
    memory = []
    for rank in range(world_size):
        held = sum(
            second_order_elems(s)
            for s in shapes
            if not plan.colocate_factors or plan.is_grad_worker(s.name, rank)
        )
        memory.append({"factors": factors, "second_order": held * i_size + bn_elems * f_size})
        if stale_history:
            memory[-1]["stale_history"] = 2 * factors

    if world_size == 1:
        return Footprint(fraction, m, tuple(memory), 0, (0,), 0)

    def packed(n: int) -> int:
        return n * (n + 1) // 2 if symmetry_aware else n * n

    def packed_a(s: LayerShape) -> int:
        return s.a if s.diagonal_a else packed(s.a)

    allreduce = (sum(packed_a(s) + packed(s.g) for s in shapes) + bn_elems) * c_size
    decomposition = _size(torch.float64 if factor_dtype == torch.float64 else torch.float32)

    def broadcast_bytes(s: LayerShape) -> int:
        """Second-order payload of one layer (split factors: eigenvectors and eigenvalues)."""
        if plan.colocate_factors:
            return second_order_elems(s) * i_size
        if eigen:
            a_part = s.a if s.diagonal_a else s.a * s.a + s.a
            return (a_part + s.g * s.g + s.g) * decomposition
        return second_order_elems(s) * i_size  # inverse: the same tensors as colocated

    # Split factors (COMM-OPT only) broadcast from each factor's owner to every rank.
    group = world_size if not plan.colocate_factors else m
    network_second_order = sum((group - 1) * broadcast_bytes(s) for s in shapes)
    second_order = tuple(
        sum(
            broadcast_bytes(s)
            for s in shapes
            if group > 1 and (not plan.colocate_factors or plan.is_grad_worker(s.name, rank))
        )
        for rank in range(world_size)
    )
    grad_bytes = sum(s.g * s.a for s in shapes) * g_size
    grads = grad_bytes if m < world_size else 0
    return Footprint(
        fraction,
        m,
        tuple(memory),
        allreduce,
        second_order,
        grads,
        network_factor_allreduce=2 * (world_size - 1) * allreduce,
        network_second_order=network_second_order,
        network_grad=(world_size - m) * grad_bytes,
    )
