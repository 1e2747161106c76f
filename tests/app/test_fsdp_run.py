"""`trainer.parallelism=fsdp` on 2 torchrun (gloo) ranks: K-FAC on the FSDP2-sharded model trains
like the DDP run, and its checkpoints (full state dicts, the DDP layout) resume under FSDP and
under DDP alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import FAST, REPO

RUN = [
    *FAST,
    "trainer.max_steps=8",
    "trainer.log_every=4",
    "checkpoint.every=4",
    "checkpoint.keep_last=3",
    "kfac.factor_update_steps=1",
    "kfac.inv_update_steps=3",
]


def _torchrun(args: list[str], run_dir: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            str(REPO / "train.py"),
            *args,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp")
    dirs = {name: root / name for name in ("fsdp", "ddp", "fsdp_resumed", "ddp_from_fsdp")}
    _finish(
        [
            _torchrun([*RUN, "trainer.parallelism=fsdp"], dirs["fsdp"], 29631),
            _torchrun([*RUN, "trainer.parallelism=ddp"], dirs["ddp"], 29632),
        ]
    )
    step_4 = dirs["fsdp"] / "checkpoints/step_00000004.pt"
    _finish(
        [
            _torchrun(
                [*RUN, "trainer.parallelism=fsdp", f"checkpoint.resume={step_4}"],
                dirs["fsdp_resumed"],
                29633,
            ),
            _torchrun(
                [*RUN, "trainer.parallelism=ddp", f"checkpoint.resume={step_4}"],
                dirs["ddp_from_fsdp"],
                29634,
            ),
        ]
    )
    return dirs


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _state(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / f"checkpoints/step_{step:08d}.pt", weights_only=True)


def _assert_same_training_state(got: dict, want: dict) -> None:
    assert got["model"].keys() == want["model"].keys()
    for name, tensor in want["model"].items():
        torch.testing.assert_close(got["model"][name], tensor, rtol=1e-5, atol=1e-7, msg=name)
    assert (
        got["optimizer"]["param_groups"][0]["params"]
        == want["optimizer"]["param_groups"][0]["params"]
    )
    for index, entry in want["optimizer"]["state"].items():
        torch.testing.assert_close(
            got["optimizer"]["state"][index]["momentum_buffer"],
            entry["momentum_buffer"],
            rtol=1e-5,
            atol=1e-7,
        )


def test_fsdp_kfac_run_trains_like_the_ddp_run(runs: dict[str, Path]):
    fsdp, ddp = _summary(runs["fsdp"]), _summary(runs["ddp"])
    assert fsdp["status"] == "completed" and fsdp["replicas_agree"] is True
    assert fsdp["metrics"]["top1"] == pytest.approx(ddp["metrics"]["top1"], abs=1e-9)
    assert fsdp["metrics"]["loss"] == pytest.approx(ddp["metrics"]["loss"], rel=1e-6)
    # the checkpoints are full state dicts in the DDP layout, with the same values
    _assert_same_training_state(_state(runs["fsdp"], 8), _state(runs["ddp"], 8))


def test_an_fsdp_checkpoint_resumes_under_fsdp_and_under_ddp(runs: dict[str, Path]):
    uninterrupted = _state(runs["fsdp"], 8)
    for resumed in ("fsdp_resumed", "ddp_from_fsdp"):
        # started at step 4: trained steps 5-8 only, so it never saved a step-4 checkpoint
        assert _summary(runs[resumed])["steps"] == 8
        assert not (runs[resumed] / "checkpoints/step_00000004.pt").exists()
    _assert_same_training_state(_state(runs["fsdp_resumed"], 8), uninterrupted)
    _assert_same_training_state(_state(runs["ddp_from_fsdp"], 8), _state(runs["ddp"], 8))
