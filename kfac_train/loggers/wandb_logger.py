"""Weights & Biases logging (optional; offline by default, never required)."""

from __future__ import annotations

import hashlib
import os
from typing import Any

from kfac_train.config import LoggerConfig
from kfac_train.errors import UserError
from kfac_train.loggers.console import ConsoleLogger
from kfac_train.registry import LOGGERS

WANDB_MODES = ("offline", "online", "disabled")


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"metrics": {"top1": 1}} → {"metrics/top1": 1}."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def run_id(run_dir: str) -> str:
    """A W&B run id that is a function of the run directory: the same after every requeue."""
    return hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:16]


class WandbLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: str, config: dict[str, Any]) -> None:
        if cfg.wandb_mode not in WANDB_MODES:
            raise UserError(f"logger.wandb_mode={cfg.wandb_mode!r}: choose one of {WANDB_MODES}")
        import wandb

        self.run = wandb.init(
            project=cfg.wandb_project,
            entity=cfg.wandb_entity,
            mode=cfg.wandb_mode,
            dir=os.environ.get("WANDB_DIR", run_dir),
            config=config,
            tags=list(cfg.wandb_tags),
            name=os.path.basename(os.path.normpath(run_dir)),
            id=run_id(run_dir),
            resume="allow",  # a requeued or resumed run continues its W&B run
        )

    def on_step(self, step: int) -> None:
        """W&B gets records, not per-step ticks."""

    def log(self, record: dict[str, Any]) -> None:
        """Train records as ``train/<key>`` (metrics flattened), eval metrics as ``eval/<name>``."""
        prefix = "eval" if record.get("kind") == "eval" else "train"
        fields = dict(record.get("metrics", {}))
        fields.update({k: v for k, v in record.items() if k not in ("metrics", "kind", "step")})
        values = {k: v for k, v in flatten(fields).items() if isinstance(v, (int, float))}
        self.run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=record["step"])

    def message(self, text: str) -> None:
        """Messages stay on the console."""

    def close(self, summary: dict[str, Any]) -> None:
        for key, value in flatten(summary).items():
            if isinstance(value, (int, float, str)):
                self.run.summary[key] = value
        self.run.finish()


@LOGGERS.register("wandb")
def build_wandb(
    cfg: LoggerConfig, run_dir: str, config: dict[str, Any], total_steps: int
) -> list[Any]:
    return [ConsoleLogger(cfg.progress, total_steps), WandbLogger(cfg, run_dir, config)]
