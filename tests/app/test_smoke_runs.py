"""Short in-process runs through the other paths of the engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfac_train.app import train
from kfac_train.errors import UserError

from .conftest import FAST, compose_config


def test_a_resnet20_on_synthetic_data_runs_in_bf16_with_accumulation(tmp_path: Path):
    summary = train(
        compose_config(
            [
                *FAST,
                "model=resnet20",
                "data=synthetic",
                "data.num_train=64",
                "data.num_eval=16",
                "batch=32",
                "trainer.micro_batch=8",
                "trainer.max_steps=2",
                "trainer.precision=bf16",
                f"output_dir={tmp_path}",
            ]
        )
    )
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["accumulation_steps"] == 4 and summary["samples"] == 64
    assert set(summary["metrics"]) == {"top1", "loss"}


def test_training_stops_at_the_target_metric_and_records_time_and_steps_to_it(tmp_path: Path):
    summary = train(
        compose_config(
            [
                *FAST,
                "trainer.eval_every=5",
                "trainer.target_metric=top1",
                "trainer.target_value=0.8",
                f"output_dir={tmp_path}",
            ]
        )
    )
    assert summary["status"] == "target_reached"
    target = summary["target"]
    assert target["metric"] == "top1" and target["value"] >= 0.8
    assert target["steps"] == summary["steps"] and target["steps"] % 5 == 0
    assert 0 < target["time"] <= summary["train_time"]
    assert json.loads((tmp_path / "summary.json").read_text())["target"] == target


def test_a_target_metric_the_task_does_not_report_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="choose one of: loss, top1"):
        train(
            compose_config(
                [
                    *FAST,
                    "trainer.max_steps=2",
                    "trainer.eval_every=1",
                    "trainer.target_metric=f1",
                    "trainer.target_value=1",
                    f"output_dir={tmp_path}",
                ]
            )
        )


def test_fp16_without_a_gpu_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="fp16 needs a CUDA device"):
        train(
            compose_config(
                [
                    *FAST,
                    "trainer.device=cpu",
                    "trainer.precision=fp16",
                    "trainer.max_steps=1",
                    f"output_dir={tmp_path}",
                ]
            )
        )
