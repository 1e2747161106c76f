"""Plot training loss and evaluation metrics of several runs into one PNG.

    python scripts/plot_runs.py outputs/2026-11-21/10-00-00 outputs/2026-11-21/10-05-00 \
        --labels kfac sgd --x step --out compare.png

Each run directory holds a metrics.jsonl written by train.py. One panel for the training loss
and one per evaluation metric (e.g. top1, loss); the x axis is the optimizer step, the epoch,
the number of samples or the wall time (seconds of training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

X_AXES = {"step": "step", "epoch": "epoch", "samples": "samples", "time": "time"}


def read_run(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist (give run directories written by train.py)")
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


def with_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add "time": cumulative seconds of training (step times × steps, plus evaluation time)."""
    elapsed, last_step = 0.0, 0
    for record in records:
        if record["kind"] == "train":
            elapsed += record.get("step_time", 0.0) * (record["step"] - last_step)
            last_step = record["step"]
        else:
            elapsed += record.get("eval_time", 0.0)
        record["time"] = elapsed
    return records


def plot_runs(run_dirs: list[Path], labels: list[str], x_axis: str, out: Path) -> Path:
    """Draw the runs' curves into `out` (PNG) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [with_time(read_run(d)) for d in run_dirs]
    eval_metrics = sorted(
        {m for run in runs for r in run if r["kind"] == "eval" for m in r["metrics"]}
    )
    panels = ["train loss", *(f"eval {m}" for m in eval_metrics)]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for run, label in zip(runs, labels, strict=True):
        train = [r for r in run if r["kind"] == "train"]
        evals = [r for r in run if r["kind"] == "eval"]
        axes[0][0].plot([r[x_axis] for r in train], [r["loss"] for r in train], label=label)
        for axis, metric in zip(axes[0][1:], eval_metrics, strict=True):
            points = [(r[x_axis], r["metrics"][metric]) for r in evals if metric in r["metrics"]]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=label)
    for axis, title in zip(axes[0], panels, strict=True):
        axis.set_title(title)
        axis.set_xlabel(X_AXES[x_axis] + (" (s)" if x_axis == "time" else ""))
        axis.grid(alpha=0.3)
        axis.legend()
    axes[0][0].set_yscale("log")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: directory names)")
    parser.add_argument("--x", choices=sorted(X_AXES), default="step", help="x axis")
    parser.add_argument("--out", type=Path, default=Path("runs.png"), help="output PNG")
    args = parser.parse_args(argv)
    labels = args.labels or [str(run) for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} labels for {len(args.runs)} runs")
    print(plot_runs(args.runs, labels, args.x, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
