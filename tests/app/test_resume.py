"""SIGTERM (Slurm preemption) checkpoints and exits cleanly; resuming gives the same model,
bit for bit, as a run that was never interrupted (CPU, K-FAC, augmentation on)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from kfac_train.app import train
from kfac_train.engine.checkpoint import list_checkpoints
from kfac_train.engine.outputs import read_metrics

from .conftest import FAST, REPO, compose_config

RUN = [*FAST, "trainer.max_steps=150", "trainer.log_every=5", "seed=3"]


def wait_for_step(metrics: Path, step: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        if metrics.exists():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
            if steps and max(steps) >= step:
                return
        time.sleep(0.05)
    raise TimeoutError(f"the run did not reach step {step} in {timeout} s")


def test_a_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path):
    uninterrupted = train(compose_config([*RUN, f"output_dir={tmp_path / 'a'}"]))

    run_dir = tmp_path / "b"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *RUN, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_step(run_dir / "metrics.jsonl", 20, process, timeout=240)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["status"] == "preempted"
    assert 20 <= interrupted["steps"] < 150
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert newest.name == f"step_{interrupted['steps']:08d}.pt"

    resumed = train(compose_config([*RUN, f"output_dir={run_dir}", "checkpoint.resume=auto"]))
    assert resumed["status"] == "completed" and resumed["steps"] == 150

    final_a = torch.load(tmp_path / "a/checkpoints/step_00000150.pt", weights_only=True)
    final_b = torch.load(run_dir / "checkpoints/step_00000150.pt", weights_only=True)
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name
    assert resumed["metrics"] == uninterrupted["metrics"]
    # metrics.jsonl: no step logged twice, and the same evaluations at the same steps
    resumed_log = read_metrics(run_dir / "metrics.jsonl")
    original_log = read_metrics(tmp_path / "a" / "metrics.jsonl")
    train_steps = [r["step"] for r in resumed_log if r["kind"] == "train"]
    assert train_steps == sorted(set(train_steps))
    evaluations = [
        [(r["step"], r["metrics"]) for r in log if r["kind"] == "eval"]
        for log in (resumed_log, original_log)
    ]
    assert evaluations[0] == evaluations[1]
