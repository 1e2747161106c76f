"""Unit-wise BatchNorm on several ranks.

Its packed ``(C, 3)`` blocks travel in the factor all-reduce buckets; they are not symmetric
matrices, even with three channels, so ``symmetry_aware`` must send them whole.

It refuses ``nn.SyncBatchNorm`` on several ranks instead of being wrong: SyncBatchNorm
normalises with statistics over all ranks; the unit-wise blocks are built from
``x̂`` normalised with the local batch statistics, so they would describe another layer. The
preconditioner says so, naming the layer and the ways out; ``batchnorm="skip"`` still works.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kfac_train.kfac import KFACPreconditioner

from .dist_utils import run_distributed
from .test_distributed_edge_cases import SETTINGS, _bn_image_data, _bn_model, _shard, _train


def _symmetric_run() -> list[torch.Tensor]:
    model = nn.parallel.DistributedDataParallel(_bn_model())
    pre = KFACPreconditioner(model, batchnorm="unit_wise", symmetry_aware=True, **SETTINGS)
    return _train(model, pre, [_shard(*_bn_image_data(2), dist.get_rank())])


def test_three_channel_blocks_survive_the_symmetric_all_reduce() -> None:
    model = _bn_model()
    assert model.bn.num_features == 3  # its (3, 3) blocks look like a square factor
    pre = KFACPreconditioner(model, accumulation_steps=2, batchnorm="unit_wise", **SETTINGS)
    x, y = _bn_image_data(2)
    expected = _train(model, pre, [_shard(x, y, r) for r in range(2)])
    for rank, params in enumerate(run_distributed(_symmetric_run, 2)):
        for got, want in zip(params, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=f"rank {rank}")


def _rank_run() -> dict[str, str | int]:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.SyncBatchNorm(3), nn.Flatten())
    try:
        KFACPreconditioner(model, batchnorm="unit_wise")
        refused = ""
    except ValueError as err:
        refused = str(err)
    skipped = KFACPreconditioner(model, batchnorm="skip")
    return {"refused": refused, "skip_layers": len(skipped.layer_names)}


def test_unit_wise_batchnorm_refuses_sync_batchnorm_on_two_ranks() -> None:
    for result in run_distributed(_rank_run, 2):
        assert "SyncBatchNorm" in result["refused"] and "'1'" in result["refused"]
        assert "batchnorm='skip'" in result["refused"]
        assert result["skip_layers"] == 1  # the convolution


def test_one_process_sync_batchnorm_is_plain_batchnorm_and_is_preconditioned() -> None:
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.SyncBatchNorm(3), nn.Flatten())
    pre = KFACPreconditioner(model, batchnorm="unit_wise")
    assert list(pre.batchnorm_layers) == ["1"]
