"""Console progress: a tqdm bar on a terminal, periodic plain lines otherwise (Slurm logs).

Lines and messages go through Python logging (logger ``kfac_train``), which Hydra sends to the
terminal and to the run's train.log.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from kfac_train.config import LoggerConfig
from kfac_train.errors import UserError
from kfac_train.registry import LOGGERS

log = logging.getLogger("kfac_train")

MODES = ("auto", "bar", "lines", "off")


def format_record(record: dict[str, Any]) -> str:
    """``step 120/500 | epoch 1.85 | loss 0.312 | lr 0.0912 | top1 0.94 | 0.011 s/step |
    5818 samples/s | mem 3.20 GiB | ETA 4s`` (memory on CUDA only)."""
    total = f"/{record['total_steps']}" if record.get("total_steps") else ""
    parts = [f"step {record['step']}{total}"]
    parts.append(f"epoch {record['epoch']:.2f}")
    for key in ("loss", "lr"):
        if key in record:
            parts.append(f"{key} {record[key]:.4g}")
    for key, value in record.get("metrics", {}).items():
        parts.append(f"{key} {value:.4g}")
    if "step_time" in record:
        parts.append(f"{record['step_time']:.3g} s/step")
    for key, value in record.items():
        if key.endswith("_per_s"):
            parts.append(f"{value:.4g} {key[: -len('_per_s')]}/s")
    if "peak_memory_gib" in record:
        parts.append(f"mem {record['peak_memory_gib']:.2f} GiB")
    if "eta_s" in record:
        parts.append(f"ETA {format_duration(record['eta_s'])}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    """``42s``, ``7m05s``, ``3h07m``, ``2d04h`` (rounded down)."""
    total = int(max(seconds, 0))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ConsoleLogger:
    def __init__(self, progress: str, total_steps: int) -> None:
        if progress not in MODES:
            raise UserError(f"logger.progress={progress!r}: choose one of {', '.join(MODES)}")
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "lines"
        self.mode = progress
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, leave=True)

    def on_step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "eval":
            text = "eval " + ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items())
            self.message(f"step {record['step']} {text}")
        elif self.bar is not None:
            postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.3g}"}
            self.bar.set_postfix(postfix, refresh=False)
        elif self.mode == "lines":
            log.info(format_record(record))

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.clear()
            log.info(text)
            self.bar.refresh()
        elif self.mode != "off":
            log.info(text)

    def close(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@LOGGERS.register("console")
def build_console(
    cfg: LoggerConfig, run_dir: str, config: dict[str, Any], total_steps: int
) -> list[ConsoleLogger]:
    return [ConsoleLogger(cfg.progress, total_steps)]
