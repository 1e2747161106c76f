"""K-FAC on an FSDP2-sharded model (`fully_shard`) equals K-FAC on the same model under DDP.

Two gloo ranks train the same float64 CNN (conv + two Linear, each with bias) on the same
per-rank batches, once wrapped in `DistributedDataParallel` and once sharded with `fully_shard`
(each layer, then the root). Under FSDP2 the layer gradients are `DTensor` shards; K-FAC gathers
each full gradient, preconditions it and writes this rank's shard back. After every step the
full parameters (gathered) must equal the DDP run's, for COMM-OPT (fraction 1) and MEM-OPT
(fraction 1/2, which is also HYBRID-OPT's fraction on 2 ranks), with both compute methods, over
factor and inverse-update steps and with the KL clip active.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from kfac_train.kfac import KFACPreconditioner

from .dist_utils import run_distributed

STEPS = 4
VARIANTS = [
    {"grad_worker_fraction": "comm-opt", "compute_method": "eigen"},
    {"grad_worker_fraction": "comm-opt", "compute_method": "inverse"},
    {"grad_worker_fraction": "mem-opt", "compute_method": "eigen"},
    {"grad_worker_fraction": 0.5, "compute_method": "inverse", "symmetry_aware": True},
]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 16, 9)  # 9 rows: uneven shards on 2 ranks (5 + 4)
        self.fc2 = nn.Linear(9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _train(parallelism: str, options: dict[str, Any]) -> dict[str, Any]:
    torch.manual_seed(0)
    net = Net().double()
    if parallelism == "ddp":
        model: nn.Module = DistributedDataParallel(net)
    else:
        for layer in (net.conv, net.fc1, net.fc2):
            fully_shard(layer)
        model = fully_shard(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)  # built after sharding
    pre = KFACPreconditioner(
        model,
        factor_update_steps=1,
        inv_update_steps=2,
        damping=0.01,
        kl_clip=1e-5,
        lr=0.05,
        factor_dtype=torch.float64,
        inv_dtype=torch.float64,
        **options,
    )
    generator = torch.Generator().manual_seed(100 + dist.get_rank())
    params, local_grad_shapes = [], []
    for _ in range(STEPS):
        x = torch.randn(8, 2, 4, 4, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 5, (8,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        optimizer.step()
        params.append([_full(p.detach()).clone() for p in net.parameters()])
    for p in net.parameters():
        grad = p.grad
        local_grad_shapes.append(list(grad.to_local().shape if isinstance(grad, DTensor) else []))
    return {
        "params": params,
        "local_grad_shapes": local_grad_shapes,
        "kl_scale": float(pre.last_kl_scale),
    }


def _both(options: dict[str, Any]) -> dict[str, Any]:
    return {"ddp": _train("ddp", options), "fsdp": _train("fsdp", options)}


def _all_variants() -> list[dict[str, Any]]:
    return [_both(options) for options in VARIANTS]


@pytest.fixture(scope="module")
def results() -> list[list[dict[str, Any]]]:
    """results[rank][variant] = {"ddp": ..., "fsdp": ...}."""
    return run_distributed(_all_variants, 2, timeout=240)


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=[str(v) for v in VARIANTS])
def test_fsdp_kfac_updates_equal_the_ddp_kfac_updates(results, variant: int):
    for rank in range(2):
        ddp, fsdp = results[rank][variant]["ddp"], results[rank][variant]["fsdp"]
        for step, (want, got) in enumerate(zip(ddp["params"], fsdp["params"], strict=True)):
            for w, g in zip(want, got, strict=True):
                torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12, msg=f"rank {rank} {step}")
    assert results[0][variant]["fsdp"]["params"][-1][0].shape == (4, 2, 3, 3)


def test_the_fsdp_gradients_really_are_shards_and_kfac_moved_the_parameters(results):
    shapes = results[0][0]["fsdp"]["local_grad_shapes"], results[1][0]["fsdp"]["local_grad_shapes"]
    # fc1.weight (9, 64) splits 5 + 4 rows; conv.weight (4, 2, 3, 3) splits 2 + 2
    assert shapes[0][2] == [5, 64] and shapes[1][2] == [4, 64]
    assert shapes[0][0] == [2, 2, 3, 3] and shapes[1][0] == [2, 2, 3, 3]
    # the KL clip was active: a plain gather/scatter bug would change the scale too
    assert results[0][0]["fsdp"]["kl_scale"] < 1.0
