"""The launch helper `kfac_train.distributed`: torchrun and Slurm environments, real gloo init."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kfac_train.distributed import expand_nodelist, init_distributed, launcher_env

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARIABLES = (
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_ID",
)
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_VARIABLES + SLURM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("gpu[08-10],cpu5", ["gpu08", "gpu09", "gpu10", "cpu5"]),
        ("login1", ["login1"]),
        ("rack-a[1-2],rack-b[9]", ["rack-a1", "rack-a2", "rack-b9"]),
        ("n[7],m[001-002]", ["n7", "m001", "m002"]),
        ("a[8-10],b2", ["a8", "a9", "a10", "b2"]),
        ("c[098-100]", ["c098", "c099", "c100"]),
    ],
)
def test_slurm_node_lists_expand_to_host_names_in_order(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


def test_slurm_tasks_become_ranks_with_the_first_node_as_master(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("SLURM_PROCID", "5")
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_LOCALID", "1")
    clean_env.setenv("SLURM_JOB_NODELIST", "node[03-04,07]")
    clean_env.setenv("SLURM_JOB_ID", "123456")
    assert launcher_env() == {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "node03",
        "MASTER_PORT": str(29500 + 123456 % 1000),
    }


def test_an_explicit_master_port_overrides_the_job_derived_one(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    clean_env.setenv("SLURM_JOB_NODELIST", "node[01-02]")
    clean_env.setenv("MASTER_PORT", "31000")
    variables = launcher_env()
    assert variables is not None
    assert variables["MASTER_PORT"] == "31000"
    assert variables["LOCAL_RANK"] == "0"


def test_torchrun_variables_win_over_slurm_ones(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29999",
    }.items():
        clean_env.setenv(name, value)
    assert launcher_env() == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "3",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29999",
    }


def test_a_single_slurm_task_or_no_launcher_means_a_single_process(
    clean_env: pytest.MonkeyPatch,
) -> None:
    assert launcher_env() is None
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "1")
    clean_env.setenv("SLURM_JOB_NODELIST", "node01")
    assert launcher_env() is None
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank, info.is_distributed) == (0, 1, 0, False)
    assert info.device.type == "cpu"


_SLURM_RANK_SCRIPT = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from kfac_train.distributed import init_distributed, teardown
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    total = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(total)
    print(info.rank, info.world_size, info.local_rank, info.device.type, int(total.item()),
          dist.get_backend())
    teardown()
    print("initialised after teardown:", dist.is_initialized())
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_slurm_tasks_initialise_a_real_gloo_group_and_tear_it_down() -> None:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES + SLURM_VARIABLES}
    env.update(
        SLURM_NTASKS="2",
        SLURM_JOB_NODELIST="localhost",
        SLURM_JOB_ID="42",
        MASTER_PORT=str(_free_port()),
        PYTHONPATH=str(REPO_ROOT),
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _SLURM_RANK_SCRIPT],
            env={**env, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = []
    try:
        for rank, process in enumerate(processes):
            stdout, stderr = process.communicate(timeout=60)
            assert process.returncode == 0, f"rank {rank} failed:\n{stderr}"
            outputs.append(stdout.splitlines())
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert outputs[0][0] == "0 2 0 cpu 3 gloo"
    assert outputs[1][0] == "1 2 1 cpu 3 gloo"
    assert all(lines[1] == "initialised after teardown: False" for lines in outputs)
