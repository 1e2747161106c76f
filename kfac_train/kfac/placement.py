"""Carrying out the work plan (:mod:`.assignment`): who computes second-order data, who receives
it (step phase 2), and who sends preconditioned gradients to whom (step phase 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .assignment import WorkPlan
from .comm import GRAD_BROADCAST, SECOND_ORDER_BROADCAST, Communicator, Pending


def update_second_order(
    blocks: dict[str, Any], plan: WorkPlan, comm: Communicator, damping: float
) -> None:
    """Recompute every block's second-order data where the plan puts it.

    * replicated blocks (BatchNorm): every rank, no communication;
    * colocated: the layer's owner computes both factors' data and broadcasts it to the layer's
      other gradient workers (its column; nobody under MEM-OPT);
    * non-colocated (COMM-OPT): each factor's owner computes its part and broadcasts it to all
      ranks; every rank then finishes the layer identically (a failed part makes every rank keep
      its previous data).
    """
    rank = comm.rank
    everyone = tuple(range(comm.world_size))
    pending: list[Pending] = []
    finish: list[Callable[[], None]] = []
    for name, block in blocks.items():
        if block.replicated:
            block.update_second_order(damping)
            continue
        place = plan.layers[name]
        if plan.colocate_factors:
            if place.a_worker == rank:
                block.update_second_order(damping)
            group = plan.column_group(place.column)
            if rank in group and len(group) > 1:
                tensors = block.method.buffers()
                pending.append(
                    comm.broadcast(tensors, place.a_worker, group, SECOND_ORDER_BROADCAST)
                )
            continue
        method, running = block.method, (block.A.running, block.G.running)
        parts: dict[str, list[torch.Tensor]] = {}
        for which, owner in (("A", place.a_worker), ("G", place.g_worker)):
            if owner == rank:
                parts[which] = method.factor_part(which, *running, damping)
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
