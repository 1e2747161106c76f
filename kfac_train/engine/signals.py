"""SIGTERM / SIGUSR1 (Slurm preemption, `scancel`): finish the step, checkpoint, exit cleanly."""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records a stop signal; the loop polls `requested` at optimizer-step boundaries.

    Use as a context manager: handlers are installed on entry and the previous ones restored
    on exit.
    """

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
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
            signal.signal(sig, handler)  # type: ignore[arg-type]
