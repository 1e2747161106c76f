"""Carrying out the work plan (:mod:`.assignment`): who computes second-order data, who receives
it (step phase 2), and who sends preconditioned gradients to whom (step phase 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import batched
from .assignment import WorkPlan
from .comm import GRAD_BROADCAST, SECOND_ORDER_BROADCAST, Communicator, Pending

#: ``{layer: [running factor, ...]}``: the factors second-order data is computed from.
Factors = dict[str, list[torch.Tensor]]
#: ``{layer: {"A"/"G": result of batched.decompose_all}}``.
Decomposed = dict[str, dict[str, Any]]


def running_factors(blocks: dict[str, Any]) -> Factors:
    """Each block's running factors, as they are (no copies)."""
    return {name: [f.running for f in block.factors()] for name, block in blocks.items()}


def decompose_owned(
    blocks: dict[str, Any], plan: WorkPlan, rank: int, factors: Factors, damping: float
) -> Decomposed:
    """The heavy part of :func:`update_second_order`: every eigendecomposition or inverse this
    rank owes (colocated: both factors of the layers it owns; per factor: the factors it owns),
    equal sizes batched, with one host synchronisation (:func:`.batched.decompose_all`).
    Pure in its inputs (no state is changed), so it may run on a worker thread."""
    jobs: dict[str, list[tuple[str, str, Any]]] = {}
    for name, block in blocks.items():
        if block.replicated:
            continue
        place = plan.layers[name]
        owned = [w for w, o in (("A", place.a_worker), ("G", place.g_worker)) if o == rank]
        if plan.colocate_factors:
            owned = ["A", "G"] if place.a_worker == rank else []
        requests = block.method.requests(owned, *factors[name], damping)
        kind = batched.EIGH if block.method.name == "eigen" else batched.INVERSE
        jobs.setdefault(kind, []).extend(
            (name, which, request)
            for which, request in zip(owned, requests, strict=True)
            if request is not None  # None: nothing to decompose (a diagonal factor)
        )
    out: Decomposed = {}
    for kind, items in jobs.items():
        results = batched.decompose_all(kind, [request for _, _, request in items])
        for (name, which, _), result in zip(items, results, strict=True):
            out.setdefault(name, {})[which] = result
    return out


def update_second_order(
    blocks: dict[str, Any],
    plan: WorkPlan,
    comm: Communicator,
    damping: float,
    factors: Factors | None = None,
    ready: Decomposed | None = None,
) -> None:
    """Recompute every block's second-order data where the plan puts it, from ``factors``
    (default: the running factors) and the decompositions ``ready`` (default: computed now by
    :func:`decompose_owned`; the asynchronous mode passes those its worker computed).

    * replicated blocks (BatchNorm): every rank, no communication;
    * colocated: the layer's owner computes both factors' data and broadcasts it to the layer's
      other gradient workers (its column; nobody under MEM-OPT);
    * non-colocated (COMM-OPT): each factor's owner computes its part and broadcasts it to all
      ranks; every rank then finishes the layer identically (a failed part makes every rank keep
      its previous data).
    """
    rank = comm.rank
    everyone = tuple(range(comm.world_size))
    factors = running_factors(blocks) if factors is None else factors
    if ready is None:
        ready = decompose_owned(blocks, plan, rank, factors, damping)
    pending: list[Pending] = []
    finish: list[Callable[[], None]] = []
    for name, block in blocks.items():
        if block.replicated:
            block.method.compute(*factors[name], damping)
            continue
        place = plan.layers[name]
        if plan.colocate_factors:
            if place.a_worker == rank:
                block.method.compute(*factors[name], damping, ready.get(name))
            group = plan.column_group(place.column)
            if rank in group and len(group) > 1:
                tensors = block.method.buffers()
                pending.append(
                    comm.broadcast(tensors, place.a_worker, group, SECOND_ORDER_BROADCAST)
                )
            continue
        method, running = block.method, tuple(factors[name])
        parts: dict[str, list[torch.Tensor]] = {}
        for which, owner in (("A", place.a_worker), ("G", place.g_worker)):
            if owner == rank:
                parts[which] = method.factor_part(which, *running, damping, ready.get(name))
            else:
                parts[which] = method.part_buffers(which, *running)
            pending.append(comm.broadcast(parts[which], owner, everyone, SECOND_ORDER_BROADCAST))
        finish.append(lambda m=method, p=parts, r=running: m.finish_parts(p, *r, damping))
    for p in pending:
        p.wait()
    for f in finish:
        f()


def broadcast_preconditioned(
    plan: WorkPlan,
    comm: Communicator,
    planned: dict[str, Any],
    preconditioned: dict[str, torch.Tensor],
) -> None:
    """Each gradient worker sends its layers' preconditioned gradients to its row (in place into
    ``preconditioned`` on the receivers); nothing when every rank is a gradient worker."""
    rank = comm.rank
    if plan.num_grad_workers == plan.world_size:
        return
    row = plan.row_group(plan.row_of(rank))
    by_source: dict[int, list[torch.Tensor]] = {}
    for name in planned:
        by_source.setdefault(plan.grad_source(name, rank), []).append(preconditioned[name])
    pending = [
        comm.broadcast(tensors, src, row, GRAD_BROADCAST)
        for src, tensors in sorted(by_source.items())
    ]
    for p in pending:
        p.wait()
