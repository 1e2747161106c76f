"""Files of a run directory, written by rank 0: config.yaml, metrics.jsonl, summary.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class RunOutputs:
    """Writes the run's files into `run_dir` (created if needed)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / "metrics.jsonl"
        self.summary_path = run_dir / "summary.json"
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115

    def write_config(self, yaml_text: str) -> None:
        (self.run_dir / "config.yaml").write_text(yaml_text, encoding="utf-8")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON object per line, flushed at once (readable while the run goes on)."""
        self._metrics.write(json.dumps(_json_safe(record)) + "\n")
        self._metrics.flush()

    def write_summary(self, summary: dict[str, Any]) -> None:
        temporary = self.summary_path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(_json_safe(summary), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, self.summary_path)

    def truncate_after(self, step: int) -> None:
        """Drop records with a step after `step` (those of a run resumed from `step`)."""
        self._metrics.close()
        kept = [r for r in read_metrics(self.metrics_path) if r["step"] <= step]
        with open(self.metrics_path, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(_json_safe(r)) + "\n" for r in kept)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        self._metrics.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]
