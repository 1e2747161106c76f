"""The newcomer's run: `python train.py` with no arguments (digits + small CNN + K-FAC)."""

from __future__ import annotations

import json
from pathlib import Path

from kfac_train.app import train
from kfac_train.engine.outputs import read_metrics

from .conftest import FAST, compose_config


def test_the_default_run_reaches_97_percent_test_accuracy_and_writes_its_outputs(tmp_path: Path):
    cfg = compose_config([*FAST, f"output_dir={tmp_path}"])
    assert (cfg.model.name, cfg.data.name, cfg.optim.preconditioner) == (
        "small_cnn",
        "digits",
        "kfac",
    )
    summary = train(cfg)

    assert summary["status"] == "completed"
    assert summary["metrics"]["top1"] >= 0.97  # on the 360 held-out digits
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["metrics"] == summary["metrics"] and on_disk["steps"] == summary["steps"]
    assert "kfac" in on_disk and on_disk["kfac"]["memory_bytes"]["factors"] > 0

    records = read_metrics(tmp_path / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    assert len(eval_records) == 12  # one per epoch
    for key in ("step", "epoch", "samples", "lr", "loss", "step_time", "kfac"):
        assert key in train_records[0], key
    assert train_records[-1]["loss"] < train_records[0]["loss"] / 5
    for record in train_records:  # the KL clip over each log window
        kl = record["kfac"]
        assert 0 < kl["kl_scale_mean"] <= 1 and 0 <= kl["kl_clipped_fraction"] <= 1
        assert (kl["kl_scale_mean"] < 1) == (kl["kl_clipped_fraction"] > 0)
    assert any(r["kfac"]["kl_clipped_fraction"] > 0 for r in train_records)  # recipe: 0.001
    assert train_records[-1]["samples"] == summary["steps"] * 64
    assert (tmp_path / "config.yaml").read_text().startswith("model:")
    checkpoints = sorted((tmp_path / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in checkpoints] == [f"step_{summary['steps']:08d}.pt"]
