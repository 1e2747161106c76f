"""Run a function on several real gloo processes on CPU and collect each rank's result.

`run_distributed(fn, world_size, *args, timeout=...)` spawns `world_size` fresh Python processes,
initialises a gloo process group in each (rendezvous through a `FileStore` in a temporary
directory, so no port is needed), calls `fn(*args)` on every rank and returns the ranks' return
values as a list indexed by rank. Inside `fn`, `torch.distributed.get_rank()` and
`get_world_size()` say where it runs.

It never hangs a test run. Two clocks run: `startup_timeout` from the spawn until every rank has
joined the process group (starting Python and importing torch takes seconds, far more on a loaded
machine), then `timeout` for `fn` itself.
- A rank that raises makes the call fail at once with `DistributedRankError`, naming the rank
  that failed first and showing its traceback (ranks that failed afterwards, typically because a
  peer vanished in the middle of a collective, are listed too).
- A rank that dies without a Python exception (killed, `os._exit`) is reported by exit code.
- When a clock runs out, the ranks still running are sent SIGUSR1 (each worker has
  `faulthandler` registered on it, so it writes the Python stack of every thread), then killed,
  and `DistributedTimeoutError` names them and shows where each one was stuck.

`fn` and `args` must be picklable (module-level functions, tensors, plain data), because the
workers are started with the "spawn" method. Return values travel back through `torch.save` /
`torch.load(weights_only=True)`, so they must be tensors, numbers, strings, bools, None or
lists/tuples/dicts of those.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import multiprocessing
import os
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

#: Environment overrides for running the same tests on a GPU machine (scripts/gpu_check.sh):
#: ``KFAC_TEST_BACKEND`` (``gloo``, or ``nccl``: one GPU per rank) and ``KFAC_TEST_DEVICE``.
BACKEND_ENV = "KFAC_TEST_BACKEND"
DEVICE_ENV = "KFAC_TEST_DEVICE"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_STARTUP_TIMEOUT_S = 120.0
_POLL_INTERVAL_S = 0.05
_PEER_ERROR_GRACE_S = 0.5
_STACK_DUMP_GRACE_S = 2.0
# The process group's own timeout is longer than the harness's, so that a hang is reported by
# the parent (with every stuck rank's stack) rather than as a secondary gloo error in a peer.
_COLLECTIVE_MARGIN_S = 30.0
# Errors a rank sees when a *peer* vanished in the middle of a collective: consequences, not causes.
_PEER_LOSS_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


class DistributedRankError(RuntimeError):
    """A rank raised an exception or exited with a non-zero code."""


class DistributedTimeoutError(TimeoutError):
    """Some ranks were still running when the startup or run timeout expired."""


def chosen_backend() -> str:
    """The process-group backend of the spawned ranks: ``$KFAC_TEST_BACKEND`` or ``gloo``."""
    return os.environ.get(BACKEND_ENV, "gloo")


def chosen_device() -> torch.device:
    """The device tests put models and data on: ``$KFAC_TEST_DEVICE`` or ``cpu``. In a spawned
    rank, ``cuda`` means that rank's GPU (``rank % device_count``)."""
    name = os.environ.get(DEVICE_ENV, "cpu")
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    return torch.device(name)


def _path(run_dir: Path, rank: int, suffix: str) -> Path:
    return run_dir / f"rank{rank}.{suffix}"


def _worker_main(
    rank: int,
    world_size: int,
    run_dir: str,
    collective_timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    """Entry point of one spawned rank: init gloo, run `fn(*args)`, save the result or error.

    Files in `run_dir`: `rankR.ready` once the group is initialised, `rankR.pt` with the
    result, `rankR.err` with the failure time and traceback, `rankR.stack` for SIGUSR1 dumps.
    """
    directory = Path(run_dir)
    with open(_path(directory, rank, "stack"), "w") as stack_file:
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
        torch.set_num_threads(1)
        try:
            store = dist.FileStore(str(directory / "rendezvous"), world_size)
            backend = chosen_backend()
            if backend == "nccl":
                torch.cuda.set_device(rank % torch.cuda.device_count())
            dist.init_process_group(
                backend,
                store=store,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=collective_timeout_s),
            )
            _path(directory, rank, "ready").touch()
            result = fn(*args)
            # Free what `fn` left in reference cycles (a DDP reducer, K-FAC's process groups) now,
            # while the group and the interpreter are alive, not during interpreter shutdown:
            # destroying gloo objects at shutdown can abort the process (pytorch#179291). A
            # hardening against a rare 3-rank abort seen once (not reproduced in 54 later runs).
            gc.collect()
            # A rank must not tear the group down while a peer is still inside a collective.
            dist.barrier()
            temporary = _path(directory, rank, "pt.tmp")
            torch.save(result, temporary)
            os.replace(temporary, _path(directory, rank, "pt"))
        except BaseException:  # noqa: BLE001 - every failure must reach the parent
            message = f"failed at {time.time():.6f}\n{traceback.format_exc()}"
            _path(directory, rank, "err").write_text(message)
            raise SystemExit(1) from None
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def _describe_failures(run_dir: Path, failed: dict[int, tuple[int | None, float]]) -> str:
    """Put the most likely cause first: own errors before peer-loss errors, then by time.

    `failed` maps rank -> (exit code, wall time at which the parent saw the process exit).
    """
    reports: list[tuple[bool, float, int, str]] = []
    for rank, (exitcode, seen_at) in failed.items():
        error_file = _path(run_dir, rank, "err")
        if error_file.exists():
            first_line, body = error_file.read_text().split("\n", 1)
            when = float(first_line.removeprefix("failed at "))
        else:
            when = seen_at
            body = f"exited with code {exitcode} and no Python traceback\n"
        secondary = any(marker in body for marker in _PEER_LOSS_MARKERS)
        reports.append((secondary, when, rank, body))
    reports.sort()
    _, _, first_rank, first_body = reports[0]
    lines = [f"rank {first_rank} failed first:\n{first_body}"]
    lines += [f"rank {rank} also failed:\n{body}" for _, _, rank, body in reports[1:]]
    return "\n".join(lines)


def _dump_stacks_and_describe(run_dir: Path, processes: list[BaseProcess], hung: list[int]) -> str:
    for rank in hung:
        pid = processes[rank].pid
        assert pid is not None
        os.kill(pid, signal.SIGUSR1)
    time.sleep(_STACK_DUMP_GRACE_S)
    reports = []
    for rank in hung:
        stack_file = _path(run_dir, rank, "stack")
        stack = stack_file.read_text() if stack_file.exists() else ""
        reports.append(f"rank {rank} stack:\n{stack or '(none: still starting Python)'}")
    return "\n".join(reports)


def _stop(processes: list[BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join(timeout=5.0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = DEFAULT_TIMEOUT_S,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned gloo ranks; return the results indexed by rank.

    Every worker runs with `torch.set_num_threads(1)`. `startup_timeout` bounds the time until
    all ranks have joined the group, `timeout` the time from then until all have returned.
    Raises `DistributedRankError` if any rank fails and `DistributedTimeoutError` if a clock runs
    out.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size=}")
    if timeout <= 0 or startup_timeout <= 0:
        raise ValueError(f"timeouts must be positive seconds, got {timeout=}, {startup_timeout=}")
    context = multiprocessing.get_context("spawn")
    collective_timeout = max(timeout, startup_timeout) + _COLLECTIVE_MARGIN_S
    with tempfile.TemporaryDirectory(prefix="kfac_dist_") as temporary_dir:
        run_dir = Path(temporary_dir)
        processes: list[BaseProcess] = [
            context.Process(
                target=_worker_main,
                args=(rank, world_size, temporary_dir, collective_timeout, fn, args),
                name=f"rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + startup_timeout
        started = False
        exit_seen_at: dict[int, float] = {}
        try:
            while True:
                for rank, process in enumerate(processes):
                    if process.exitcode is not None and rank not in exit_seen_at:
                        exit_seen_at[rank] = time.time()
                if any(process.exitcode not in (None, 0) for process in processes):
                    time.sleep(_PEER_ERROR_GRACE_S)  # let peers record their own errors
                    failed = {
                        rank: (process.exitcode, exit_seen_at.get(rank, time.time()))
                        for rank, process in enumerate(processes)
                        if process.exitcode not in (None, 0)
                    }
                    _stop(processes)
                    raise DistributedRankError(
                        f"distributed run of {fn.__name__} on {world_size} ranks failed; "
                        + _describe_failures(run_dir, failed)
                    )
                if all(process.exitcode == 0 for process in processes):
                    break
                if not started and all(
                    _path(run_dir, rank, "ready").exists() for rank in range(world_size)
                ):
                    started = True
                    deadline = time.monotonic() + timeout
                if time.monotonic() > deadline:
                    hung = [r for r, p in enumerate(processes) if p.exitcode is None]
                    stacks = _dump_stacks_and_describe(run_dir, processes, hung)
                    _stop(processes)
                    phase = (
                        f"timed out after {timeout:g} s"
                        if started
                        else f"did not start within {startup_timeout:g} s"
                    )
                    raise DistributedTimeoutError(
                        f"distributed run of {fn.__name__} on {world_size} ranks {phase}; "
                        f"ranks still running: {hung}\n{stacks}"
                    )
                time.sleep(_POLL_INTERVAL_S)
        finally:
            _stop(processes)
        return [
            torch.load(_path(run_dir, rank, "pt"), weights_only=True) for rank in range(world_size)
        ]
