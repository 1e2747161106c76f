"""``kfac.stale=adaptive`` and ``kfac.fisher=mc`` through the application."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfac_train.app import train
from kfac_train.config import to_run_config
from kfac_train.errors import UserError
from kfac_train.validation import validate

from .conftest import FAST, compose_config


def short_run(tmp_path: Path, *overrides: str) -> dict:
    return train(
        compose_config(
            [
                *FAST,
                "trainer.max_steps=12",
                "trainer.log_every=4",
                f"output_dir={tmp_path}",
                *overrides,
            ]
        )
    )


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def test_stale_statistics_report_the_fraction_computed_in_summary_and_metrics(tmp_path: Path):
    summary = short_run(tmp_path, "kfac.stale=adaptive", "kfac.factor_update_steps=1")
    fraction = summary["kfac"]["statistics_fraction"]
    assert 0 < fraction < 1
    assert json.loads((tmp_path / "summary.json").read_text())["kfac"]["statistics_fraction"] == (
        fraction
    )
    logged = [r["kfac"]["statistics_fraction"] for r in train_records(tmp_path)]
    assert len(logged) == 3 and logged[-1] == fraction
    assert all(0 < value <= 1 for value in logged)


def test_without_stale_statistics_every_statistic_is_computed(tmp_path: Path):
    summary = short_run(tmp_path)
    assert summary["kfac"]["statistics_fraction"] == 1.0


def test_the_mc_fisher_trains_and_changes_the_preconditioner(tmp_path: Path):
    empirical = short_run(tmp_path / "emp", "trainer.max_steps=3")
    sampled = short_run(
        tmp_path / "mc", "trainer.max_steps=3", "kfac.fisher=mc", "kfac.mc_samples=2"
    )
    assert sampled["status"] == "completed" and sampled["steps"] == 3
    assert sampled["final_loss"] == pytest.approx(sampled["final_loss"])  # finite
    assert sampled["final_loss"] != empirical["final_loss"]


def test_the_mc_fisher_under_bf16_autocast_trains_like_float32(tmp_path: Path):
    """The sampled losses come from bf16 logits; G is still built in float32 (the capture casts),
    so a short bf16 run follows the float32 one closely."""
    steps = ("trainer.max_steps=6", "kfac.fisher=mc")
    full = short_run(tmp_path / "fp32", *steps)
    half = short_run(tmp_path / "bf16", *steps, "trainer.precision=bf16")
    assert half["status"] == "completed" and half["steps"] == 6
    assert half["final_loss"] == pytest.approx(full["final_loss"], rel=0.02)
    assert half["final_loss"] != full["final_loss"]  # the bf16 path really ran


@pytest.mark.parametrize("task", ["segmentation", "detection", "squad"])
def test_a_task_without_a_sampling_rule_refuses_the_mc_fisher(task: str):
    config = compose_config([f"task={task}", "kfac.fisher=mc"])
    with pytest.raises(UserError, match=rf"^kfac.fisher=mc: task={task} has no rule .*empirical$"):
        validate(to_run_config(config), world_size=1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("kfac.stale=sometimes", "kfac.stale='sometimes'"),
        ("kfac.stale_threshold=0", "kfac.stale_threshold=0"),
        ("kfac.fisher=true_fisher", "kfac.fisher='true_fisher'"),
        ("kfac.mc_samples=0", "kfac.mc_samples=0"),
    ],
)
def test_bad_stale_and_fisher_values_are_refused(override: str, message: str):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        validate(to_run_config(compose_config([override])), world_size=1)
