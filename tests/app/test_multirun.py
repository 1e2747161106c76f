"""`python train.py -m optim.lr=0.05,0.1 ...`: a local sweep, one run directory per job."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import FAST, run_cli


def test_a_two_job_sweep_writes_one_run_directory_per_job(tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        ["-m", "optim.lr=0.05,0.1", *FAST, "trainer.max_steps=3", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0", "1"]
    learning_rates = []
    for run in runs:
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 3
        config = (run / "config.yaml").read_text()
        learning_rates.append(next(line for line in config.splitlines() if "  lr:" in line))
    assert learning_rates == ["  lr: 0.05", "  lr: 0.1"]
