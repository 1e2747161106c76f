"""The U-Net trained with K-FAC + Adam on LGG-layout slices segments the lesions."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfac_train.app import train
from kfac_train.errors import UserError

from .helpers import QUIET, compose_run, records


def test_kfac_with_adam_reaches_a_validation_dice_of_0_8_in_50_steps(lgg_root: Path, tmp_path):
    config = compose_run(
        "model=unet",
        "optim=kfac",
        f"data.root={lgg_root}",
        "data.num_val_patients=2",
        "model.image_size=32",
        "model.init_features=8",
        "batch.size=8",
        "trainer.micro_batch=8",
        "trainer.max_steps=50",
        "trainer.eval_every=1000",
        "schedule.warmup=5",
        "optim.lr=3e-3",
        "kfac.factor_update_steps=2",
        "kfac.inv_update_steps=10",
        "checkpoint.at_end=false",
        f"output_dir={tmp_path}",
        *QUIET,
    )
    assert config.optim.base == "adam" and config.optim.preconditioner == "kfac"
    summary = train(config)
    assert summary["status"] == "completed", summary
    assert summary["kfac"]["memory_bytes"]["factors"] > 0  # K-FAC was active
    last_eval = records(tmp_path, "eval")[-1]
    assert last_eval["metrics"]["dice"] == summary["metrics"]["dice"]
    # The fixture draws each slice's lesion at a random place, so a volume's lesions are separate
    # 3-D components: Buda et al.'s `dice` keeps one of them by design; every pixel counts in
    # `dice_all_components`.
    assert summary["metrics"]["dice_all_components"] >= 0.8, summary["metrics"]
    assert 0.0 < summary["metrics"]["dice"] < summary["metrics"]["dice_all_components"]


def test_unet_runs_on_synthetic_slices_for_smoke_and_throughput_runs(tmp_path):
    config = compose_run(
        "model=unet",
        "data=synthetic",
        "data.num_train=8",
        "data.num_eval=4",
        "model.image_size=32",
        "model.init_features=4",
        "batch.size=4",
        "trainer.micro_batch=4",
        "trainer.max_steps=2",
        "checkpoint.at_end=false",
        f"output_dir={tmp_path}",
        *QUIET,
    )
    summary = train(config)
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert 0.0 <= summary["metrics"]["dice"] <= 1.0


def test_a_unet_expecting_one_channel_on_the_three_channel_slices_names_the_fix(
    lgg_root: Path, tmp_path
):
    config = compose_run(
        "model=unet",
        f"data.root={lgg_root}",
        "data.num_val_patients=2",
        "model.in_channels=1",
        "model.image_size=32",
        "trainer.max_steps=1",
        f"output_dir={tmp_path}",
        *QUIET,
    )
    with pytest.raises(UserError, match="model.in_channels=1, but data=lgg has 3-channel images"):
        train(config)
