#!/usr/bin/env python3
"""Helpers of scripts/gpu_check.sh: run train.py recording peak GPU memory; compare two runs.

    python scripts/gpu_check_runs.py run OUT_DIR -- model=resnet50 data=synthetic ...
    python scripts/gpu_check_runs.py compare BASELINE_DIR OTHER_DIR --labels sgd kfac

``run`` executes ``train.py`` in this process with ``hydra.run.dir=OUT_DIR`` and writes
``OUT_DIR/peak_memory.json`` (``torch.cuda.max_memory_allocated()`` at exit). ``compare`` reads
both runs' ``metrics.jsonl`` and prints the median ``step_time`` of their logged windows
(the first window, which holds compilation and the first second-order update, is left out),
their ratio, and the peak-memory ratio: every figure is relative to the baseline of the same
invocation of gpu_check.sh.
"""

from __future__ import annotations

import argparse
import atexit
import json
import runpy
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(out_dir: Path, overrides: list[str]) -> None:
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)

    def record_peak() -> None:
        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        (out_dir / "peak_memory.json").write_text(json.dumps({"peak_bytes": peak}))

    atexit.register(record_peak)
    sys.argv = [str(REPO / "train.py"), *overrides, f"hydra.run.dir={out_dir}"]
    sys.path.insert(0, str(REPO))
    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


def _median_step_time(run_dir: Path) -> tuple[float, int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in records if r.get("kind") == "train" and "step_time" in r]
    if len(times) < 2:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl has {len(times)} train windows; need 2+")
    return statistics.median(times[1:]), len(times) - 1


def _peak(run_dir: Path) -> int:
    path = run_dir / "peak_memory.json"
    return json.loads(path.read_text())["peak_bytes"] if path.exists() else 0


def _compare(base: Path, other: Path, labels: list[str]) -> None:
    (t_base, n_base), (t_other, n_other) = _median_step_time(base), _median_step_time(other)
    p_base, p_other = _peak(base), _peak(other)
    print(
        f"{labels[0]}: median step {t_base * 1e3:.1f} ms over {n_base} windows, "
        f"peak memory {p_base / 2**30:.2f} GiB"
    )
    print(
        f"{labels[1]}: median step {t_other * 1e3:.1f} ms over {n_other} windows, "
        f"peak memory {p_other / 2**30:.2f} GiB"
    )
    print(
        f"ratio {labels[1]}/{labels[0]}: step time {t_other / t_base:.3f}x, "
        f"peak memory {(p_other / p_base) if p_base else float('nan'):.3f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train.py with peak-memory recording")
    run.add_argument("out_dir", type=Path)
    run.add_argument("overrides", nargs="*")
    compare = sub.add_parser("compare", help="step-time and peak-memory ratio of two runs")
    compare.add_argument("baseline", type=Path)
    compare.add_argument("other", type=Path)
    compare.add_argument("--labels", nargs=2, default=["baseline", "other"])
    args = parser.parse_args(argv)
    if args.command == "run":
        _run(args.out_dir, args.overrides)
    else:
        _compare(args.baseline, args.other, args.labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
