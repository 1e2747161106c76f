"""A 2-process torchrun (gloo) run: replicas stay identical and agree with one process that
accumulates the same two micro-batches per step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kfac_train.app import train

from .conftest import FAST, REPO, compose_config

# No BatchNorm, no augmentation: then 2 ranks x micro-batch 32 and 1 process x 2 accumulated
# micro-batches of 32 see the same 64 samples per step and compute the same update.
RUN = [
    *FAST,
    "trainer.max_steps=12",
    "trainer.log_every=4",
    "trainer.micro_batch=32",
    "model.batch_norm=false",
    "data.shift=0",
    "kfac.factor_update_steps=1",
    "kfac.inv_update_steps=4",
]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(REPO / "train.py"),
            *RUN,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return run_dir


def test_two_ranks_keep_identical_replicas_and_share_one_run_directory(two_rank_run: Path):
    summary = json.loads((two_rank_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["accumulation_steps"] == 1
    assert summary["replicas_agree"] is True
    assert (two_rank_run / "train.log").exists() and (two_rank_run / "train_rank1.log").exists()
    assert not (two_rank_run.parent / "outputs").exists()


def test_two_ranks_agree_with_one_process_accumulating_the_same_batches(
    two_rank_run: Path, tmp_path: Path
):
    single = train(compose_config([*RUN, f"output_dir={tmp_path}"]))
    assert single["world_size"] == 1 and single["accumulation_steps"] == 2
    distributed = json.loads((two_rank_run / "summary.json").read_text())
    assert distributed["metrics"]["top1"] == pytest.approx(single["metrics"]["top1"], abs=0.006)
    assert distributed["metrics"]["loss"] == pytest.approx(single["metrics"]["loss"], rel=1e-3)
    weights_2 = torch.load(two_rank_run / "checkpoints/step_00000012.pt", weights_only=True)
    weights_1 = torch.load(tmp_path / "checkpoints/step_00000012.pt", weights_only=True)
    for name, tensor in weights_1["model"].items():
        torch.testing.assert_close(weights_2["model"][name], tensor, rtol=1e-3, atol=1e-4)
