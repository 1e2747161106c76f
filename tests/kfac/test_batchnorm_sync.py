"""Unit-wise BatchNorm refuses ``nn.SyncBatchNorm`` on several ranks instead of being wrong.

SyncBatchNorm normalises with statistics over all ranks; the unit-wise blocks are built from
``x̂`` normalised with the local batch statistics, so they would describe another layer. The
preconditioner says so, naming the layer and the ways out; ``batchnorm="skip"`` still works.
"""

from __future__ import annotations

from torch import nn

from kfac_train.kfac import KFACPreconditioner

from .dist_utils import run_distributed


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
