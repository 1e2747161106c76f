"""The pure work plan (``plan_work``): a partition of the ranks, balanced, deterministic.

No process group is needed: the plan is a function of the layer shapes and the world size.
"""

from __future__ import annotations

import random

import pytest

from kfac_train.kfac import LayerShape, plan_work
from kfac_train.kfac.assignment import (
    factor_cost,
    resolve_grad_worker_fraction,
    validate_grad_worker_fraction,
)


def _shapes(count: int, seed: int) -> list[LayerShape]:
    rng = random.Random(seed)
    return [LayerShape(f"l{i}", rng.randint(2, 60), rng.randint(2, 60)) for i in range(count)]


def _layer_cost(s: LayerShape, cost: str = "compute") -> float:
    return factor_cost(s.a, cost) + factor_cost(s.g, cost)


@pytest.mark.parametrize(("world", "fraction"), [(1, 1.0), (4, 1.0), (4, 0.5), (4, 0.25), (6, 0.5)])
def test_columns_and_rows_partition_the_ranks_and_every_layer_has_one_worker_per_row(
    world: int, fraction: float
) -> None:
    plan = plan_work(_shapes(9, 0), world, fraction)
    columns, rows = plan.column_groups(), plan.row_groups()
    assert sorted(r for c in columns for r in c) == list(range(world))
    assert sorted(r for row in rows for r in row) == list(range(world))
    for name, place in plan.layers.items():
        workers = plan.grad_workers(name)
        assert place.a_worker == place.g_worker and place.a_worker in workers
        assert len(workers) == plan.num_grad_workers
        for row in rows:  # exactly one gradient worker of the layer in each row
            assert len(set(row) & set(workers)) == 1
            for rank in row:
                assert plan.grad_source(name, rank) in set(row) & set(workers)


def test_the_plan_is_deterministic_and_follows_model_order_on_ties() -> None:
    shapes = _shapes(12, 1)
    assert plan_work(shapes, 4, 0.5) == plan_work(list(shapes), 4, 0.5)
    same = [LayerShape(f"t{i}", 8, 8) for i in range(4)]
    plan = plan_work(same, 4, 1.0)
    assert [plan.layers[s.name].a_worker for s in same] == [0, 1, 2, 3]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("colocate", [True, False])
def test_the_greedy_plan_is_within_the_lpt_bound(seed: int, colocate: bool) -> None:
    """Longest-processing-time: the busiest rank carries at most the mean load plus one job."""
    shapes, world = _shapes(15, seed), 4
    plan = plan_work(shapes, world, 1.0, colocate_factors=colocate)
    costs = {s.name: (factor_cost(s.a, "compute"), factor_cost(s.g, "compute")) for s in shapes}
    loads = plan.load(costs)
    jobs = [_layer_cost(s) for s in shapes] if colocate else [c for p in costs.values() for c in p]
    assert sum(loads) == pytest.approx(sum(jobs))
    assert max(loads) <= sum(jobs) / world + max(jobs)
    if not colocate:
        assert {plan.layers[s.name].column for s in shapes} == {0}


@pytest.mark.parametrize(
    ("value", "canonical"),
    [
        ("comm-opt", "comm-opt"),
        ("COMM_OPT", "comm-opt"),
        ("mem_opt", "mem-opt"),
        ("Hybrid-Opt", "hybrid-opt"),
        ("0.5", 0.5),
        (1, 1.0),
    ],
)
def test_grad_worker_fraction_spellings_are_one_set(value, canonical) -> None:
    assert validate_grad_worker_fraction(value) == canonical


@pytest.mark.parametrize("value", ["memopt", "fast", 0, 1.5, -0.5, float("nan"), True, "2"])
def test_a_bad_grad_worker_fraction_is_refused_naming_the_value(value) -> None:
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        validate_grad_worker_fraction(value)


@pytest.mark.parametrize(("name", "world", "fraction"), [("mem_opt", 4, 0.25), ("comm_opt", 4, 1)])
def test_underscored_names_resolve_like_dashed_ones(name: str, world: int, fraction: float) -> None:
    assert resolve_grad_worker_fraction(name, world) == fraction
