"""Checkpoint files: atomic writes, the last N kept, `weights_only=True` loads, RNG states.

A checkpoint is a dict of tensors and plain Python values (no pickled objects), so it loads with
``torch.load(weights_only=True)``:

    model, optimizer, preconditioner, scaler: state dicts
    schedule: {"step": int}
    position: {"step", "epoch", "batches" (micro-batches consumed in the epoch), "samples"}
    rng: one entry per rank: {"torch", "cuda", "numpy", "python"}
    progress: {"elapsed": seconds trained, "target": time/steps to target or None}
    config: the resolved config as YAML text (informative)
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kfac_train.errors import UserError

STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Step checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return [path for _, path in sorted(found)]


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` via a temporary file in the same directory and `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (keep_last <= 0 keeps all)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(directory)[:-keep_last]:
        old.unlink(missing_ok=True)


def resolve_resume(resume: str | None, directory: Path) -> Path | None:
    """The checkpoint to resume from: None, "auto" (newest in `directory`, if any) or a path."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        found = list_checkpoints(directory)
        return found[-1] if found else None
    path = Path(os.path.expanduser(resume))
    if not path.is_file():
        raise UserError(f"checkpoint.resume={resume} does not exist: give a checkpoint or auto")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; `UserError` if it is unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"cannot read checkpoint {path}: corrupt or not a weights-only torch file "
            f"({type(error).__name__}); give another checkpoint.resume"
        ) from error
    required = {"model", "optimizer", "preconditioner", "position", "rng"}
    if not isinstance(state, dict) or not required <= state.keys():
        missing = sorted(required - set(state)) if isinstance(state, dict) else sorted(required)
        raise UserError(f"{path} is not a kfac-train checkpoint (missing {', '.join(missing)})")
    return state


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (weights_only-loadable)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": [version, list(internal), gauss],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
