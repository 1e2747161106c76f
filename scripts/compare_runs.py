"""Print a markdown table comparing training runs (one row per run directory).

    python scripts/compare_runs.py outputs/2026-12-01/10-00-00 outputs/2026-12-01/10-05-00
    python scripts/compare_runs.py multirun/2026-12-01/09-00-00/* --metric top1 --sort best

Each run directory is one written by ``train.py``: ``summary.json`` (status, steps, training
time, final metrics, time to target), ``metrics.jsonl`` (the evaluation history, for the best
value) and ``config.yaml`` (what was run; Hydra's ``.hydra/config.yaml`` as a fallback).

Columns: the run, model, optimizer (``kfac+sgd`` for K-FAC over SGD), lr, global batch,
status, steps, training time, the final and best value of ``--metric``, steps and time to the
target (when the run had ``trainer.target_*``), each run's time as a ratio to the fastest run
to the target (or to the fastest run, when none has a target), and the median throughput.
Unreadable runs are reported on stderr and skipped; the exit status is 1 if none could be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_runs import read_run  # noqa: E402  (sibling script: one reader of metrics.jsonl)

#: Metrics where smaller is better (everything else is "larger is better").
LOWER_IS_BETTER = {"loss", "mlm_loss", "perplexity"}


@dataclass
class RunRow:
    """What the table shows of one run."""

    name: str
    model: str
    optimizer: str
    lr: float | None
    batch: int | None
    status: str
    steps: int
    train_time: float
    final: float | None
    best: float | None
    target_steps: int | None
    target_time: float | None
    throughput: str


def _load_config(run_dir: Path) -> dict[str, Any]:
    # train.py's config.yaml is resolved; Hydra's copy still holds interpolations.
    for candidate in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if candidate.is_file():
            return yaml.safe_load(candidate.read_text(encoding="utf-8")) or {}
    return {}


def _optimizer_label(config: dict[str, Any]) -> str:
    optim = config.get("optim", {}) or {}
    base = str(optim.get("base", "?"))
    preconditioner = optim.get("preconditioner", "none")
    return base if preconditioner in (None, "none") else f"{preconditioner}+{base}"


def _best(records: list[dict[str, Any]], metric: str) -> float | None:
    values = [
        r["metrics"][metric]
        for r in records
        if r.get("kind") == "eval" and metric in r.get("metrics", {})
    ]
    if not values:
        return None
    return min(values) if metric in LOWER_IS_BETTER else max(values)


def _throughput(records: list[dict[str, Any]]) -> str:
    """Median logged throughput (``samples_per_s`` or ``tokens_per_s``), or "-"."""
    for key, unit in (("tokens_per_s", "tok/s"), ("samples_per_s", "samples/s")):
        values = sorted(r[key] for r in records if r.get("kind") == "train" and key in r)
        if values:
            return f"{values[len(values) // 2]:,.0f} {unit}"
    return "-"


def read_row(run_dir: Path, metric: str) -> RunRow:
    """One row from a run directory; raises ``ValueError`` naming what is missing."""
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ValueError(f"{summary_path} does not exist (not a finished train.py run?)")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{summary_path} is not valid JSON: {error}") from error
    records = read_run(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    config = _load_config(run_dir)
    target = summary.get("target") or {}
    return RunRow(
        name=run_dir.name if run_dir.name not in ("", ".") else str(run_dir),
        model=str((config.get("model") or {}).get("name", "?")),
        optimizer=_optimizer_label(config),
        lr=(config.get("optim") or {}).get("lr"),
        batch=summary.get("global_batch"),
        status=str(summary.get("status", "?")),
        steps=int(summary.get("steps", 0)),
        train_time=float(summary.get("train_time", 0.0)),
        final=(summary.get("metrics") or {}).get(metric),
        best=_best(records, metric),
        target_steps=target.get("steps"),
        target_time=target.get("time"),
        throughput=_throughput(records),
    )


def _fmt(value: float | int | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[RunRow], metric: str) -> str:
    """The rows as a GitHub-flavoured markdown table (``time ×`` relative to the fastest run to
    the target, or to the fastest run overall when no run has target figures)."""
    with_target = [r.target_time for r in rows if r.target_time is not None]
    reference = min(with_target) if with_target else min((r.train_time for r in rows), default=0)
    header = [
        "run", "model", "optimizer", "lr", "batch", "status", "steps", "time (s)",
        f"final {metric}", f"best {metric}", "steps to target", "time to target (s)",
        "time ×", "throughput",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        own = r.target_time if with_target else r.train_time
        ratio = "-" if own is None or reference <= 0 else f"{own / reference:.2f}"
        cells = [
            r.name, r.model, r.optimizer, _fmt(r.lr), _fmt(r.batch, "d"), r.status,
            str(r.steps), f"{r.train_time:.1f}", _fmt(r.final), _fmt(r.best),
            _fmt(r.target_steps, "d"), _fmt(r.target_time, ".1f"), ratio, r.throughput,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by train.py")
    parser.add_argument("--metric", default="top1", help="evaluation metric to show (top1)")
    parser.add_argument(
        "--sort", choices=("none", "best", "time"), default="none",
        help="order rows by best metric or by training time (default: as given)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    rows: list[RunRow] = []
    for run_dir in args.runs:
        try:
            rows.append(read_row(run_dir, args.metric))
        except ValueError as error:
            print(f"skipped {run_dir}: {error}", file=sys.stderr)
    if not rows:
        print("error: no run could be read", file=sys.stderr)
        return 1
    if args.sort == "best":
        sign = 1 if args.metric in LOWER_IS_BETTER else -1
        rows.sort(key=lambda r: float("inf") if r.best is None else sign * r.best)
    elif args.sort == "time":
        rows.sort(key=lambda r: r.train_time)
    print(markdown_table(rows, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
