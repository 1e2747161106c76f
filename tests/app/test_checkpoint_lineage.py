"""Checkpoints never lose a run (through ``python train.py``): a checkpoint of any name resumes,
a rollback keeps the newer checkpoints and `resume=auto` then continues the rollback, auto
falls back past a truncated checkpoint, stale temporary files go, NaN weights are never saved."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from .conftest import FAST, run_cli
from .test_cli_errors import one_line_error

# 22 steps per epoch; evaluation only at the end.
RUN = [*FAST, "trainer.log_every=5", "seed=5"]


def names(run_dir: Path) -> list[str]:
    """Checkpoint file names, the lineage suffix of ``step_<n>-<lineage>.pt`` as ``-*``."""
    found = [
        re.sub(r"-[0-9a-f]+\.pt$", "-*.pt", p.name) for p in (run_dir / "checkpoints").iterdir()
    ]
    return sorted(found)


def step_file(step: int, suffixed: bool = False) -> str:
    return f"step_{step:08d}{'-*' if suffixed else ''}.pt"


def finished(result: subprocess.CompletedProcess, run_dir: Path) -> dict:
    """summary.json of a run that exited 0; its checkpoint exists."""
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["checkpoint"] is not None and Path(summary["checkpoint"]).is_file()
    return summary


def log_text(result: subprocess.CompletedProcess, run_dir: Path) -> str:
    return result.stdout + result.stderr + (run_dir / "train.log").read_text()


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding the checkpoints of steps 5, 10, 15 and 20 of one run."""
    run_dir = tmp_path_factory.mktemp("history")
    result = run_cli(
        [
            *RUN,
            "trainer.max_steps=20",
            "checkpoint.every=5",
            "checkpoint.keep_last=0",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=run_dir,
    )
    finished(result, run_dir)
    assert names(run_dir) == [step_file(s) for s in (5, 10, 15, 20)]
    return run_dir


def copy_run(history: Path, destination: Path) -> Path:
    shutil.copytree(history, destination)
    return destination


def test_a_checkpoint_of_any_name_resumes_and_the_run_finishes(history: Path, tmp_path: Path):
    best = tmp_path / "best.pt"
    shutil.copy(history / "checkpoints" / step_file(10), best)
    run_dir = tmp_path / "run"
    result = run_cli(
        [*RUN, "trainer.max_steps=12", f"checkpoint.resume={best}", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    summary = finished(result, run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 12
    assert names(run_dir) == [step_file(12)]
    assert best.is_file()


def test_a_rollback_keeps_newer_checkpoints_and_auto_continues_the_rollback(
    history: Path, tmp_path: Path
):
    run_dir = copy_run(history, tmp_path / "run")
    old = names(run_dir)
    rollback = run_cli(
        [
            *RUN,
            "trainer.max_steps=12",
            "checkpoint.keep_last=1",
            f"checkpoint.resume={run_dir / 'checkpoints' / step_file(10)}",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    summary = finished(rollback, run_dir)
    assert summary["steps"] == 12
    assert Path(summary["checkpoint"]).name.startswith("step_00000012-")
    assert names(run_dir) == sorted(
        [*old, step_file(12, suffixed=True)]
    )  # nothing of the old run deleted
    assert "rolled back to step 10" in log_text(rollback, run_dir)

    # auto continues the lineage written last (from step 12), not the abandoned one (step 20)
    auto = run_cli(
        [
            *RUN,
            "trainer.max_steps=14",
            "checkpoint.keep_last=1",
            "checkpoint.resume=auto",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    summary = finished(auto, run_dir)
    assert summary["steps"] == 14
    assert names(run_dir) == sorted([*old, step_file(14, True)])  # its step 12 pruned (keep_last)

    # a fresh run in a used directory deletes nothing it did not write either
    fresh = run_cli(
        [*RUN, "trainer.max_steps=3", "checkpoint.keep_last=1", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    summary = finished(fresh, run_dir)
    assert summary["steps"] == 3
    assert names(run_dir) == sorted([*old, step_file(14, True), step_file(3, True)])


def test_auto_falls_back_past_a_truncated_checkpoint_and_removes_stale_temporaries(
    history: Path, tmp_path: Path
):
    run_dir = copy_run(history, tmp_path / "run")
    newest = run_dir / "checkpoints" / step_file(20)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a write killed half way (no atomic rename)
    stale = run_dir / "checkpoints" / f".{step_file(20)}.k1ll3d.tmp"
    stale.write_bytes(data[: len(data) // 3])
    result = run_cli(
        [*RUN, "trainer.max_steps=17", "checkpoint.resume=auto", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
    )
    summary = finished(result, run_dir)
    assert summary["steps"] == 17
    text = log_text(result, run_dir)
    assert f"resuming {run_dir / 'checkpoints' / step_file(15)} (step 15)" in text
    assert step_file(20) in text and "unreadable" in text
    assert not stale.exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"][-2:] == [15, 17]


def test_no_checkpoint_of_non_finite_weights_is_written(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            *FAST,
            "optim=sgd",
            "optim.lr=1e4",
            "trainer.max_steps=30",
            "trainer.log_every=1000",
            "checkpoint.every=1",
            "checkpoint.keep_last=2",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    kept = sorted((run_dir / "checkpoints").glob("step_*.pt"))
    assert kept, "the good checkpoints before the divergence are kept"
    for path in kept:
        model = torch.load(path, weights_only=True)["model"]
        assert all(t.isfinite().all() for t in model.values() if t.is_floating_point()), path
    line = one_line_error(result)
    assert "training diverged: non-finite weights" in line and "optim.lr" in line
    assert str(kept[-1]) in line
