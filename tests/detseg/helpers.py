"""Composing and running detection / segmentation configurations in tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from kfac_train.cli import normalise_argv
from kfac_train.config import RunConfig, to_run_config
from kfac_train.hydra_setup import register_configs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# quiet, small-footprint runs (the CI machine has 2 shared cores)
QUIET = ("logger.progress=off", "trainer.cpu_threads=1")


def compose_run(*overrides: str) -> RunConfig:
    """The typed configuration of ``python train.py <overrides>``."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=normalise_argv(list(overrides)))
    return to_run_config(cfg)


def records(run_dir: Path, kind: str) -> list[dict]:
    """The metrics.jsonl records of one kind ("train" or "eval") of a run."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


class ReplayDetector(nn.Module):
    """Returns queued per-image predictions in order (a stand-in for a trained Mask R-CNN)."""

    def __init__(self, predictions: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.queue = list(predictions)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [self.queue.pop(0) for _ in images]
