"""Checkpoint state: the step counter, every block's running statistics and the second-order
data in force, gathered on rank 0; and loading it back under any world size or strategy.

Layout (unchanged since the first release)::

    {"steps": int, "compute_method": "eigen" | "inverse",
     "layers":    {name: {"A", "G", "Q_A", "Q_G", "recip"} or {"A", "G", "A_inv", "G_inv"}},
     "batchnorm": {name: {"F", "F_inv"}},
     "layernorm": {name: {"F", "F_inv"}},
     "statistics_schedule": {...}}  # .stale.StaleStatistics.state_dict(); absent before it

An embedding's entry in ``"layers"`` holds ``A`` as its ``(V,)`` diagonal and, for the eigen
method, no ``Q_A`` (``{"A", "G", "Q_G", "recip"}``; :mod:`.embedding`).

A block's entry lives in its ``state_section`` and uses its ``factor_keys`` and its method's
``keys``; second-order keys are present only where the data existed.
"""

from __future__ import annotations

from typing import Any

import torch

from .assignment import WorkPlan
from .comm import Communicator
from .stale import StaleStatistics

SECTIONS = ("layers", "batchnorm", "layernorm")


def by_section(blocks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The blocks grouped by checkpoint section (every section present, model order kept)."""
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for name, block in blocks.items():
        sections[block.state_section][name] = block
    return sections


def _second_order(block: Any, plan: WorkPlan, comm: Communicator) -> dict[str, torch.Tensor]:
    """The block's second-order data on rank 0 (point-to-point from its owner when rank 0 does
    not hold it); other ranks return what they hold."""
    method, name = block.method, block.name
    rank = comm.rank
    if block.replicated or not plan.colocate_factors:
        holders_include_root, holds = True, method.has_data()
    else:
        holders_include_root = plan.is_grad_worker(name, 0)
        holds = method.has_data() and plan.is_grad_worker(name, rank)
    if not holders_include_root and comm.world_size > 1:
        owner = plan.layers[name].a_worker
        if rank == owner:
            comm.send(method.tensors, dst=0)
        if rank == 0:
            # Rank 0 receives into fresh buffers without becoming a gradient worker.
            device = block.factors()[0].running.device
            tensors = [torch.empty(s, dtype=method.dtype, device=device) for s in method.shapes()]
            comm.recv(tensors, src=owner)
            return dict(zip(method.keys, tensors, strict=True))
        return {}
    if not holds:
        return {}
    return {k: t.detach().clone() for k, t in zip(method.keys, method.tensors, strict=True)}


def state_dict(
    blocks: dict[str, Any],
    plan: WorkPlan,
    comm: Communicator,
    *,
    steps: int,
    compute_method: str,
    include_factors: bool,
    schedule: StaleStatistics | None = None,
) -> dict[str, Any]:
    """A collective in distributed runs: every rank must call it; rank 0's result is complete."""
    state: dict[str, Any] = {"steps": steps, "compute_method": compute_method}
    state.update({section: {} for section in SECTIONS})
    for name, block in blocks.items():
        entry: dict[str, torch.Tensor] = {}
        if include_factors:
            for key, factor in zip(block.factor_keys, block.factors(), strict=True):
                entry[key] = factor.running.detach().clone()
            entry.update(_second_order(block, plan, comm))
        state[block.state_section][name] = entry
    if schedule is not None:
        state["statistics_schedule"] = schedule.state_dict()
    return state


def load_state_dict(
    blocks: dict[str, Any],
    plan: WorkPlan,
    comm: Communicator,
    state: dict[str, Any],
    schedule: StaleStatistics | None = None,
) -> tuple[int, bool, bool]:
    """Restore ``state`` into ``blocks`` (and the statistics ``schedule``; a state without one
    starts it afresh).

    Returns ``(steps, refresh_factors, refresh_second_order)``: what the next step must rebuild
    because the state did not hold it.

    Raises:
        ValueError: when ``state`` has no step counter or lacks a Kronecker layer of this model.
    """
    missing = [
        name
        for name, block in blocks.items()
        if block.state_section == "layers" and name not in state.get("layers", {})
    ]
    if "steps" not in state or missing:
        raise ValueError(
            "K-FAC state does not match this model: "
            + (f"missing layers {missing[:5]}" if missing else "no 'steps' entry")
        )
    refresh_factors = refresh_second_order = False
    for name, block in blocks.items():
        entry = state.get(block.state_section, {}).get(name, {})
        if not all(key in entry for key in block.factor_keys):
            refresh_factors = refresh_second_order = True
            continue
        for key, factor in zip(block.factor_keys, block.factors(), strict=True):
            factor.running = entry[key].to(device=factor.running.device, dtype=factor.dtype).clone()
        method = block.method
        if not all(key in entry for key in method.keys):
            refresh_second_order = True  # another compute method, or saved before any update
            continue
        if not (block.replicated or not plan.colocate_factors) and not plan.is_grad_worker(
            name, comm.rank
        ):
            continue
        for target, key in zip(method.buffers(), method.keys, strict=True):
            target.copy_(entry[key].to(device=target.device, dtype=target.dtype))
    if schedule is not None:
        schedule.load_state_dict(state.get("statistics_schedule"))
    return int(state["steps"]), refresh_factors, refresh_second_order
