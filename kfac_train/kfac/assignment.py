"""Work placement: which rank computes each layer's second-order data, and who preconditions.

A pure, deterministic function of the layer shapes and the world (KAISA §3.2–3.4); no process
group is needed to build or test a plan.

The ``P`` ranks form an ``m × (P/m)`` grid, ``m = max(1, round(f·P))`` the number of gradient
workers per layer for gradient-worker fraction ``f``:

* gradient-worker groups are the grid's **columns** ``{c, c + P/m, c + 2P/m, ...}``; each layer
  belongs to one column, whose ranks hold its second-order data and precondition its gradient;
* receiver groups are the grid's **rows** (contiguous blocks of ``P/m`` ranks); in each row the
  layer's one gradient worker broadcasts the preconditioned gradient to the others.

``f = 1`` (COMM-OPT) is one column of all ranks (no gradient broadcast); ``f = 1/P`` (MEM-OPT) is
``P`` singleton columns and one row (no second-order broadcast).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

COMM_OPT = "comm-opt"
HYBRID_OPT = "hybrid-opt"
MEM_OPT = "mem-opt"
#: The strategy names ``grad_worker_fraction`` accepts (case-insensitive; ``_`` may replace ``-``).
STRATEGY_NAMES = (COMM_OPT, HYBRID_OPT, MEM_OPT)
COST_MODELS = ("compute", "memory")


@dataclass(frozen=True)
class LayerShape:
    """Side lengths of a layer's factors: ``A`` is ``a × a`` (bias column included), ``G`` is
    ``g × g`` and the layer gradient is ``g × a``. ``diagonal_a``: ``A`` is diagonal and stored
    as its ``a`` diagonal entries (embeddings): ``a`` elements, cost ``a`` in both cost models."""

    name: str
    a: int
    g: int
    diagonal_a: bool = False


def validate_grad_worker_fraction(value: float | str) -> float | str:
    """Check a ``grad_worker_fraction`` without knowing the world size.

    Returns the canonical form: a strategy name from :data:`STRATEGY_NAMES` (``"comm_opt"``,
    ``"COMM-OPT"``... all become ``"comm-opt"``) or a float in ``(0, 1]`` (numeric strings such as
    ``"0.5"`` are accepted). The one validator of this option: the app calls it too.

    Raises:
        ValueError: naming the bad value and the accepted ones.
    """
    if isinstance(value, str):
        key = value.strip().lower().replace("_", "-")
        if key in STRATEGY_NAMES:
            return key
        try:
            value = float(key)
        except ValueError:
            raise ValueError(
                f"grad_worker_fraction={value!r}: use a number in (0, 1] or one of "
                + ", ".join(STRATEGY_NAMES)
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"grad_worker_fraction={value!r}: use a number in (0, 1] or a name")
    fraction = float(value)
    if not (math.isfinite(fraction) and 0.0 < fraction <= 1.0):
        raise ValueError(f"grad_worker_fraction={value!r}: must be in (0, 1]")
    return fraction


def resolve_grad_worker_fraction(value: float | str, world_size: int) -> float:
    """Turn a fraction or a strategy name (see :func:`validate_grad_worker_fraction`) into a
    float in ``(0, 1]`` for ``world_size`` ranks."""
    value = validate_grad_worker_fraction(value)
    if value == MEM_OPT:
        return 1.0 / world_size
    if value == HYBRID_OPT:
        # Half of the ranks where that divides P, else the largest divisor of P below P/2
        # (P = 3: MEM-OPT's single worker; P = 6: 3 workers).
        m = max(d for d in range(1, max(1, world_size // 2) + 1) if world_size % d == 0)
        return m / world_size
    if value == COMM_OPT:
        return 1.0
    return float(value)


def num_grad_workers(fraction: float, world_size: int) -> int:
    """``m = max(1, round(f·P))``; ``P`` must be divisible by ``m``."""
    m = max(1, round(fraction * world_size))
    if world_size % m:
        valid = ", ".join(
            f"{d}/{world_size}" for d in range(1, world_size + 1) if world_size % d == 0
        )
        raise ValueError(
            f"grad_worker_fraction={fraction} gives {m} gradient workers per layer, which does "
            f"not divide world size {world_size}; choose one of {valid}"
        )
    return m


@dataclass(frozen=True)
class LayerPlacement:
    """Where one layer's work happens.

    ``a_worker`` / ``g_worker`` compute the second-order data of ``A`` / ``G`` (the same rank
    when factors are colocated); ``column`` indexes the layer's gradient-worker group.
    """

    a_worker: int
    g_worker: int
    column: int


@dataclass(frozen=True)
class WorkPlan:
    """A placement of every layer on a ``num_grad_workers × (world_size/num_grad_workers)`` grid."""

    world_size: int
    num_grad_workers: int
    colocate_factors: bool
    layers: dict[str, LayerPlacement]

    @property
    def num_columns(self) -> int:
        return self.world_size // self.num_grad_workers

    def column_group(self, column: int) -> tuple[int, ...]:
        """Ranks of gradient-worker group ``column``."""
        return tuple(range(column, self.world_size, self.num_columns))

    def row_group(self, row: int) -> tuple[int, ...]:
        """Ranks of receiver group ``row``."""
        start = row * self.num_columns
        return tuple(range(start, start + self.num_columns))

    def column_groups(self) -> list[tuple[int, ...]]:
        return [self.column_group(c) for c in range(self.num_columns)]

    def row_groups(self) -> list[tuple[int, ...]]:
        return [self.row_group(r) for r in range(self.num_grad_workers)]

    def row_of(self, rank: int) -> int:
        return rank // self.num_columns

    def column_of(self, rank: int) -> int:
        return rank % self.num_columns

    def grad_workers(self, name: str) -> tuple[int, ...]:
        return self.column_group(self.layers[name].column)

    def is_grad_worker(self, name: str, rank: int) -> bool:
        return self.column_of(rank) == self.layers[name].column

    def grad_source(self, name: str, rank: int) -> int:
        """The gradient worker that sends layer ``name``'s preconditioned gradient to ``rank``."""
        return self.row_of(rank) * self.num_columns + self.layers[name].column

    def load(self, cost_of: dict[str, tuple[float, float]]) -> list[float]:
        """Second-order cost placed on each rank, given ``(cost_A, cost_G)`` per layer."""
        loads = [0.0] * self.world_size
        for name, placement in self.layers.items():
            cost_a, cost_g = cost_of[name]
            loads[placement.a_worker] += cost_a
            loads[placement.g_worker] += cost_g
        return loads


def factor_cost(n: int, cost: str, diagonal: bool = False) -> float:
    """Cost of one ``n × n`` factor: ``n³`` (compute) or ``n²`` (memory); ``n`` for a diagonal
    one (its inverse is elementwise, its storage ``n``)."""
    if cost not in COST_MODELS:
        raise ValueError(f"assignment_cost must be one of {COST_MODELS}, got {cost!r}")
    if diagonal:
        return float(n)
    return float(n**3 if cost == "compute" else n**2)


def _least_loaded(candidates: Sequence[int], loads: Sequence[float]) -> int:
    return min(candidates, key=lambda i: (loads[i], i))


def plan_work(
    shapes: Sequence[LayerShape],
    world_size: int,
    grad_worker_fraction: float | str = 1.0,
    *,
    colocate_factors: bool = True,
    cost: str = "compute",
) -> WorkPlan:
    """Longest-processing-time greedy placement (KAISA).

    Layers (or single factors, when not colocated) are taken in decreasing cost; each goes to the
    least-loaded gradient-worker column and, inside it, to the least-loaded rank. Ties break on
    the lowest index and on model order, so every rank computes the same plan.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    fraction = resolve_grad_worker_fraction(grad_worker_fraction, world_size)
    m = num_grad_workers(fraction, world_size)
    columns = world_size // m
    if not colocate_factors and m != world_size:
        raise ValueError(
            "colocate_factors=False needs every rank to be a gradient worker "
            f"(grad_worker_fraction=1, COMM-OPT); got fraction {fraction} on {world_size} ranks"
        )
    rank_load = [0.0] * world_size
    column_load = [0.0] * columns
    order = {s.name: i for i, s in enumerate(shapes)}
    a_worker: dict[str, int] = {}
    g_worker: dict[str, int] = {}
    column_of: dict[str, int] = {}

    if colocate_factors:

        def layer_cost(s: LayerShape) -> float:
            return factor_cost(s.a, cost, s.diagonal_a) + factor_cost(s.g, cost)

        for s in sorted(shapes, key=lambda s: (-layer_cost(s), order[s.name])):
            job_cost = layer_cost(s)
            column = _least_loaded(range(columns), column_load)
            rank = _least_loaded(range(column, world_size, columns), rank_load)
            column_load[column] += job_cost
            rank_load[rank] += job_cost
            a_worker[s.name] = g_worker[s.name] = rank
            column_of[s.name] = column
    else:
        factor_jobs = [(s.name, "A", factor_cost(s.a, cost, s.diagonal_a)) for s in shapes]
        factor_jobs += [(s.name, "G", factor_cost(s.g, cost)) for s in shapes]
        factor_jobs.sort(key=lambda j: (-j[2], order[j[0]], j[1]))
        for name, kind, job_cost in factor_jobs:
            rank = _least_loaded(range(world_size), rank_load)
            rank_load[rank] += job_cost
            (a_worker if kind == "A" else g_worker)[name] = rank
            column_of[name] = 0

    placements = {
        s.name: LayerPlacement(a_worker[s.name], g_worker[s.name], column_of[s.name])
        for s in shapes
    }
    return WorkPlan(world_size, m, colocate_factors, placements)
