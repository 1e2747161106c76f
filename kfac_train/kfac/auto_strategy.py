"""``grad_worker_fraction="auto"``: KAISA's fraction chosen from a per-rank memory budget.

Among the fractions ``m/P`` (:func:`memory_model.candidate_fractions`), the one with the least
predicted network traffic per step whose busiest rank fits the budget; the predictions are
:func:`memory_model.predict_footprint`'s, which equal what ``memory_bytes()`` and
``comm_bytes()`` report. No fraction fits: :class:`MemoryBudgetError` names the smallest budget
that would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .assignment import LayerShape
from .memory_model import Footprint, candidate_fractions, predict_footprint

logger = logging.getLogger(__name__)


class MemoryBudgetError(ValueError):
    """No gradient-worker fraction keeps the K-FAC state of every rank within the budget.

    ``smallest_feasible_bytes`` is the least budget that fits (the lowest-memory candidate's).
    """

    def __init__(self, budget_bytes: int, smallest_feasible_bytes: int, world_size: int):
        self.budget_bytes = budget_bytes
        self.smallest_feasible_bytes = smallest_feasible_bytes
        self.world_size = world_size
        super().__init__(
            f"K-FAC state needs at least {smallest_feasible_bytes:,} bytes "
            f"({smallest_feasible_bytes / 2**20:.2f} MiB) per rank on {world_size} rank(s) "
            f"for this model; the memory budget is {budget_bytes:,} bytes"
        )


def choose_grad_worker_fraction(
    shapes: Sequence[LayerShape],
    world_size: int,
    memory_budget_bytes: int,
    *,
    factor_update_steps: int = 1,
    inv_update_steps: int = 1,
    **dtypes_and_options,
) -> tuple[Footprint, list[Footprint]]:
    """The fraction with the least network traffic per step whose busiest rank fits the budget
    (:meth:`Footprint.network_bytes_per_step`).

    ``**dtypes_and_options`` are :func:`predict_footprint`'s keyword arguments. Ties go to the
    larger fraction (fewer ranks idle while others precondition). Fractions that the options
    rule out (``colocate_factors=False`` allows only COMM-OPT) are not candidates. Returns the
    choice and every candidate, in :func:`candidate_fractions` order.

    Raises:
        MemoryBudgetError: when no candidate fits; it names the smallest feasible budget.
    """
    candidates = []
    for fraction in candidate_fractions(world_size):
        try:
            candidates.append(predict_footprint(shapes, world_size, fraction, **dtypes_and_options))
        except ValueError:
            continue  # ruled out by the options (e.g. colocate_factors=False below COMM-OPT)
    fitting = [c for c in candidates if c.max_memory <= memory_budget_bytes]
    if not fitting:
        smallest = min(c.max_memory for c in candidates)
        raise MemoryBudgetError(memory_budget_bytes, smallest, world_size)
    best = min(
        fitting,
        key=lambda c: (
            c.network_bytes_per_step(factor_update_steps, inv_update_steps),
            -c.fraction,
        ),
    )
    return best, candidates


def format_candidates(
    candidates: Sequence[Footprint],
    chosen: Footprint,
    memory_budget_bytes: int,
    *,
    factor_update_steps: int,
    inv_update_steps: int,
) -> str:
    """A small table of the candidates (memory of the busiest rank, network bytes per step)."""
    rows = [("fraction", "workers", "max memory B", "fits", "network B/step", "")]
    for c in candidates:
        rows.append(
            (
                f"{c.fraction:.4g}",
                str(c.grad_workers),
                f"{c.max_memory:,}",
                "yes" if c.max_memory <= memory_budget_bytes else "no",
                f"{c.network_bytes_per_step(factor_update_steps, inv_update_steps):,.0f}",
                "<- chosen" if c is chosen else "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        f"K-FAC strategy auto: memory budget {memory_budget_bytes:,} B per rank, factor update "
        f"every {factor_update_steps} step(s), inverse update every {inv_update_steps}"
    ]
    lines += ["  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def auto_grad_worker_fraction(
    blocks: Mapping[str, Any],
    comm: Any,
    memory_budget_bytes: int | None,
    *,
    factor_update_steps: int,
    inv_update_steps: int,
    **options: Any,
) -> float:
    """``grad_worker_fraction="auto"`` for the registered ``blocks``: the least-traffic fraction
    whose K-FAC state fits ``memory_budget_bytes`` per rank (:func:`choose_grad_worker_fraction`;
    intervals read at step 0); rank 0 logs the candidates. ``options`` are
    :func:`predict_footprint`'s dtypes and placement options."""
    if memory_budget_bytes is None or memory_budget_bytes <= 0:
        raise ValueError(
            'grad_worker_fraction="auto" needs memory_budget_bytes > 0 (K-FAC state per rank)'
        )
    layers = [b for b in blocks.values() if not b.replicated]
    unit_wise = [b for b in blocks.values() if b.replicated]
    intervals = {"factor_update_steps": factor_update_steps, "inv_update_steps": inv_update_steps}
    chosen, candidates = choose_grad_worker_fraction(
        [layer.shape for layer in layers],
        comm.world_size,
        memory_budget_bytes,
        grad_dtype=layers[0].module.weight.dtype if layers else torch.float32,
        unit_wise_channels=[block.channels for block in unit_wise],
        **intervals,
        **options,
    )
    if comm.rank == 0:
        logger.info(format_candidates(candidates, chosen, memory_budget_bytes, **intervals))
    return chosen.fraction
