"""scripts/study_convergence.py runs train.py over arms × lrs × seeds and compares them.

One quick study on the digits task (K-FAC and SGD, a 2-point lr grid, one seed, 20 steps):
the table's figures must be the ones the runs' summary.json files hold, the ratios must be
computed from them, and both PNG curves must be written.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kfac_train.config import to_run_config
from kfac_train.validation import validate

from .conftest import REPO, compose_config

sys.path.insert(0, str(REPO / "scripts"))
import study_convergence as study  # noqa: E402

SCRIPT = str(REPO / "scripts/study_convergence.py")


def table_rows(table: str) -> dict[str, list[str]]:
    """The markdown table's rows keyed by the optimizer cell (" (K-FAC)" removed)."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("| ") and not line.startswith("| optimizer"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].removesuffix(" (K-FAC)")] = cells
    return rows


def summaries(out: Path, arm: str) -> dict[float, dict]:
    """The runs' own summary.json per lr (seed 0), read without the script's code."""
    found = {}
    for run_dir in sorted((out / "runs" / arm).glob("lr*/seed0")):
        found[float(run_dir.parent.name[2:])] = json.loads((run_dir / "summary.json").read_text())
    return found


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    done = subprocess.run(
        [sys.executable, SCRIPT, "digits", "--quick", "--out", str(out)]
        + ["--optimizers", "kfac_pe", "sgd", "--jobs", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_quick_study_writes_table_curves_and_runs(quick_study: Path) -> None:
    for name in ("table.md", "digits_step.png", "digits_time.png", "study.json"):
        assert (quick_study / name).stat().st_size > 0, name
    assert (quick_study / "digits_step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 2 arms × 2 lrs × 1 seed, each with the lr the grid asked for.
    for arm in ("kfac_pe", "sgd"):
        runs = summaries(quick_study, arm)
        expected = next(a for a in study.STUDIES["digits"].arms if a.name == arm).lrs[:2]
        assert sorted(runs) == sorted(expected)
        assert all(s["status"] in ("completed", "target_reached") for s in runs.values())


def test_table_figures_and_ratios_come_from_the_runs(quick_study: Path) -> None:
    rows = table_rows((quick_study / "table.md").read_text())
    assert set(rows) == {"kfac_pe", "sgd"}
    figures = {}
    for arm in ("kfac_pe", "sgd"):
        cells = rows[arm]
        best_lr = float(cells[1])
        run = summaries(quick_study, arm)[best_lr]
        final = run["metrics"]["top1"]
        assert float(cells[7]) == pytest.approx(final, abs=1e-4)
        if run["target"] is not None:
            assert float(cells[3]) == run["target"]["steps"]
            assert float(cells[5]) == pytest.approx(run["target"]["time"], abs=0.06)
        figures[arm] = run
    # The baseline is its own reference; K-FAC's ratios divide its figures by SGD's.
    assert rows["sgd"][8] == "1.000"
    kfac, sgd = figures["kfac_pe"], figures["sgd"]
    expected_final = kfac["metrics"]["top1"] / sgd["metrics"]["top1"]
    assert float(rows["kfac_pe"][8]) == pytest.approx(expected_final, abs=1e-3)
    if kfac["target"] is not None and sgd["target"] is not None:
        expected_steps = kfac["target"]["steps"] / sgd["target"]["steps"]
        assert float(rows["kfac_pe"][4]) == pytest.approx(expected_steps, abs=0.006)
        expected_time = kfac["target"]["time"] / sgd["target"]["time"]
        assert float(rows["kfac_pe"][6]) == pytest.approx(expected_time, abs=0.006)


def make_result(arm: str, lr: float, seed: int, steps: int | None, final: float) -> study.RunResult:
    row = study.RunRow(
        name=f"seed{seed}", model="small_cnn", optimizer=arm, lr=lr, batch=64,
        status="completed", steps=100, train_time=10.0, final=final, best=final,
        target_steps=steps, target_time=None if steps is None else steps / 10, throughput="-",
    )  # fmt: skip
    return study.RunResult(arm, lr, seed, f"/runs/{arm}/{lr}/{seed}", row)


def test_best_lr_needs_every_seed_at_target_then_fewest_steps() -> None:
    arm = study.Arm("sgd", ("optim=sgd",), (0.05, 0.1, 0.2))
    results = [
        # lr 0.05: every seed at target, slow; lr 0.1: one seed misses; lr 0.2: fast everywhere.
        make_result("sgd", 0.05, 0, 80, 0.98), make_result("sgd", 0.05, 1, 90, 0.98),
        make_result("sgd", 0.1, 0, 20, 0.99), make_result("sgd", 0.1, 1, None, 0.90),
        make_result("sgd", 0.2, 0, 40, 0.97), make_result("sgd", 0.2, 1, 60, 0.97),
    ]  # fmt: skip
    summary = study.summarise_arm(arm, results, "top1")
    assert summary.best_lr == 0.2
    assert (summary.steps, summary.time, summary.reached) == (50.0, 5.0, 2)
    assert summary.final == pytest.approx(0.97)


def test_arm_that_never_reaches_the_target_has_no_step_ratio() -> None:
    kfac = study.Arm("kfac_pe", (), (0.01, 0.02), kfac=True)
    sgd = study.Arm("sgd", (), (0.01, 0.02))
    results = [
        make_result("kfac_pe", 0.01, 0, None, 0.80),
        make_result("kfac_pe", 0.02, 0, None, 0.85),
        make_result("sgd", 0.01, 0, 30, 0.95),
        make_result("sgd", 0.02, 0, 40, 0.96),
    ]
    arms = [study.summarise_arm(a, results, "top1") for a in (kfac, sgd)]
    study.add_ratios(arms, "top1")
    assert arms[0].best_lr == 0.02  # best final metric when no lr reaches the target
    assert arms[0].steps is None and arms[0].steps_ratio is None
    assert arms[0].final_ratio == pytest.approx(0.85 / 0.95)
    assert (arms[1].best_lr, arms[1].steps_ratio, arms[1].time_ratio) == (0.01, 1.0, 1.0)


def test_study_kfac_arms_and_recipes_state_their_gradient_scaling() -> None:
    """K-FAC arms and the recipes the study compares with name the convention they were tuned
    with, so a change of the library's default does not change what they mean."""
    import yaml

    for preset in study.STUDIES.values():
        for arm in preset.arms:
            if arm.kfac:
                assert any(o.startswith("kfac.grad_scaling=") for o in arm.overrides), arm.name
    for name in ("small_cnn_64_kfac", "bert_tiny_32_kfac"):
        recipe = yaml.safe_load((REPO / "conf/recipe_optim" / f"{name}.yaml").read_text())
        assert recipe["kfac"]["grad_scaling"] in ("mean", "per_example"), name


def test_every_arm_of_every_preset_composes_into_a_valid_run() -> None:
    for preset in study.STUDIES.values():
        for arm in preset.arms:
            for lr in arm.lrs:
                overrides = [*preset.base, *arm.overrides, f"optim.lr={lr}"]
                config = to_run_config(compose_config(overrides))
                validate(config, world_size=1)
                assert config.optim.lr == lr
                assert (config.optim.preconditioner == "kfac") == arm.kfac, (preset.name, arm.name)
