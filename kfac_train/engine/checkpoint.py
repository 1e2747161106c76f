"""Checkpoint files: their layout, atomic writes, lineages, pruning, resume choice, RNG states.

This module owns the checkpoint layout: `build_checkpoint` makes the dict that is written and
`parse_checkpoint` reads it back; nothing else indexes a checkpoint. A checkpoint is a dict of
tensors and plain Python values (no pickled objects), so it loads with
``torch.load(weights_only=True)``:

    meta: {"format": 2, "step", "lineage", "parent": {"lineage", "step"} or None,
           "written": Unix time of the write, "preconditioner": "kfac" | "none",
           "optimizer": the base optimizer (optim.base)}
    model, optimizer, preconditioner, scaler: state dicts
    position: {"step", "epoch", "batches" (micro-batches consumed in the epoch), "samples",
               "elapsed" (seconds trained), "target" (time/steps to target or None)}
    rng: one entry per rank: {"torch", "cuda", "numpy", "python"}
    config: the resolved config as YAML text (informative)

(Checkpoints of format 1, without `meta`, still load: their step comes from `position`.)

A checkpoint's identity (step, lineage) comes from its contents, never from its file name: any
file can be resumed.

Lineages. Every checkpoint records the lineage (a random id) of the run that wrote it. A fresh
run starts a new lineage; resuming the newest checkpoint of a lineage continues it; resuming an
older one (a rollback, e.g. step 240 while step 260 of the same lineage is in the directory)
starts a new lineage whose parent is the checkpoint resumed. Pruning (`checkpoint.keep_last`)
only ever deletes older checkpoints of the run's own lineage, so rollbacks and fresh starts in
a used directory never delete anything they did not write. The first lineage of a directory
writes ``step_<n>.pt``, later ones ``step_<n>-<lineage>.pt`` (so an unreadable file's lineage
is known from its name).

``checkpoint.resume=auto`` continues the lineage written last: the newest checkpoint (by the
write time stored in it) decides the lineage; its checkpoints are tried newest step first, then
those of its parent lineage up to the step it branched from. Each candidate is loaded in full
(``weights_only=True``); an unreadable one (truncated, corrupt) is skipped with a warning. Auto
refuses (one line) when nothing is readable, or when an unreadable file newer than the choice
belongs to a lineage outside that chain (it would continue an abandoned run).
"""

from __future__ import annotations

import logging
import os
import random
import re
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kfac_train.errors import UserError

log = logging.getLogger("kfac_train")

FORMAT = 2
STEP_FILE = re.compile(r"^step_(\d+)(?:-([0-9a-f]+))?\.pt$")
TEMPORARY_FILE = re.compile(r"^\.step_\d+(?:-[0-9a-f]+)?\.pt\..*\.tmp$")
REQUIRED = ("model", "optimizer", "preconditioner", "position", "rng")


@dataclass
class Position:
    """Where training stands; saved in checkpoints.

    `batches` counts micro-batches consumed in the current `epoch` on each rank.
    `elapsed` is the training wall time in seconds over all sessions of this run.
    """

    step: int = 0
    epoch: int = 0
    batches: int = 0
    samples: int = 0
    elapsed: float = 0.0
    target: dict[str, Any] | None = None


@dataclass(frozen=True)
class CheckpointInfo:
    """What identifies a checkpoint file (its `meta`), read without loading its tensors.

    `parent` is ``(lineage, step)`` of the checkpoint a rolled-back lineage started from.
    `written` is the Unix time of the write (the file's mtime for format-1 checkpoints).
    """

    path: Path
    step: int
    lineage: str
    parent: tuple[str, int] | None
    written: float
    preconditioner: str
    optimizer: str | None


@dataclass
class Checkpoint:
    """A parsed checkpoint (tensors on the CPU)."""

    info: CheckpointInfo
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    preconditioner: dict[str, Any]
    scaler: dict[str, Any]
    position: Position
    rng: list[dict[str, Any]]


# ----------------------------------------------------------------------------- layout
def new_lineage() -> str:
    """A fresh lineage id (12 hex digits)."""
    return uuid.uuid4().hex[:12]


def build_checkpoint(
    *,
    model: dict[str, Any],
    optimizer: dict[str, Any],
    preconditioner: dict[str, Any],
    scaler: dict[str, Any],
    position: Position,
    rng: list[dict[str, Any]],
    lineage: str,
    parent: tuple[str, int] | None,
    preconditioner_kind: str,
    optimizer_name: str,
    config_yaml: str,
) -> dict[str, Any]:
    """The dict written to a checkpoint file (layout in the module docstring)."""
    return {
        "meta": {
            "format": FORMAT,
            "step": position.step,
            "lineage": lineage,
            "parent": {"lineage": parent[0], "step": parent[1]} if parent else None,
            "written": time.time(),
            "preconditioner": preconditioner_kind,
            "optimizer": optimizer_name,
        },
        "model": model,
        "optimizer": optimizer,
        "preconditioner": preconditioner,
        "scaler": scaler,
        "position": {
            "step": position.step,
            "epoch": position.epoch,
            "batches": position.batches,
            "samples": position.samples,
            "elapsed": position.elapsed,
            "target": position.target,
        },
        "rng": rng,
        "config": config_yaml,
    }


def _info(state: dict[str, Any], path: Path) -> CheckpointInfo:
    meta = state.get("meta")
    if meta is None:  # format 1
        kind = "kfac" if "layers" in state["preconditioner"] else "none"
        return CheckpointInfo(
            path, int(state["position"]["step"]), "", None, path.stat().st_mtime, kind, None
        )
    parent = meta.get("parent")
    return CheckpointInfo(
        path=path,
        step=int(meta["step"]),
        lineage=str(meta["lineage"]),
        parent=(str(parent["lineage"]), int(parent["step"])) if parent else None,
        written=float(meta["written"]),
        preconditioner=str(meta["preconditioner"]),
        optimizer=meta.get("optimizer"),
    )


def parse_checkpoint(state: Any, path: Path) -> Checkpoint:
    """The `Checkpoint` of a loaded dict; `UserError` if it is not a kfac-train checkpoint."""
    if not isinstance(state, dict) or not set(REQUIRED) <= state.keys():
        missing = [k for k in REQUIRED if not isinstance(state, dict) or k not in state]
        raise UserError(f"{path} is not a kfac-train checkpoint (missing {', '.join(missing)})")
    position = state["position"]
    return Checkpoint(
        info=_info(state, path),
        model=state["model"],
        optimizer=state["optimizer"],
        preconditioner=state["preconditioner"],
        scaler=state.get("scaler", {}),
        position=Position(
            step=int(position["step"]),
            epoch=int(position["epoch"]),
            batches=int(position["batches"]),
            samples=int(position["samples"]),
            elapsed=float(position["elapsed"]),
            target=position.get("target"),
        ),
        rng=state["rng"],
    )


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and parse a checkpoint with ``weights_only=True``; `UserError` if it is unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"cannot read checkpoint {path}: corrupt, truncated or not a weights-only torch file "
            f"({type(error).__name__}); give another checkpoint.resume"
        ) from error
    return parse_checkpoint(state, path)


def read_info(path: Path) -> CheckpointInfo | None:
    """The `CheckpointInfo` of `path` (tensors memory-mapped, not read); None if unreadable."""
    for mmap in (True, False):  # a plain read where the file system cannot map files
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            return parse_checkpoint(state, path).info
        except Exception:
            continue
    return None


def model_mismatch(
    expected: dict[str, torch.Tensor], saved: dict[str, Any], shown: int = 3
) -> str | None:
    """What keeps `saved` from loading into a model whose state dict is `expected`, in one
    line (counts and the first `shown` names of each kind), or None when it fits."""

    def listing(label: str, names: list[str]) -> str:
        more = ", ..." if len(names) > shown else ""
        return f"{len(names)} {label} ({', '.join(names[:shown])}{more})"

    missing = [name for name in expected if name not in saved]
    unexpected = [name for name in saved if name not in expected]
    shapes = [
        f"{name} saved {tuple(saved[name].shape)} vs model {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if isinstance(saved.get(name), torch.Tensor) and saved[name].shape != tensor.shape
    ]
    parts = [
        listing(label, names)
        for label, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if names
    ]
    return "; ".join(parts) or None


# ----------------------------------------------------------------------------- files
def checkpoint_path(directory: Path, step: int, lineage: str | None = None) -> Path:
    """``step_<n>.pt``, or ``step_<n>-<lineage>.pt`` when given a lineage."""
    suffix = f"-{lineage}" if lineage else ""
    return directory / f"step_{step:08d}{suffix}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files (``step_<n>[-<lineage>].pt``) in `directory`, by the step in the name.

    Names only sort the listing; what a file holds is read with `read_info`.
    """
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p.name, p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))
    ]
    return [path for _, _, path in sorted(found)]


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


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that were killed; returns them.

    Call before this run writes anything (a live write's temporary file looks the same).
    """
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if TEMPORARY_FILE.match(p.name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element of every floating-point tensor is finite.

    One fused max-abs reduction per dtype (``torch._foreach_norm`` with ord=inf: NaN and ±inf
    propagate, finite values cannot overflow), then a single host sync.
    """
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.is_floating_point() and tensor.numel() > 0:
            groups.setdefault((tensor.dtype, tensor.device), []).append(tensor.detach())
    if not groups:
        return True
    maxima = [
        torch.stack(torch._foreach_norm(group, float("inf"))).float().amax().to("cpu")
        for group in groups.values()
    ]
    return bool(torch.stack(maxima).isfinite().all())


def state_tensors(state: Any) -> Iterable[torch.Tensor]:
    """The tensors inside nested dicts/lists of a state dict."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from state_tensors(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from state_tensors(value)


# ----------------------------------------------------------------------------- lineages
class CheckpointDirectory:
    """The checkpoints of one run, in `directory`: lineage, names, pruning, resume choice.

    Names: the first lineage of a directory writes ``step_<n>.pt``; every later one (a
    rollback, a fresh start in a used directory) writes ``step_<n>-<lineage>.pt``, so the
    lineage of a file that cannot be read is still known from its name.
    Only rank 0 uses one for writing; every rank may use `choose_resume` (read-only).
    """

    def __init__(self, directory: Path, keep_last: int) -> None:
        self.directory = directory
        self.keep_last = keep_last
        self.lineage = new_lineage()
        self.parent: tuple[str, int] | None = None
        self.suffixed = False  # whether this lineage's names carry its id
        self.own: dict[Path, int] = {}  # this lineage's files in `directory` -> step

    def scan(self) -> tuple[list[CheckpointInfo], list[Path]]:
        """Readable checkpoints of the directory, and the files whose header is unreadable."""
        infos, unreadable = [], []
        for path in list_checkpoints(self.directory):
            info = read_info(path)
            if info is None:
                unreadable.append(path)
            else:
                infos.append(info)
        return infos, unreadable

    # ------------------------------------------------------------------------- resume
    def choose_resume(self, resume: str | None) -> Checkpoint | None:
        """The checkpoint to resume: None (start fresh), "auto" or a path; loaded in full."""
        if resume is None or resume == "":
            return None
        if resume != "auto":
            path = Path(os.path.expanduser(resume))
            if not path.is_file():
                raise UserError(
                    f"checkpoint.resume={resume} does not exist: give a checkpoint file or auto"
                )
            return load_checkpoint(path)
        infos, unreadable = self.scan()
        for path in unreadable:
            log.warning("checkpoint %s is unreadable (truncated or corrupt): skipped", path)
        candidates = auto_candidates(infos)
        chain = {info.lineage for info in candidates}
        plain = plain_lineage(infos)
        failed: list[Path] = []
        for info in candidates:
            try:
                checkpoint = load_checkpoint(info.path)
            except UserError as error:
                log.warning("%s: trying an older checkpoint", error)
                failed.append(info.path)
                continue
            written = info.path.stat().st_mtime
            foreign = [
                p
                for p in unreadable
                if p.stat().st_mtime > written and lineage_of_name(p, plain) not in chain
            ]
            if foreign:
                raise UserError(
                    f"checkpoint.resume=auto: the newest checkpoint {foreign[-1]} is unreadable "
                    f"and belongs to another run than {info.path.name}, which auto would "
                    "continue instead: give checkpoint.resume=/path/to/the/checkpoint to resume"
                )
            if unreadable or failed:
                log.warning(
                    "checkpoint.resume=auto: resuming %s (step %d) instead of the newest, "
                    "unreadable %s",
                    info.path,
                    info.step,
                    ", ".join(p.name for p in [*unreadable, *failed]),
                )
            return checkpoint
        if unreadable or failed:
            raise UserError(
                f"checkpoint.resume=auto: no readable checkpoint in {self.directory} "
                f"({', '.join(p.name for p in [*unreadable, *failed])} unreadable): remove them "
                "to start fresh, or give checkpoint.resume=/path/to/a/good/checkpoint"
            )
        return None

    def adopt(self, info: CheckpointInfo | None) -> str:
        """Decide this run's lineage after resuming `info` (None: a fresh start).

        Continues `info`'s lineage unless the directory holds a newer checkpoint of it, in
        which case a new lineage starts (a rollback) and nothing of the old one is ever pruned.
        Rollbacks and fresh starts in a directory holding checkpoints log a warning; returns a
        sentence describing the decision.
        """
        infos, _ = self.scan()
        used = bool(list_checkpoints(self.directory))
        if info is None:
            self.suffixed = used
            if used:
                log.warning(
                    "%d checkpoint files of earlier runs in %s are kept; this run starts a new "
                    "lineage, which checkpoint.resume=auto will continue",
                    len(list_checkpoints(self.directory)),
                    self.directory,
                )
            return f"new checkpoint lineage {self.lineage}"
        newer = sorted(i.step for i in infos if i.lineage == info.lineage and i.step > info.step)
        if newer:
            self.parent = (info.lineage, info.step)
            self.suffixed = True
            log.warning(
                "rolled back to step %d of a run that reached step %d: its newer checkpoints "
                "(steps %s) are kept, this run starts a new lineage, which "
                "checkpoint.resume=auto will continue",
                info.step,
                newer[-1],
                ", ".join(map(str, newer)),
            )
            return f"new checkpoint lineage {self.lineage} from step {info.step}"
        self.lineage = info.lineage
        self.parent = info.parent
        self.own = {i.path: i.step for i in infos if i.lineage == info.lineage}
        if self.own:
            self.suffixed = all(_suffix(p) is not None for p in self.own)
        else:
            self.suffixed = used
        return f"continuing checkpoint lineage {self.lineage or '(format 1)'}"

    # ------------------------------------------------------------------------- writing
    def path_for(self, step: int) -> Path:
        """This lineage's name for step `step` (see the class docstring)."""
        plain = checkpoint_path(self.directory, step)
        if not self.suffixed and (plain in self.own or not plain.exists()):
            return plain
        return checkpoint_path(self.directory, step, self.lineage or LEGACY_SUFFIX)

    def write(self, state: dict[str, Any], step: int) -> Path:
        """Write `state` (of step `step`, this lineage) and prune this lineage's older files."""
        path = self.path_for(step)
        save_atomic(state, path)
        self.own[path] = step
        self.prune(keep=path)
        return path

    def prune(self, keep: Path) -> None:
        """Delete all but the newest `keep_last` checkpoints of this lineage (<= 0 keeps all)."""
        if self.keep_last <= 0:
            return
        ordered = sorted(self.own, key=lambda p: (self.own[p], p == keep))
        for old in ordered[: -self.keep_last]:
            if old != keep:
                old.unlink(missing_ok=True)
                del self.own[old]


LEGACY_SUFFIX = "0"  # the name suffix of lineage "" (format-1 checkpoints), if ever needed


def _suffix(path: Path) -> str | None:
    match = STEP_FILE.match(path.name)
    return match.group(2) if match else None


def plain_lineage(infos: list[CheckpointInfo]) -> str | None:
    """The lineage of the plain ``step_<n>.pt`` files, if they agree on one."""
    lineages = {info.lineage for info in infos if _suffix(info.path) is None}
    return lineages.pop() if len(lineages) == 1 else None


def lineage_of_name(path: Path, plain: str | None) -> str | None:
    """The lineage a checkpoint file's name says it belongs to (None: unknown)."""
    suffix = _suffix(path)
    if suffix is None:
        return plain
    return "" if suffix == LEGACY_SUFFIX else suffix


def auto_candidates(infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
    """What ``resume=auto`` tries, in order: the lineage written last, newest step first, then
    its parent lineage up to the step it branched from, and so on."""
    if not infos:
        return []
    newest = max(infos, key=lambda i: (i.written, i.step))
    ordered: list[CheckpointInfo] = []
    lineage: str | None = newest.lineage
    limit = max(i.step for i in infos)
    seen: set[str] = set()
    while lineage is not None and lineage not in seen:
        seen.add(lineage)
        members = [i for i in infos if i.lineage == lineage and i.step <= limit]
        members.sort(key=lambda i: (i.step, i.written), reverse=True)
        ordered += members
        parent = next((i.parent for i in members if i.parent is not None), None)
        lineage, limit = parent if parent else (None, 0)
    return ordered


# ----------------------------------------------------------------------------- RNG
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
