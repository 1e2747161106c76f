"""Stop signals: finish the step, checkpoint, exit cleanly, and requeue when the time is up.

Signals and what they mean:

- ``SIGUSR1`` (Slurm's ``--signal=USR1@<s>`` before the time limit, or ``scancel --signal=USR1``)
  and ``SIGUSR2`` (submitit's time-limit / preemption signal): *requeue* — checkpoint, then ask
  for the job to come back (`requeue_after_stop`);
- ``SIGTERM`` (``scancel``, Slurm preemption, torchrun shutting down): *stop* — checkpoint and
  exit; no requeue (a cancelled job stays cancelled; Slurm's own preemption requeue applies).

Every rank of a distributed run must stop after the same step. `StopAgreement` makes the ranks
agree at every optimizer step without a blocking collective: each step boundary starts a
non-blocking all-reduce (MAX) of the local stop code on a small gloo (CPU) group and reads the
one started at the previous boundary. That reduction finished long ago (DDP's gradient all-reduce
of the step in between already synchronised the ranks), so reading it neither waits nor touches
the GPU: no host sync, no extra kernel on the communication stream. A signal is thus acted on at
most two steps after it arrived, on every rank at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("kfac_train")

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
STOP_SIGNALS = (signal.SIGTERM, *REQUEUE_SIGNALS)

# Stop codes, ordered so that the MAX over ranks picks the stronger request.
CONTINUE, REQUEUE, STOP = 0, 1, 2


def stop_code(signal_number: int | None) -> int:
    """`CONTINUE` without a signal, `REQUEUE` for USR1/USR2, `STOP` for SIGTERM."""
    if signal_number is None:
        return CONTINUE
    return REQUEUE if signal_number in REQUEUE_SIGNALS else STOP


class StopRequest:
    """Records the first stop signal; the loop polls it at optimizer-step boundaries.

    Use as a context manager: handlers are installed on entry and the previous ones restored
    on exit (so a launcher's own handler, e.g. submitit's for SIGUSR2, is back in place for
    `requeue_after_stop`).
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def code(self) -> int:
        return stop_code(self.signal_number)

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if self.signal_number is None or stop_code(signal_number) > self.code:
            self.signal_number = signal_number

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # handlers can only be installed from the main thread
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class StopAgreement:
    """The stop code every rank agrees on, updated at every optimizer step (module doc).

    `poll()` is called once per step boundary, in the same order on every rank; it returns the
    MAX over ranks of the codes that were local at the previous boundary. One process: the local
    code, at once. `close()` waits for the last reduction (call it on every rank before the
    process group is destroyed).
    """

    def __init__(self, stop: StopRequest, distributed: bool) -> None:
        self.stop = stop
        self.group = dist.new_group(backend="gloo") if distributed else None
        self._pending: tuple[torch.Tensor, Any] | None = None

    def poll(self) -> int:
        if self.group is None:
            return self.stop.code
        agreed = CONTINUE
        if self._pending is not None:
            tensor, work = self._pending
            work.wait()
            agreed = int(tensor.item())
        tensor = torch.tensor([self.stop.code], dtype=torch.int32)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (tensor, work)
        return agreed

    def close(self) -> None:
        if self._pending is not None:
            self._pending[1].wait()
            self._pending = None


def _python_handler(signal_number: int) -> Callable[[int, FrameType | None], Any] | None:
    handler = signal.getsignal(signal_number)
    if callable(handler) and handler is not signal.default_int_handler:
        return handler
    return None


def requeue_after_stop(
    signal_number: int, resume: str | None = "auto", env: dict[str, str] | None = None
) -> str:
    """Ask for this job to be requeued after the stop checkpoint (rank 0, outputs written).

    - A launcher's Python handler for the signal (submitit's SIGUSR2 handler) is called: it
      resubmits the same job (same run directory) through its own bookkeeping and exits.
    - Otherwise, under Slurm, ``scontrol requeue $SLURM_JOB_ID``: the job comes back with the
      same id, hence the same run directory (``outputs/slurm-<job>.<step>``), and
      ``checkpoint.resume=auto`` continues from the checkpoint just written. The job must allow
      requeueing (``#SBATCH --requeue``).

    Nothing is requeued unless `resume` (``checkpoint.resume``) is "auto": the requeued job
    would start over. Returns what was done ("handler", "scontrol", "failed: ...", "none": not
    under Slurm, or "not resumable").
    """
    env = dict(os.environ if env is None else env)
    if resume != "auto":
        log.warning(
            "not requeued: checkpoint.resume=%s, so the requeued job would start over; pass "
            "checkpoint.resume=auto to continue runs across time limits",
            resume,
        )
        return "not resumable"
    handler = _python_handler(signal_number)
    if handler is not None:
        name = signal.Signals(signal_number).name
        log.info("handing %s to the launcher's handler to requeue", name)
        handler(signal_number, None)
        return "handler"
    job_id = env.get("SLURM_JOB_ID")  # this job, or this element of an array job
    if not job_id:
        return "none"
    try:
        subprocess.run(
            ["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or str(error)
        log.warning(
            "could not requeue Slurm job %s (%s); resubmit it with the same run directory and "
            "checkpoint.resume=auto",
            job_id,
            str(detail).strip(),
        )
        return f"failed: {detail}"
    log.info("requeued Slurm job %s: it resumes from the checkpoint", job_id)
    return "scontrol"
