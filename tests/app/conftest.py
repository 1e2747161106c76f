"""Fixtures of the application tests: config composition and fast run settings."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from kfac_train.hydra_setup import register_configs

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"

# Small, quiet, single-threaded runs (the CI machine has 2 shared cores).
FAST = ["logger.progress=off", "trainer.cpu_threads=1"]


def compose_with_choices(overrides: list[str]) -> tuple[DictConfig, dict[str, str]]:
    """The config `python train.py <overrides>` would run, and the option chosen per group."""
    register_configs()
    from kfac_train.cli import normalise_argv

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=normalise_argv(overrides), return_hydra_config=True)
    with open_dict(cfg):
        choices = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
        del cfg["hydra"]
    return cfg, choices


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `python train.py <overrides>` would run (without Hydra's own node)."""
    return compose_with_choices(overrides)[0]


@pytest.fixture
def compose_cfg() -> Callable[[list[str]], DictConfig]:
    return compose_config


@pytest.fixture(autouse=True)
def restore_torch_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def run_cli(
    args: list[str], cwd: Path, timeout: float = 300, **kwargs
) -> subprocess.CompletedProcess:
    """Run ``python train.py <args>`` in `cwd`; returns the completed process (text output)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
