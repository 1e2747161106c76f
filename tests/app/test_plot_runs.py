"""scripts/plot_runs.py draws several runs' curves into one PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def write_run(run_dir: Path, scale: float) -> None:
    run_dir.mkdir(parents=True)
    records = []
    for step in (10, 20, 30):
        records.append(
            {
                "kind": "train",
                "step": step,
                "epoch": step / 10,
                "samples": step * 64,
                "lr": 0.1,
                "loss": scale / step,
                "step_time": 0.01,
                "metrics": {},
            }
        )
        records.append(
            {
                "kind": "eval",
                "step": step,
                "epoch": step / 10,
                "samples": step * 64,
                "metrics": {"top1": 1 - scale / step},
                "eval_time": 0.1,
            }
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_two_runs_are_drawn_into_one_png(tmp_path: Path):
    write_run(tmp_path / "kfac", 1.0)
    write_run(tmp_path / "sgd", 2.0)
    out = tmp_path / "compare.png"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/plot_runs.py"),
            str(tmp_path / "kfac"),
            str(tmp_path / "sgd"),
            "--labels",
            "kfac",
            "sgd",
            "--x",
            "time",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_directory_without_metrics_is_a_clear_error(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/plot_runs.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "metrics.jsonl does not exist" in result.stderr
