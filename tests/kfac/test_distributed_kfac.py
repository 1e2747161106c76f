"""Distributed K-FAC on real gloo processes (2 and 4 ranks on CPU): the invariants of issue 3.

One spawned job per world size trains a small CNN (two Conv2d, two Linear) wrapped in
`DistributedDataParallel` under every configuration below and sends back, per rank and step,
the update (every parameter's `.grad` after `pre.step()`), the parameters after
`optimizer.step()`, `pre.comm_bytes()` and `pre.memory_bytes()`. Rank `r` always trains on
micro-batch `r` of the step. The tests then check:

1. all ranks hold identical parameters after every step;
2. COMM-OPT, HYBRID-OPT, MEM-OPT and the fraction 0.5 give the same update, for both compute
   methods, with tiny buckets (one layer per bucket), upper-triangle packing, `overlap_comm` and
   `colocate_factors=False` (COMM-OPT) switched on and off;
3. `w` ranks with local batch `b` give the update of ONE process (no process group) running
   `accumulation_steps=w` over the same `w` micro-batches (each loss divided by `w`). These runs
   use float64, `factor_decay=0`, no KL clip and a damping far below the factors' spectrum, so
   they see the scale of `G`: a single process that takes the `w` micro-batches as one batch
   (same gradient, same `A`, but `G` smaller by `w²`) must and does give a different update;
4. the bytes and memory each rank reports are what the strategy implies, computed here from
   the layer shapes (definitions below);
5. world size 1 (a one-rank group, or no process group at all) communicates nothing and gives
   the single-process result;
6. `state_dict()` is a collective: rank 0's dict, loaded into a fresh single process, continues
   exactly like the distributed run does.

Accounting definitions (the library implements the same). Layer ℓ has `A` of size a×a (a counts
the bias column), `G` of size g×g and a g×a gradient; P ranks; m = max(1, round(f·P)) gradient
workers per layer. Ranks form an m × (P/m) grid: a layer's gradient workers are one column
{c, c+P/m, ...} (from `plan_work`); each row (P/m contiguous ranks) holds one of them, which
broadcasts the preconditioned gradient to the rest of its row. Bytes are payload elements times
the element size, counted once on every rank that takes part in the collective:
- `factor_allreduce`, on factor-update steps, every rank: Σ_ℓ (a² + g²), or
  Σ_ℓ (a(a+1)/2 + g(g+1)/2) with `symmetry_aware`, in `comm_dtype` (default `factor_dtype`);
- `second_order_broadcast`, on inverse-update steps, rank r: Σ over layers whose m > 1 gradient
  workers include r of (a² + g² + g·a) for eigen (Q_A, Q_G and 1/(d_G d_Aᵀ + λ)) or (a² + g²)
  for inverse, in `inv_dtype`; COMM-OPT with `colocate_factors=False` sends eigenvectors and
  eigenvalues instead, a² + a + g² + g, on every rank (and (a² + g²) for inverse), and every
  rank forms the reciprocal itself;
- `grad_broadcast`, every step, every rank, when m < P: Σ_ℓ g·a in the gradient's dtype;
- `memory_bytes()["factors"]` = Σ_ℓ (a² + g²)·sizeof(factor_dtype) on every rank;
  `memory_bytes()["second_order"]` = Σ over layers where r is a gradient worker of
  (a² + g² + g·a) (eigen) or (a² + g²) (inverse) times sizeof(inv_dtype).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfac_train.kfac import KFACPreconditioner, LayerShape, plan_work

from .dist_utils import chosen_device, run_distributed

NUM_STEPS = 4
LOCAL_BATCH = 32
LEARNING_RATE = 0.05
FACTOR_UPDATE_STEPS = 1
INV_UPDATE_STEPS = 2  # steps 0 and 2 recompute second-order data, steps 1 and 3 reuse it
CHECKPOINT_STEP = 3  # steps 3 (no update) and 4 (factor update) use the checkpointed state
NUM_CONTINUED_STEPS = 3
TINY_BUCKET_MB = 1e-5  # smaller than any layer's factors: every layer gets its own bucket

# Strategy comparisons run in float32 with the library's defaults for everything not listed.
FLOAT32_KWARGS: dict[str, Any] = {"damping": 0.003, "factor_decay": 0.9, "kl_clip": 0.001}
# Exactness runs: the update must depend on the scale of every factor. On this model and data the
# products of factor eigenvalues d_G·d_A go down to about 7e-15 (the first conv's G is tiny: its
# output gradient carries 1/batch and 1/S), so the damping sits well below all of them. The local
# batch (32 rows) exceeds every Linear input size, so no A is singular.
FLOAT64_KWARGS: dict[str, Any] = {
    "damping": 1e-16,
    "factor_decay": 0.0,
    "kl_clip": None,
    "factor_dtype": torch.float64,
    "inv_dtype": torch.float64,
    # Setup: the merged-micro-batch sensitivity check below needs a G that depends on the split
    # ("mean"); the per-example default's split invariance is tested in test_convention.py.
    "grad_scaling": "mean",
}
# With that damping the update is the near-exact natural gradient, of norm ~1e12 here; a
# tiny learning rate keeps the parameters in a sane range for the following steps.
FLOAT64_LEARNING_RATE = 1e-13
STRATEGY_VARIANTS: dict[str, dict[str, Any]] = {
    "comm-opt": {"grad_worker_fraction": "comm-opt"},
    "comm-opt/split-factors/packed/tiny-buckets/no-overlap": {
        "grad_worker_fraction": "comm-opt",
        "colocate_factors": False,
        "symmetry_aware": True,
        "bucket_cap_mb": TINY_BUCKET_MB,
        "overlap_comm": False,
    },
    "hybrid-opt/packed/tiny-buckets": {
        "grad_worker_fraction": "hybrid-opt",
        "symmetry_aware": True,
        "bucket_cap_mb": TINY_BUCKET_MB,
    },
    "mem-opt/tiny-buckets/no-overlap": {
        "grad_worker_fraction": "mem-opt",
        "bucket_cap_mb": TINY_BUCKET_MB,
        "overlap_comm": False,
    },
    "fraction-0.5/packed/no-overlap/memory-cost": {
        "grad_worker_fraction": 0.5,
        "symmetry_aware": True,
        "overlap_comm": False,
        "assignment_cost": "memory",
    },
}
COMPUTE_METHODS = ("eigen", "inverse")
WORLD_SIZES = (2, 4)


@dataclass(frozen=True)
class Run:
    """One training configuration: preconditioner keyword arguments and the model's dtype."""

    name: str
    kwargs: dict[str, Any]
    dtype: torch.dtype = torch.float32
    compare_to: str | None = None  # another run that must give the same update
    tolerance: float = 0.0
    lr: float = LEARNING_RATE

    def option(self, key: str, default: Any) -> Any:
        return self.kwargs.get(key, default)


@dataclass
class Batches:
    """Inputs `x` of shape (steps, ranks, local batch, 2, 6, 6); targets `y` (..., 10)."""

    x: torch.Tensor
    y: torch.Tensor


def _all_runs() -> list[Run]:
    runs: list[Run] = []
    for method in COMPUTE_METHODS:
        baseline = f"{method}/comm-opt"
        for variant, kwargs in STRATEGY_VARIANTS.items():
            name = f"{method}/{variant}"
            runs.append(
                Run(
                    name,
                    {**FLOAT32_KWARGS, **kwargs, "compute_method": method},
                    compare_to=None if name == baseline else baseline,
                    tolerance=1e-5,
                )
            )
    for method, fraction in (
        ("eigen", "comm-opt"),
        ("eigen", "mem-opt"),
        ("inverse", "hybrid-opt"),
    ):
        runs.append(
            Run(
                f"float64/{method}/{fraction}",
                {**FLOAT64_KWARGS, "compute_method": method, "grad_worker_fraction": fraction},
                dtype=torch.float64,
                lr=FLOAT64_LEARNING_RATE,
            )
        )
    # bfloat16 second-order data and products: every strategy still gives the same update, to
    # bfloat16's precision (a strategy changes which equal-shape layers a rank stacks into one
    # bmm, so float32 accumulations may differ in the last bits and round to another bfloat16).
    for variant in ("comm-opt", "mem-opt/tiny-buckets/no-overlap"):
        runs.append(
            Run(
                f"eigen/bf16-products/{variant}",
                {
                    **FLOAT32_KWARGS,
                    **STRATEGY_VARIANTS[variant],
                    "compute_method": "eigen",
                    "inv_dtype": torch.bfloat16,
                    "precondition_dtype": torch.bfloat16,
                },
                compare_to=None if variant == "comm-opt" else "eigen/bf16-products/comm-opt",
                tolerance=1e-2,  # bfloat16's epsilon is 7.8e-3
            )
        )
    runs.append(
        Run(
            "accounting/bf16-comm/f64-second-order",
            {
                **FLOAT32_KWARGS,
                "grad_worker_fraction": "hybrid-opt",
                "comm_dtype": torch.bfloat16,
                "inv_dtype": torch.float64,
                "symmetry_aware": True,
            },
        )
    )
    return runs


def _checkpoint_kwargs(world_size: int) -> dict[str, Any]:
    """Intervals that make a resumed run use the checkpoint's factors and second-order data."""
    return {
        "factor_update_steps": 2,
        "inv_update_steps": 4,
        "factor_decay": 0.5,
        "damping": 1e-3,
        "kl_clip": 0.001,
        "lr": LEARNING_RATE,
        "factor_dtype": torch.float64,
        "inv_dtype": torch.float64,
        "grad_worker_fraction": "mem-opt" if world_size == 2 else "hybrid-opt",
    }


RUNS = _all_runs()
RUNS_BY_NAME = {run.name: run for run in RUNS}
EXACT_RUNS = [run.name for run in RUNS if run.name.startswith("float64/")]


def _tiny_cnn(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Input (B, 2, 6, 6) -> output (B, 10); the same weights in every process."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 8),
        nn.Tanh(),
        nn.Linear(8, 10),
    )
    return model.to(dtype)


def _layer_shapes(model: nn.Module) -> list[LayerShape]:
    """Factor side lengths from the module definitions (kfac-math.md), in model order."""
    shapes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fan_in, fan_out = module.in_features, module.out_features
        elif isinstance(module, nn.Conv2d):
            fan_in = module.in_channels * math.prod(module.kernel_size)
            fan_out = module.out_channels
        else:
            continue
        shapes.append(LayerShape(name, fan_in + (module.bias is not None), fan_out))
    return shapes


def _make_batches(world_size: int, seed: int = 1) -> Batches:
    generator = torch.Generator().manual_seed(seed)
    shape = (max(NUM_STEPS, CHECKPOINT_STEP + NUM_CONTINUED_STEPS), world_size, LOCAL_BATCH)
    x = torch.randn(*shape, 2, 6, 6, generator=generator)
    y = torch.randn(*shape, 10, generator=generator)
    return Batches(x, y)


def _flat(tensors: Iterator[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors])


def _layer_slices() -> dict[str, slice]:
    """Where each layer's weight and bias sit in the flattened parameter vector."""
    slices: dict[str, slice] = {}
    offset = 0
    for name, parameter in _tiny_cnn().named_parameters():
        layer = name.rsplit(".", 1)[0]
        start = slices[layer].start if layer in slices else offset
        offset += parameter.numel()
        slices[layer] = slice(start, offset)
    return slices


def _update(model: nn.Module) -> torch.Tensor:
    return _flat(p.grad for p in model.parameters())


def _parameters(model: nn.Module) -> torch.Tensor:
    return _flat(model.parameters())


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# --- code that runs inside the spawned ranks ------------------------------------------------


def _train_ddp_run(run: Run, batches: Batches) -> dict[str, Any]:
    rank, device = dist.get_rank(), chosen_device()  # KFAC_TEST_DEVICE (gpu_check.sh)
    model = _tiny_cnn(run.dtype).to(device)
    ddp_model = DistributedDataParallel(model)
    pre = KFACPreconditioner(
        ddp_model,
        factor_update_steps=FACTOR_UPDATE_STEPS,
        inv_update_steps=INV_UPDATE_STEPS,
        lr=run.lr,
        **run.kwargs,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    record: dict[str, Any] = {"updates": [], "params": [], "step_bytes": []}
    for step in range(NUM_STEPS):
        optimizer.zero_grad()
        x = batches.x[step, rank].to(device, run.dtype)
        y = batches.y[step, rank].to(device, run.dtype)
        F.mse_loss(ddp_model(x), y).backward()
        pre.step()
        record["updates"].append(_update(model))
        optimizer.step()
        record["params"].append(_parameters(model))
        record["step_bytes"].append(pre.comm_bytes()["step"])
    record["total_bytes"] = pre.comm_bytes()["total"]
    record["memory"] = pre.memory_bytes()
    record["layer_names"] = list(pre.layer_names)
    return record


def _train_save_and_continue(kwargs: dict[str, Any], batches: Batches) -> dict[str, Any]:
    """Train, checkpoint with the collective `state_dict()` on every rank, keep training."""
    rank, device = dist.get_rank(), chosen_device()
    model = _tiny_cnn(torch.float64).to(device)
    ddp_model = DistributedDataParallel(model)
    pre = KFACPreconditioner(ddp_model, **kwargs)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    saved: dict[str, Any] | None = None
    record: dict[str, Any] = {"updates": [], "params": []}
    for step in range(CHECKPOINT_STEP + NUM_CONTINUED_STEPS):
        if step == CHECKPOINT_STEP:
            pre_state = pre.state_dict()
            if rank == 0:  # deep copies: state dicts share storage with the live tensors
                saved = copy.deepcopy(
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "preconditioner": pre_state,
                    }
                )
        optimizer.zero_grad()
        F.mse_loss(
            ddp_model(batches.x[step, rank].to(device, torch.float64)),
            batches.y[step, rank].to(device, torch.float64),
        ).backward()
        pre.step()
        if step >= CHECKPOINT_STEP:
            record["updates"].append(_update(model))
        optimizer.step()
        if step >= CHECKPOINT_STEP:
            record["params"].append(_parameters(model))
    record["saved"] = saved
    return record


def _distributed_job(
    runs: list[Run], batches: Batches, checkpoint_kwargs: dict[str, Any]
) -> dict[str, Any]:
    return {
        "runs": {run.name: _train_ddp_run(run, batches) for run in runs},
        "checkpoint": _train_save_and_continue(checkpoint_kwargs, batches),
    }


# --- single-process references (no process group) -------------------------------------------


def _train_single_process(
    run: Run, batches: Batches, world_size: int, *, merge_micro_batches: bool = False
) -> list[torch.Tensor]:
    """One process, `accumulation_steps=world_size`, each micro-batch loss divided by it.

    With `merge_micro_batches` it instead takes the step's micro-batches as one batch with
    `accumulation_steps=1`: the same gradient and `A`, but `G` is `world_size²` times smaller.
    """
    model = _tiny_cnn(run.dtype)
    pre = KFACPreconditioner(
        model,
        factor_update_steps=FACTOR_UPDATE_STEPS,
        inv_update_steps=INV_UPDATE_STEPS,
        lr=run.lr,
        accumulation_steps=1 if merge_micro_batches else world_size,
        **run.kwargs,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr)
    updates = []
    for step in range(NUM_STEPS):
        optimizer.zero_grad()
        x, y = batches.x[step].to(run.dtype), batches.y[step].to(run.dtype)
        if merge_micro_batches:
            F.mse_loss(model(x.flatten(0, 1)), y.flatten(0, 1)).backward()
        else:
            for micro in range(world_size):
                (F.mse_loss(model(x[micro]), y[micro]) / world_size).backward()
        pre.step()
        updates.append(_update(model))
        optimizer.step()
        assert pre.comm_bytes()["total"] == dict.fromkeys(pre.comm_bytes()["total"], 0)
    return updates


# --- expected accounting ----------------------------------------------------------------------


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _num_grad_workers(fraction: float | str, world_size: int) -> int:
    value = {"comm-opt": 1.0, "hybrid-opt": 0.5, "mem-opt": 1.0 / world_size}.get(
        fraction,
        fraction,  # type: ignore[arg-type]
    )
    return max(1, round(float(value) * world_size))


def _second_order_elements(shape: LayerShape, method: str) -> int:
    if method == "eigen":
        return shape.a**2 + shape.g**2 + shape.g * shape.a
    return shape.a**2 + shape.g**2


def _expected_accounting(run: Run, world_size: int, rank: int) -> dict[str, int]:
    """Per-step bytes of each kind on an update step, and memory, for `rank` under `run`."""
    shapes = _layer_shapes(_tiny_cnn())
    fraction = run.option("grad_worker_fraction", 1.0)
    method = run.option("compute_method", "eigen")
    colocate = run.option("colocate_factors", True)
    factor_size = _dtype_size(run.option("factor_dtype", torch.float32))
    comm_size = _dtype_size(
        run.option("comm_dtype", None) or run.option("factor_dtype", torch.float32)
    )
    inv_size = _dtype_size(run.option("inv_dtype", torch.float32))
    grad_size = _dtype_size(run.dtype)
    m = _num_grad_workers(fraction, world_size)
    plan = plan_work(
        shapes,
        world_size,
        fraction,
        colocate_factors=colocate,
        cost=run.option("assignment_cost", "compute"),
    )
    assert plan.num_grad_workers == m

    if run.option("symmetry_aware", False):
        factor_elements = sum(s.a * (s.a + 1) // 2 + s.g * (s.g + 1) // 2 for s in shapes)
    else:
        factor_elements = sum(s.a**2 + s.g**2 for s in shapes)
    mine = [s for s in shapes if rank in plan.grad_workers(s.name)]
    if not colocate and method == "eigen":
        broadcast_elements = sum(s.a**2 + s.a + s.g**2 + s.g for s in shapes)
    else:
        broadcast_elements = sum(_second_order_elements(s, method) for s in mine) if m > 1 else 0
    return {
        "factor_allreduce": factor_elements * comm_size,
        "second_order_broadcast": broadcast_elements * inv_size,
        "grad_broadcast": sum(s.g * s.a for s in shapes) * grad_size if m < world_size else 0,
        "factors": sum(s.a**2 + s.g**2 for s in shapes) * factor_size,
        "second_order": sum(_second_order_elements(s, method) for s in mine) * inv_size,
    }


def _expected_step_bytes(expected: dict[str, int], step: int) -> dict[str, int]:
    return {
        "factor_allreduce": expected["factor_allreduce"] if step % FACTOR_UPDATE_STEPS == 0 else 0,
        "second_order_broadcast": (
            expected["second_order_broadcast"] if step % INV_UPDATE_STEPS == 0 else 0
        ),
        "grad_broadcast": expected["grad_broadcast"],
    }


# --- the spawned jobs, once per world size ----------------------------------------------------


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"world{w}")
def distributed_runs(request: pytest.FixtureRequest) -> dict[str, Any]:
    world_size: int = request.param
    batches = _make_batches(world_size)
    checkpoint_kwargs = _checkpoint_kwargs(world_size)
    results = run_distributed(
        _distributed_job, world_size, RUNS, batches, checkpoint_kwargs, timeout=150
    )
    return {
        "world_size": world_size,
        "batches": batches,
        "per_rank": [r["runs"] for r in results],
        "checkpoint": [r["checkpoint"] for r in results],
        "checkpoint_kwargs": checkpoint_kwargs,
    }


def test_all_ranks_hold_identical_parameters_after_every_step(
    distributed_runs: dict[str, Any],
) -> None:
    per_rank = distributed_runs["per_rank"]
    for run in RUNS:
        for step in range(NUM_STEPS):
            reference = per_rank[0][run.name]["params"][step]
            for rank, results in enumerate(per_rank[1:], start=1):
                assert torch.equal(results[run.name]["params"][step], reference), (
                    f"{run.name}: rank {rank} parameters differ from rank 0 after step {step}"
                )


@pytest.mark.parametrize("run_name", [r.name for r in RUNS if r.compare_to is not None])
def test_every_strategy_and_communication_option_gives_the_same_update(
    distributed_runs: dict[str, Any], run_name: str
) -> None:
    run = RUNS_BY_NAME[run_name]
    assert run.compare_to is not None
    results = distributed_runs["per_rank"][0]
    for step in range(NUM_STEPS):
        actual = results[run.name]["updates"][step]
        expected = results[run.compare_to]["updates"][step]
        error = _relative_error(actual, expected)
        assert error < run.tolerance, f"step {step}: relative difference {error:.2e}"


def test_the_strategy_variants_are_distinct_configurations(
    distributed_runs: dict[str, Any],
) -> None:
    """Guards the comparison above against comparing a run with itself: the variants must
    really communicate differently on this world size."""
    world_size = distributed_runs["world_size"]
    totals = {
        name: tuple(record["total_bytes"].values())
        for name, record in distributed_runs["per_rank"][0].items()
        if name.startswith("eigen/")
    }
    assert len(set(totals.values())) >= (3 if world_size == 2 else 4), totals
    assert all(t[0] > 0 for t in totals.values()), "every run must all-reduce its factors"


@pytest.mark.parametrize("run_name", EXACT_RUNS)
def test_world_of_w_ranks_equals_one_process_accumulating_w_micro_batches(
    distributed_runs: dict[str, Any], run_name: str
) -> None:
    world_size = distributed_runs["world_size"]
    run = RUNS_BY_NAME[run_name]
    distributed = distributed_runs["per_rank"][0][run.name]["updates"]
    single = _train_single_process(run, distributed_runs["batches"], world_size)
    merged = _train_single_process(
        run, distributed_runs["batches"], world_size, merge_micro_batches=True
    )
    for step in range(NUM_STEPS):
        error = _relative_error(distributed[step], single[step])
        assert error < 1e-8, f"step {step}: relative difference {error:.2e}"
    # The check is sensitive to the scale of every layer's G: merging the micro-batches changes
    # only that (the gradient and A stay the same), and it changes every layer's update.
    for layer, part in _layer_slices().items():
        error = _relative_error(merged[0][part], single[0][part])
        assert error > 0.1, f"layer {layer}: update insensitive to the scale of G ({error:.2e})"


@pytest.mark.parametrize("run_name", [run.name for run in RUNS])
def test_bytes_and_memory_match_what_the_strategy_implies(
    distributed_runs: dict[str, Any], run_name: str
) -> None:
    world_size = distributed_runs["world_size"]
    run = RUNS_BY_NAME[run_name]
    expected_names = [s.name for s in _layer_shapes(_tiny_cnn())]
    second_order_by_rank = []
    for rank, results in enumerate(distributed_runs["per_rank"]):
        record = results[run.name]
        assert record["layer_names"] == expected_names
        expected = _expected_accounting(run, world_size, rank)
        for step in range(NUM_STEPS):
            assert record["step_bytes"][step] == _expected_step_bytes(expected, step), (
                f"rank {rank} step {step}"
            )
        expected_total = {
            kind: sum(_expected_step_bytes(expected, step)[kind] for step in range(NUM_STEPS))
            for kind in ("factor_allreduce", "second_order_broadcast", "grad_broadcast")
        }
        assert record["total_bytes"] == expected_total, f"rank {rank}"
        assert record["memory"] == {
            "factors": expected["factors"],
            "second_order": expected["second_order"],
        }, f"rank {rank}"
        second_order_by_rank.append(record["memory"]["second_order"])
    # Plan-independent totals: every layer's second-order data lives on its m gradient workers.
    method = run.option("compute_method", "eigen")
    m = _num_grad_workers(run.option("grad_worker_fraction", 1.0), world_size)
    one_copy = sum(_second_order_elements(s, method) for s in _layer_shapes(_tiny_cnn()))
    one_copy *= _dtype_size(run.option("inv_dtype", torch.float32))
    assert sum(second_order_by_rank) == m * one_copy


def test_mem_opt_holds_one_over_world_of_comm_opt_second_order_memory(
    distributed_runs: dict[str, Any],
) -> None:
    per_rank = distributed_runs["per_rank"]
    comm_opt = [r["eigen/comm-opt"]["memory"]["second_order"] for r in per_rank]
    mem_opt = [
        r["eigen/mem-opt/tiny-buckets/no-overlap"]["memory"]["second_order"] for r in per_rank
    ]
    assert len(set(comm_opt)) == 1
    assert sum(mem_opt) == comm_opt[0]
    assert max(mem_opt) < comm_opt[0]


def _continue_single_process(
    saved: dict[str, Any] | None, kwargs: dict[str, Any], batches: Batches, world_size: int
) -> dict[str, list[torch.Tensor]]:
    """Resume one process from a checkpoint (or only model and optimizer when `saved` has no
    preconditioner state) with `accumulation_steps=world_size` over the same micro-batches."""
    assert saved is not None
    model = _tiny_cnn(torch.float64)
    model.load_state_dict(saved["model"])
    pre = KFACPreconditioner(model, accumulation_steps=world_size, **kwargs)
    if "preconditioner" in saved:
        pre.load_state_dict(saved["preconditioner"])
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    optimizer.load_state_dict(saved["optimizer"])
    record: dict[str, list[torch.Tensor]] = {"updates": [], "params": []}
    for step in range(CHECKPOINT_STEP, CHECKPOINT_STEP + NUM_CONTINUED_STEPS):
        optimizer.zero_grad()
        for micro in range(world_size):
            x, y = batches.x[step, micro].double(), batches.y[step, micro].double()
            (F.mse_loss(model(x), y) / world_size).backward()
        pre.step()
        record["updates"].append(_update(model))
        optimizer.step()
        record["params"].append(_parameters(model))
    return record


def test_rank_zero_state_dict_resumes_in_a_single_process_like_the_distributed_run(
    distributed_runs: dict[str, Any],
) -> None:
    world_size = distributed_runs["world_size"]
    checkpoints = distributed_runs["checkpoint"]
    saved = checkpoints[0]["saved"]
    assert all(c["saved"] is None for c in checkpoints[1:])
    kwargs = distributed_runs["checkpoint_kwargs"]
    resumed = _continue_single_process(saved, kwargs, distributed_runs["batches"], world_size)
    for step in range(NUM_CONTINUED_STEPS):
        error = _relative_error(resumed["updates"][step], checkpoints[0]["updates"][step])
        assert error < 1e-9, f"update {step} after resuming: relative difference {error:.2e}"
        error = _relative_error(resumed["params"][step], checkpoints[0]["params"][step])
        assert error < 1e-9, f"parameters {step} after resuming: relative difference {error:.2e}"
    # Without the preconditioner's state the first resumed update is different.
    without_state = {key: saved[key] for key in ("model", "optimizer")}
    fresh = _continue_single_process(without_state, kwargs, distributed_runs["batches"], world_size)
    assert _relative_error(fresh["updates"][0], checkpoints[0]["updates"][0]) > 1e-3


# --- world size 1 -------------------------------------------------------------------------------

WORLD_ONE_RUNS = [
    Run(
        f"float64/{method}/{fraction}",
        {**FLOAT64_KWARGS, "compute_method": method, "grad_worker_fraction": fraction},
        dtype=torch.float64,
        lr=FLOAT64_LEARNING_RATE,
    )
    for method, fraction in (("eigen", "mem-opt"), ("inverse", "comm-opt"))
]


def _world_one_job(runs: list[Run], batches: Batches) -> dict[str, dict[str, Any]]:
    return {run.name: _train_ddp_run(run, batches) for run in runs}


def test_world_size_one_communicates_nothing_and_matches_a_plain_single_process() -> None:
    batches = _make_batches(1)
    (results,) = run_distributed(_world_one_job, 1, WORLD_ONE_RUNS, batches, timeout=60)
    for run in WORLD_ONE_RUNS:
        record = results[run.name]
        zero = {"factor_allreduce": 0, "second_order_broadcast": 0, "grad_broadcast": 0}
        assert record["total_bytes"] == zero
        assert all(step_bytes == zero for step_bytes in record["step_bytes"])
        expected = _expected_accounting(run, 1, 0)
        assert record["memory"] == {
            "factors": expected["factors"],
            "second_order": expected["second_order"],
        }
        # `_train_single_process` runs without any process group and asserts zero bytes too.
        single = _train_single_process(run, batches, 1)
        for step in range(NUM_STEPS):
            error = _relative_error(record["updates"][step], single[step])
            assert error < 1e-8, f"{run.name} step {step}: relative difference {error:.2e}"
