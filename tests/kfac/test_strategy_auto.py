"""`grad_worker_fraction="auto"`: the memory/communication predictor and the choice it drives.

1. `predict_footprint` gives, for a two-layer example worked by hand, the bytes of docs/kfac.md.
2. On 2 and 4 real gloo ranks, for every candidate fraction `m/P` and several option sets
   (eigen/inverse, float64 second-order data, bfloat16 upper-triangle communication, split
   factors, unit-wise BatchNorm), what the preconditioner measures — `memory_bytes()` after an
   inverse update and `comm_bytes()["step"]` on a factor+inverse step and on a factor-only step —
   equals the prediction on every rank.
3. The choice: the least-traffic fraction whose busiest rank fits the budget; a budget below
   every candidate raises `MemoryBudgetError` naming the smallest feasible budget; the
   preconditioner built with `"auto"` runs the chosen fraction and stays within the budget.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfac_train.kfac import (
    KFACPreconditioner,
    LayerShape,
    MemoryBudgetError,
    candidate_fractions,
    choose_grad_worker_fraction,
    predict_footprint,
)

from .dist_utils import run_distributed

# --------------------------------------------------------------------------- hand-worked example
TWO_LAYERS = [LayerShape("big", a=5, g=3), LayerShape("small", a=4, g=2)]
# factors: (25 + 9) + (16 + 4) = 54 floats; eigen second-order: big 25+9+15 = 49, small 16+4+8 = 28


def test_prediction_matches_the_hand_worked_byte_counts_on_four_ranks():
    comm = predict_footprint(TWO_LAYERS, 4, 1.0)
    assert [m["factors"] for m in comm.memory] == [54 * 4] * 4
    assert [m["second_order"] for m in comm.memory] == [(49 + 28) * 4] * 4
    assert comm.factor_allreduce == 54 * 4
    assert comm.second_order_broadcast == ((49 + 28) * 4,) * 4  # every rank in the one column
    assert comm.grad_broadcast == 0

    mem = predict_footprint(TWO_LAYERS, 4, 0.25)  # one worker per layer: big on 0, small on 1
    assert [m["second_order"] for m in mem.memory] == [49 * 4, 28 * 4, 0, 0]
    assert mem.second_order_broadcast == (0, 0, 0, 0)
    assert mem.grad_broadcast == (15 + 8) * 4

    hybrid = predict_footprint(TWO_LAYERS, 4, 0.5)  # columns {0, 2} (big) and {1, 3} (small)
    assert [m["second_order"] for m in hybrid.memory] == [49 * 4, 28 * 4, 49 * 4, 28 * 4]
    assert hybrid.second_order_broadcast == (49 * 4, 28 * 4, 49 * 4, 28 * 4)

    packed = predict_footprint(
        TWO_LAYERS,
        4,
        1.0,
        symmetry_aware=True,
        comm_dtype=torch.bfloat16,
        compute_method="inverse",
        inv_dtype=torch.float64,
    )
    assert packed.factor_allreduce == (15 + 6 + 10 + 3) * 2
    assert packed.memory[0]["second_order"] == (34 + 20) * 8

    single = predict_footprint(TWO_LAYERS, 1, 1.0)
    assert (single.factor_allreduce, single.second_order_broadcast, single.grad_broadcast) == (
        0,
        (0,),
        0,
    )


def test_auto_picks_the_least_traffic_fraction_that_fits_and_refuses_below_the_smallest():
    assert candidate_fractions(4) == [1.0, 0.5, 0.25]
    everything = (54 + 77) * 4  # COMM-OPT: every rank holds all second-order data
    chosen, candidates = choose_grad_worker_fraction(
        TWO_LAYERS, 4, everything, factor_update_steps=1, inv_update_steps=100
    )
    assert chosen.fraction == 1.0 and len(candidates) == 3
    # One byte less: COMM-OPT no longer fits; HYBRID (busiest rank 54 + 49 floats) and MEM-OPT
    # (the same busiest rank) both fit. Network bytes per step (the all-reduce is the same for
    # all): HYBRID broadcasts second-order data to 1 other rank, (49 + 28)·4/interval, and
    # gradients to 2 other ranks per layer, 2·23·4 = 184; MEM-OPT sends gradients to 3 others,
    # 3·23·4 = 276. Inverses every 100 steps: HYBRID wins (187 < 276); every step (308 + 184):
    # MEM-OPT wins.
    chosen, _ = choose_grad_worker_fraction(
        TWO_LAYERS, 4, everything - 1, factor_update_steps=1, inv_update_steps=100
    )
    assert chosen.fraction == 0.5
    chosen, _ = choose_grad_worker_fraction(
        TWO_LAYERS, 4, everything - 1, factor_update_steps=1, inv_update_steps=1
    )
    assert chosen.fraction == 0.25
    smallest = (54 + 49) * 4
    with pytest.raises(MemoryBudgetError, match=f"at least {smallest:,} bytes") as error:
        choose_grad_worker_fraction(TWO_LAYERS, 4, smallest - 1)
    assert error.value.smallest_feasible_bytes == smallest
    chosen, _ = choose_grad_worker_fraction(TWO_LAYERS, 4, smallest)
    assert chosen.max_memory <= smallest


# --------------------------------------------------------------------------- measured on gloo ranks
class SmallNet(nn.Module):
    """conv 1→3 (3×3, bias): A 10×10, G 3×3; BatchNorm(3); fc 12→6: A 13², G 6²; fc 6→3 no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc1 = nn.Linear(12, 6)
        self.fc2 = nn.Linear(6, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.relu(self.fc1(h.flatten(1))))


SHAPES = [LayerShape("conv", 10, 3), LayerShape("fc1", 13, 6), LayerShape("fc2", 6, 3)]
OPTION_SETS: dict[str, dict[str, Any]] = {
    "eigen": {},
    "inverse/float64/packed-bf16": {
        "compute_method": "inverse",
        "inv_dtype": torch.float64,
        "symmetry_aware": True,
        "comm_dtype": torch.bfloat16,
    },
    "eigen/split-factors": {"colocate_factors": False},
    "eigen/unit-wise-batchnorm/memory-cost": {
        "batchnorm": "unit_wise",
        "assignment_cost": "memory",
    },
}
PREDICTOR_KEYS = (
    "compute_method",
    "factor_dtype",
    "inv_dtype",
    "comm_dtype",
    "symmetry_aware",
    "colocate_factors",
    "assignment_cost",
)


def _train_two_steps(pre_kwargs: dict[str, Any]) -> tuple[KFACPreconditioner, list[dict]]:
    """Steps 0 (factors + inverses) and 1 (factors only); returns `comm_bytes()["step"]` of each."""
    torch.manual_seed(0)
    model = DistributedDataParallel(SmallNet())
    pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=2, **pre_kwargs)
    generator = torch.Generator().manual_seed(dist.get_rank())
    steps = []
    for _ in range(2):
        x = torch.randn(8, 1, 4, 4, generator=generator)
        model.zero_grad()
        model(x).square().mean().backward()
        pre.step()
        steps.append(pre.comm_bytes()["step"])
    return pre, steps


def _measure_every_candidate() -> dict[str, Any]:
    world = dist.get_world_size()
    measured: dict[str, Any] = {}
    for label, options in OPTION_SETS.items():
        for fraction in candidate_fractions(world):
            if options.get("colocate_factors") is False and fraction != 1.0:
                continue
            pre, steps = _train_two_steps({**options, "grad_worker_fraction": fraction})
            measured[f"{label}@{fraction}"] = {"memory": pre.memory_bytes(), "steps": steps}
    # "auto" under a budget between MEM-OPT's and COMM-OPT's busiest rank
    comm_opt = predict_footprint(SHAPES, world, 1.0)
    mem_opt = predict_footprint(SHAPES, world, 1.0 / world)
    budget = (comm_opt.max_memory + mem_opt.max_memory) // 2
    pre, _ = _train_two_steps({"grad_worker_fraction": "auto", "memory_budget_bytes": budget})
    measured["auto"] = {
        "budget": budget,
        "fraction": pre.grad_worker_fraction,
        "memory": sum(pre.memory_bytes().values()),
    }
    return measured


@pytest.mark.parametrize("world_size", [2, 4])
def test_measured_memory_and_bytes_equal_the_prediction_for_every_fraction(world_size: int):
    results = run_distributed(_measure_every_candidate, world_size, timeout=240)
    for label, options in OPTION_SETS.items():
        for fraction in candidate_fractions(world_size):
            if options.get("colocate_factors") is False and fraction != 1.0:
                continue
            predicted = predict_footprint(
                SHAPES,
                world_size,
                fraction,
                unit_wise_channels=[3] if options.get("batchnorm") == "unit_wise" else [],
                **{k: v for k, v in options.items() if k in PREDICTOR_KEYS},
            )
            for rank in range(world_size):
                got = results[rank][f"{label}@{fraction}"]
                where = f"{label}, fraction {fraction}, rank {rank}"
                assert got["memory"] == predicted.memory[rank], where
                assert got["steps"][0] == predicted.step_bytes(
                    rank, factor_update=True, inverse_update=True
                ), where
                assert got["steps"][1] == predicted.step_bytes(
                    rank, factor_update=True, inverse_update=False
                ), where

    auto = [r["auto"] for r in results]
    chosen, _ = choose_grad_worker_fraction(
        SHAPES, world_size, auto[0]["budget"], factor_update_steps=1, inv_update_steps=2
    )
    assert chosen.fraction < 1.0  # COMM-OPT does not fit this budget
    assert all(a["fraction"] == chosen.fraction for a in auto)
    assert max(a["memory"] for a in auto) <= auto[0]["budget"]


def test_auto_without_room_stops_in_the_constructor_naming_the_smallest_budget():
    smallest = predict_footprint(SHAPES, 1, 1.0).max_memory
    with pytest.raises(MemoryBudgetError, match=f"at least {smallest:,} bytes"):
        KFACPreconditioner(
            SmallNet(), grad_worker_fraction="auto", memory_budget_bytes=smallest - 1
        )
    pre = KFACPreconditioner(SmallNet(), grad_worker_fraction="auto", memory_budget_bytes=smallest)
    assert pre.grad_worker_fraction == 1.0
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        KFACPreconditioner(SmallNet(), grad_worker_fraction="auto")
