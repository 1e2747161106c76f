"""Asynchronous second-order updates (Ba et al.'s asynchronous inverses), deterministically.

At an inverse-update step ``t`` the preconditioner snapshots every block's running factors and
the damping, and a worker starts the heavy part — every eigendecomposition or inverse this rank
owes (:func:`.placement.decompose_owned`) — off the critical path: a worker thread, which on a
GPU issues its kernels on a side CUDA stream. At step ``t + delay`` (before that step's
preconditioning) the main thread waits for the worker if it is not done, and installs the data
exactly as a synchronous update from the snapshot would (:func:`.placement.update_second_order`),
including the broadcasts among gradient workers: every collective runs on the main thread at
the same step on every rank. The result is therefore a function of the snapshot alone: an
asynchronous run equals a synchronous run whose second-order data is delayed by ``delay``
steps, bit for bit, and a checkpoint carries the pending snapshots (recomputed on load).

The snapshot costs one copy of the factors while a job is pending.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from .assignment import WorkPlan
from .comm import Communicator
from .placement import Decomposed, Factors, decompose_owned, running_factors, update_second_order

STATE_KEY = "async_pending"


@dataclass
class Job:
    """One pending second-order update: computed from ``factors`` with ``damping``, installed at
    step ``apply_step``."""

    apply_step: int
    damping: float
    factors: Factors
    future: Future


class AsyncSecondOrder:
    """The queue of pending updates of one preconditioner, with its worker thread."""

    def __init__(
        self, blocks: dict[str, Any], plan: WorkPlan, comm: Communicator, delay: int, enabled: bool
    ) -> None:
        if int(delay) < 1:
            raise ValueError(f"async_delay must be an integer >= 1, got {delay!r}")
        self.blocks, self.plan, self.comm, self.delay = blocks, plan, comm, int(delay)
        #: Whether inverse-update steps launch a job (else they update synchronously).
        self.enabled = bool(enabled)
        self.pending: deque[Job] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._stream: torch.cuda.Stream | None = None

    def _worker(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kfac-async")
        return self._executor

    def _submit(self, apply_step: int, damping: float, factors: Factors) -> None:
        threads = torch.get_num_threads()  # the worker uses the same BLAS threads: same bits
        device = next((t.device for ts in factors.values() for t in ts), torch.device("cpu"))
        event = None
        if device.type == "cuda":
            self._stream = self._stream or torch.cuda.Stream(device)
            event = torch.cuda.Event()
            event.record()  # the snapshot copies are queued on the main stream

        def work() -> Decomposed:
            torch.set_num_threads(threads)
            if event is None:
                return decompose_owned(self.blocks, self.plan, self.comm.rank, factors, damping)
            with torch.cuda.device(device), torch.cuda.stream(self._stream):
                self._stream.wait_event(event)
                out = decompose_owned(self.blocks, self.plan, self.comm.rank, factors, damping)
            done = torch.cuda.Event()
            done.record(self._stream)
            out["__event__"] = done  # type: ignore[assignment]
            return out

        self.pending.append(Job(apply_step, damping, factors, self._worker().submit(work)))

    def launch(self, step: int, damping: float) -> None:
        """Snapshot the running factors at inverse-update step ``step`` and start the worker."""
        snapshot = {
            name: [t.detach().clone() for t in tensors]
            for name, tensors in running_factors(self.blocks).items()
        }
        self._submit(step + self.delay, damping, snapshot)

    def apply_due(self, step: int) -> None:
        """Install, in order, every pending update due at ``step`` (waiting for its worker)."""
        while self.pending and self.pending[0].apply_step <= step:
            job = self.pending.popleft()
            ready = job.future.result()
            event = ready.pop("__event__", None)
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
                for results in ready.values():  # made on the side stream, used on this one
                    for result in results.values():
                        for t in result if isinstance(result, tuple) else [result]:
                            if t is not None:
                                t.record_stream(torch.cuda.current_stream())
            update_second_order(
                self.blocks, self.plan, self.comm, job.damping, factors=job.factors, ready=ready
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> list[dict[str, Any]]:
        """The pending snapshots (replicated on every rank, so any world size can load them)."""
        return [
            {"apply_step": j.apply_step, "damping": j.damping, "factors": j.factors}
            for j in self.pending
        ]

    def load_state_dict(self, entries: list[dict[str, Any]]) -> None:
        """Drop the queue and restart the workers of the saved snapshots (same results)."""
        for job in self.pending:
            job.future.result()
        self.pending.clear()
        for entry in entries:
            factors = {name: list(tensors) for name, tensors in entry["factors"].items()}
            self._submit(int(entry["apply_step"]), float(entry["damping"]), factors)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


__all__ = ["AsyncSecondOrder", "Job", "STATE_KEY"]
