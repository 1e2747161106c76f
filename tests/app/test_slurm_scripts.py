"""slurm/train.sbatch runs train.py under srun, and requeues itself after a preemption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import FAST, REPO

SCRIPTS = [REPO / "slurm/train.sbatch", REPO / "slurm/train_torchrun.sbatch"]


def stub(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_scripts_are_valid_bash_with_one_srun_line(script: Path):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    lines = script.read_text().splitlines()
    assert sum(line.startswith("srun ") for line in lines) == 1
    assert "#SBATCH --signal=USR1@180" in lines and "#SBATCH --requeue" in lines


def run_script(tmp_path: Path, srun_body: str, *args: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir, "srun", srun_body)
    stub(bin_dir, "scontrol", f'echo "$@" >> {tmp_path}/scontrol.log')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "SLURM_JOB_ID": "99", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "node01", "SLURM_CPUS_PER_TASK": "1"}
    return subprocess.run(["bash", str(REPO / "slurm/train.sbatch"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=400)


def test_a_job_trains_into_its_job_directory_and_does_not_requeue_when_done(tmp_path: Path):
    # srun stand-in: run the task once, with train.py found in the repository
    result = run_script(tmp_path, f'shift 2; exec {sys.executable} {REPO}/train.py "$@"',
                        *FAST, "trainer.max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "outputs/slurm-99.0/summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert not (tmp_path / "scontrol.log").exists()


def test_a_preempted_job_requeues_itself(tmp_path: Path):
    preempted = json.dumps({"status": "preempted"}, indent=2)
    body = f"mkdir -p outputs/slurm-99.0 && echo '{preempted}' > outputs/slurm-99.0/summary.json"
    result = run_script(tmp_path, body)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "99"]
