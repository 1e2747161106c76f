"""scripts/compare_runs.py prints one markdown row per run directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import FAST, REPO

SCRIPT = str(REPO / "scripts/compare_runs.py")


def write_run(
    run_dir: Path,
    *,
    optim: str,
    preconditioner: str,
    lr: float,
    evals: list[float],
    train_time: float,
    target_time: float | None,
) -> None:
    """A run directory shaped like train.py's outputs."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(
        f"model:\n  name: small_cnn\noptim:\n  preconditioner: {preconditioner}\n"
        f"  base: {optim}\n  lr: {lr}\n"
    )
    records = [
        {
            "kind": "train",
            "step": 10 * (i + 1),
            "loss": 1.0,
            "samples_per_s": 1000.0 + i,
            "metrics": {},
        }
        for i in range(len(evals))
    ]
    records += [
        {"kind": "eval", "step": 10 * (i + 1), "metrics": {"top1": v}} for i, v in enumerate(evals)
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    target = None if target_time is None else {"metric": "top1", "steps": 20, "time": target_time}
    (run_dir / "summary.json").write_text(
        json.dumps(
            {
                "status": "completed",
                "steps": 30,
                "train_time": train_time,
                "global_batch": 64,
                "metrics": {"top1": evals[-1]},
                "target": target,
            }
        )
    )


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120
    )


def test_rows_show_optimizer_best_metric_and_time_ratio_to_the_fastest_run(tmp_path: Path):
    write_run(
        tmp_path / "kfac",
        optim="sgd",
        preconditioner="kfac",
        lr=0.05,
        evals=[0.9, 0.97, 0.96],
        train_time=12.0,
        target_time=4.0,
    )
    write_run(
        tmp_path / "sgd",
        optim="sgd",
        preconditioner="none",
        lr=0.1,
        evals=[0.8, 0.9, 0.95],
        train_time=10.0,
        target_time=8.0,
    )
    result = run_script(str(tmp_path / "kfac"), str(tmp_path / "sgd"), "--sort", "best")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| run | model | optimizer |")
    assert len(lines) == 4  # header, rule, two runs
    kfac, sgd = (line.split(" | ") for line in lines[2:])
    assert kfac[0] == "| kfac" and kfac[2] == "kfac+sgd" and sgd[2] == "sgd"
    header = lines[0].split(" | ")
    best, ratio = header.index("best top1"), header.index("time ×")
    assert kfac[best] == "0.97" and sgd[best] == "0.95"
    assert kfac[ratio] == "1.00" and sgd[ratio] == "2.00"  # time to target 4 s vs 8 s
    assert "1,001 samples/s" in lines[2]


def test_an_unreadable_run_is_skipped_with_a_message_and_none_readable_exits_1(tmp_path: Path):
    write_run(
        tmp_path / "ok",
        optim="adam",
        preconditioner="none",
        lr=1e-3,
        evals=[0.5],
        train_time=1.0,
        target_time=None,
    )
    (tmp_path / "empty").mkdir()
    result = run_script(str(tmp_path / "ok"), str(tmp_path / "empty"))
    assert result.returncode == 0
    assert "skipped" in result.stderr and "summary.json does not exist" in result.stderr
    assert len(result.stdout.strip().splitlines()) == 3
    assert run_script(str(tmp_path / "empty")).returncode == 1


def test_a_real_train_run_is_tabulated(tmp_path: Path):
    run_dir = tmp_path / "run"
    train = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *FAST,
            "trainer.max_steps=4",
            f"hydra.run.dir={run_dir}",
            "checkpoint.at_end=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert train.returncode == 0, train.stderr[-2000:]
    result = run_script(str(run_dir))
    assert result.returncode == 0, result.stderr
    row = result.stdout.strip().splitlines()[2].split(" | ")
    assert row[1:3] == ["small_cnn", "kfac+sgd"] and row[6] == "4"
