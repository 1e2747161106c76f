"""Composing and running BERT configurations in tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from kfac_train.cli import normalise_argv
from kfac_train.config import RunConfig, to_run_config
from kfac_train.hydra_setup import register_configs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def compose_run(*overrides: str) -> RunConfig:
    """The typed configuration of ``python train.py <overrides>``."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=normalise_argv(list(overrides)))
    return to_run_config(cfg)
