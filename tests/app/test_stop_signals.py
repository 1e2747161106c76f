"""Stop signals are agreed by all ranks at every step (whatever trainer.log_every is), and a
torchrun agent passes SIGUSR1 on to its workers, which checkpoint and requeue the job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

from kfac_train.engine.signals import CONTINUE, REQUEUE, STOP, StopAgreement, StopRequest, stop_code
from tests.kfac.dist_utils import run_distributed

from .conftest import FAST, REPO


def test_stop_codes_rank_time_limit_below_cancel():
    assert stop_code(None) == CONTINUE
    assert stop_code(signal.SIGUSR1) == stop_code(signal.SIGUSR2) == REQUEUE
    assert stop_code(signal.SIGTERM) == STOP
    request = StopRequest()
    with request:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a later cancel wins over the time-limit warning
        os.kill(os.getpid(), signal.SIGUSR2)
    assert request.signal_number == signal.SIGTERM and request.code == STOP


def _poll_steps(signals: dict[int, tuple[int, int]], steps: int) -> list[int]:
    """Every rank polls once per 'step'; rank r sets code c just after step s (signals[r])."""
    rank = dist.get_rank()
    request = StopRequest()
    agreement = StopAgreement(request, distributed=True)
    seen = []
    for step in range(1, steps + 1):
        if rank in signals and step == signals[rank][0]:
            request.signal_number = signals[rank][1]  # as the handler does
        seen.append(agreement.poll())
    agreement.close()
    return seen


def test_ranks_agree_on_the_stop_step_one_step_after_the_signal_was_seen():
    # rank 1 gets SIGUSR1 during step 3 (its flag is set at boundary 3); rank 0 gets nothing
    seen = run_distributed(_poll_steps, 2, {1: (3, signal.SIGUSR1)}, 6, timeout=60)
    assert seen[0] == seen[1] == [0, 0, 0, REQUEUE, REQUEUE, REQUEUE]
    # both ranks signalled, differently and at different steps: they agree on the max code
    seen = run_distributed(
        _poll_steps, 2, {0: (2, signal.SIGUSR1), 1: (4, signal.SIGTERM)}, 6, timeout=60
    )
    assert seen[0] == seen[1] == [0, 0, REQUEUE, REQUEUE, STOP, STOP]


def test_a_torchrun_agent_passes_sigusr1_to_its_workers_which_checkpoint_and_requeue(
    tmp_path: Path,
):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    scontrol.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
        SLURM_JOB_ID="77",
        SLURM_STEP_ID="0",
    )
    # trainer.log_every=1000: the stop flag must be polled every step, not every log_every
    run = [
        *FAST,
        "trainer.max_steps=2000",
        "trainer.log_every=1000",
        "checkpoint.every=5",
        "checkpoint.resume=auto",  # what the Slurm scripts pass: requeueing needs it
        "model.batch_norm=false",
        "trainer.micro_batch=32",
    ]
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "--shutdown-timeout=120",
            str(REPO / "train.py"),
            *run,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = tmp_path / "outputs/slurm-77.0"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints/step_00000005.pt").exists():
        assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()[0]
        time.sleep(0.05)
    agent.send_signal(signal.SIGUSR1)  # what Slurm's --signal=USR1@180 sends to the task
    output, _ = agent.communicate(timeout=240)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted", output[-3000:]
    assert summary["stop_request"] == "requeue" and summary["replicas_agree"] is True
    assert 5 <= summary["steps"] < 2000
    assert (run_dir / f"checkpoints/step_{summary['steps']:08d}.pt").exists()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "77"]
