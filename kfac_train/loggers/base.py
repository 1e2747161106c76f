"""The run-logger interface: receives every metrics record and the final summary (rank 0)."""

from __future__ import annotations

from typing import Any, Protocol


class RunLogger(Protocol):
    """A destination of run metrics. Only rank 0 builds loggers."""

    def on_step(self, step: int) -> None:
        """Called after every optimizer step (cheap: no metrics, no host syncs)."""

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (train or eval): step, epoch, samples, lr, loss, ..."""

    def message(self, text: str) -> None:
        """A human-readable line (run start, evaluation results, checkpoint saved)."""

    def close(self, summary: dict[str, Any]) -> None:
        """End of the run with summary.json's content."""
