"""The W&B run of a run directory is resumed, not duplicated, when the job is requeued."""

from __future__ import annotations

import sys
import types

from kfac_train.config import LoggerConfig
from kfac_train.loggers.wandb_logger import WandbLogger, run_id


def test_a_run_directory_always_opens_the_same_wandb_run(tmp_path, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(kwargs))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = LoggerConfig(name="wandb")
    WandbLogger(cfg, str(tmp_path / "slurm-9.0"), {})
    WandbLogger(cfg, str(tmp_path / "slurm-9.0") + "/", {})  # the requeued job
    WandbLogger(cfg, str(tmp_path / "slurm-10.0"), {})
    assert calls[0]["resume"] == "allow" and calls[0]["id"] == calls[1]["id"]
    assert calls[2]["id"] != calls[0]["id"]
    assert calls[0]["id"] == run_id(str(tmp_path / "slurm-9.0"))
