"""Resuming a checkpoint into a run it does not fit, and the other mistakes around checkpoints,
through ``python train.py``: an SGD checkpoint warm-starts a K-FAC run (and back), everything
else that does not fit is one line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FAST, REPO
from .test_cli_errors import one_line_error

BASE = [*FAST, "trainer.log_every=2", "seed=2"]


def launch(args: list[str], run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes: dict[str, subprocess.Popen]) -> dict[str, subprocess.CompletedProcess]:
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = subprocess.CompletedProcess(
            process.args, process.returncode, stdout, stderr
        )
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """Two 4-step runs (SGD, K-FAC), then every case at once, each in its own run directory."""
    tmp = tmp_path_factory.mktemp("checkpoint_errors")
    made = finish(
        {
            "sgd": launch([*BASE, "optim=sgd", "trainer.max_steps=4"], tmp / "sgd"),
            "kfac": launch([*BASE, "optim=kfac", "trainer.max_steps=4"], tmp / "kfac"),
        }
    )
    for name, result in made.items():
        assert result.returncode == 0, (name, result.stderr[-3000:])
    sgd = tmp / "sgd/checkpoints/step_00000004.pt"
    kfac = tmp / "kfac/checkpoints/step_00000004.pt"
    broken = tmp / "broken/checkpoints"
    broken.mkdir(parents=True)
    (broken / "step_00000004.pt").write_bytes(kfac.read_bytes()[:5000])
    (tmp / "imagenet/train").mkdir(parents=True)
    (tmp / "imagenet/val").mkdir(parents=True)
    cases = {
        "sgd_into_kfac": ["optim=kfac", f"checkpoint.resume={sgd}", "trainer.max_steps=6"],
        "kfac_into_sgd": ["optim=sgd", f"checkpoint.resume={kfac}", "trainer.max_steps=6"],
        "other_shapes": ["model.hidden=32", f"checkpoint.resume={kfac}", "trainer.max_steps=6"],
        "other_layers": [
            "model.batch_norm=false",
            f"checkpoint.resume={kfac}",
            "trainer.max_steps=6",
        ],
        "other_optimizer": ["optim=adam", f"checkpoint.resume={sgd}", "trainer.max_steps=6"],
        "log_every_zero": ["trainer.log_every=0", "trainer.max_steps=2"],
        "empty_imagenet": [
            "model=resnet50",
            f"data.root={tmp / 'imagenet'}",
            "trainer.max_steps=2",
        ],
        "nothing_readable": ["checkpoint.resume=auto", "trainer.max_steps=6"],
    }
    run_dirs = {name: tmp / name for name in cases}
    run_dirs["nothing_readable"] = tmp / "broken"
    results = finish({name: launch([*BASE, *args], run_dirs[name]) for name, args in cases.items()})
    for name, run_dir in run_dirs.items():
        results[name].run_dir = run_dir  # type: ignore[attr-defined]
    return results


def summary_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return json.loads((result.run_dir / "summary.json").read_text())  # type: ignore[attr-defined]


def test_an_sgd_checkpoint_warm_starts_kfac_with_fresh_statistics(outcomes):
    result = outcomes["sgd_into_kfac"]
    summary = summary_of(result)
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert "written without K-FAC" in result.stdout and "statistics start fresh" in result.stdout


def test_a_kfac_checkpoint_continues_without_kfac_and_says_so(outcomes):
    result = outcomes["kfac_into_sgd"]
    assert summary_of(result)["steps"] == 6
    assert "holds K-FAC state; this run has none: it is dropped" in result.stdout


def test_a_model_shape_mismatch_names_the_tensors(outcomes):
    line = one_line_error(outcomes["other_shapes"])
    assert "does not fit model=small_cnn" in line
    assert "shape mismatches (classifier.1.weight saved (64, " in line


def test_missing_and_unexpected_model_keys_are_named(outcomes):
    line = one_line_error(outcomes["other_layers"])
    assert "4 missing keys (features.2.weight, features.2.bias, features.5.weight, ...)" in line
    assert "unexpected keys (features.1.weight" in line


def test_another_base_optimizer_is_refused(outcomes):
    line = one_line_error(outcomes["other_optimizer"])
    assert "optim.base=sgd" in line and "optim.base=adam" in line


def test_log_every_zero_is_a_user_error(outcomes):
    line = one_line_error(outcomes["log_every_zero"])
    assert "trainer.log_every=0" in line


def test_an_imagenet_root_without_images_is_named(outcomes):
    line = one_line_error(outcomes["empty_imagenet"])
    assert "imagenet/train" in line and "holds no images" in line and "data.root" in line


def test_auto_with_no_readable_checkpoint_refuses_to_start_over(outcomes):
    line = one_line_error(outcomes["nothing_readable"])
    assert "no readable checkpoint" in line and "step_00000004.pt" in line
