"""Bad inputs on the command line: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import FAST, REPO

CASES = {
    "unknown_model": ["model=nope"],
    "indivisible_batch": ["batch.size=100", "trainer.micro_batch=16"],
    "missing_data_root": ["model=resnet50", "optim=kfac", "batch=32768"],
    "typo_key": ["trainer.max_step=3"],
    "wrong_type": ["trainer.max_steps=many"],
    "corrupt_checkpoint": ["checkpoint.resume={tmp}/corrupt.pt"],
    "channels_mismatch": ["model=resnet20", "data=mnist5k", "trainer.max_steps=1"],
    "missing_csv": ["data=mnist5k", "data.path={tmp}/absent.csv", "trainer.max_steps=1"],
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """All cases run concurrently (each pays the interpreter start-up once)."""
    tmp = tmp_path_factory.mktemp("errors")
    (tmp / "corrupt.pt").write_bytes(b"\x80\x02 this is not a checkpoint")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    processes = {
        name: subprocess.Popen(
            [
                sys.executable,
                str(REPO / "train.py"),
                *FAST,
                *(a.format(tmp=tmp) for a in args),
                f"hydra.run.dir={tmp / name}",
            ],
            cwd=tmp,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in CASES.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=400)
        results[name] = subprocess.CompletedProcess(
            process.args, process.returncode, stdout, stderr
        )
    return results


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_an_unknown_model_lists_the_available_models(outcomes):
    line = one_line_error(outcomes["unknown_model"])
    assert "unknown model 'nope'" in line and "resnet50" in line and "small_cnn" in line
    assert "_schema" not in line


def test_an_indivisible_batch_names_the_numbers(outcomes):
    line = one_line_error(outcomes["indivisible_batch"])
    assert "batch.size=100" in line and "trainer.micro_batch=16" in line


def test_missing_imagenet_names_the_key_to_set(outcomes):
    line = one_line_error(outcomes["missing_data_root"])
    assert "data.root" in line


@pytest.mark.parametrize("case", ["typo_key", "wrong_type"])
def test_a_typo_or_a_wrong_type_is_rejected_by_hydra(outcomes, case):
    result = outcomes[case]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    key = "max_step" if case == "typo_key" else "max_steps"
    assert key in result.stderr


def test_a_corrupt_checkpoint_is_named(outcomes):
    line = one_line_error(outcomes["corrupt_checkpoint"])
    assert "corrupt.pt" in line and "checkpoint" in line


def test_a_model_taking_rgb_on_grayscale_digits_names_the_fix(outcomes):
    line = one_line_error(outcomes["channels_mismatch"])
    assert "model.in_channels=3" in line and "1-channel" in line
    assert "add model.in_channels=1" in line


def test_a_missing_mnist5k_csv_is_named(outcomes):
    line = one_line_error(outcomes["missing_csv"])
    assert "absent.csv" in line and "no such file" in line
