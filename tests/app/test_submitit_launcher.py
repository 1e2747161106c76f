"""conf/hydra/launcher/kfac_slurm.yaml composes into a submitit Slurm launcher that allows
requeues, and the signal submitit sends makes the run checkpoint before submitit requeues it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from hydra import compose, initialize_config_dir
from submitit.slurm.slurm import SlurmJobEnvironment, _make_sbatch_string

from kfac_train.app import train
from kfac_train.cli import normalise_argv
from kfac_train.engine.signals import REQUEUE_SIGNALS, requeue_after_stop
from kfac_train.hydra_setup import register_configs

from .conftest import CONF, FAST, compose_config


def launcher_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=normalise_argv(["hydra/launcher=kfac_slurm", *overrides]),
            return_hydra_config=True,
        )
    return cfg.hydra.launcher


def test_the_launcher_config_asks_for_a_long_job_a_warning_signal_and_requeues():
    launcher = launcher_config("hydra.launcher.nodes=4")
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.nodes == 4 and launcher.tasks_per_node == launcher.gpus_per_node == 8
    assert launcher.timeout_min == 1440 and launcher.max_num_timeout > 0
    sbatch = _make_sbatch_string(
        command="python -m submitit.core._submit",
        folder="/tmp/x",
        time=launcher.timeout_min,
        signal_delay_s=launcher.signal_delay_s,
        additional_parameters=dict(launcher.additional_parameters),
    )
    assert "#SBATCH --signal=USR2@300" in sbatch and "#SBATCH --open-mode=append" in sbatch
    # the signal submitit asks for is one the run checkpoints on and then requeues
    assert getattr(signal, f"SIG{SlurmJobEnvironment.USR_SIG}") in REQUEUE_SIGNALS


def test_requeueing_hands_the_signal_to_the_launchers_handler_only_for_resumable_runs():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda number, frame: calls.append(number))
    try:
        assert requeue_after_stop(signal.SIGUSR2, resume=None, env={}) == "not resumable"
        assert calls == []
        assert requeue_after_stop(signal.SIGUSR2, resume="auto", env={}) == "handler"
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_submitits_signal_checkpoints_the_run_before_submitits_handler_requeues_it(tmp_path):
    """Submitit installs its SIGUSR2 handler before calling the job; ours takes over during
    training and hands the signal back once the checkpoint and summary are written."""
    seen = []

    def submitit_handler(number: int, frame) -> None:  # stands in for submitit's requeue
        seen.append(json.loads((tmp_path / "summary.json").read_text()))

    def signal_at_step_3() -> None:
        metrics = tmp_path / "metrics.jsonl"
        while not (metrics.exists() and '"step": 3,' in metrics.read_text()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)

    run = [*FAST, "trainer.max_steps=200", "trainer.log_every=1", f"output_dir={tmp_path}"]
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        threading.Thread(target=signal_at_step_3, daemon=True).start()
        summary = train(compose_config([*run, "checkpoint.resume=auto"]))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert summary["status"] == "preempted" and summary["stop_request"] == "requeue"
    assert 3 <= summary["steps"] < 200
    assert len(seen) == 1 and seen[0]["status"] == "preempted"
    assert (tmp_path / f"checkpoints/step_{summary['steps']:08d}.pt").exists()
    resumed = train(compose_config([*run, "checkpoint.resume=auto"]))  # the requeued job
    assert resumed["status"] == "completed" and resumed["steps"] == 200
