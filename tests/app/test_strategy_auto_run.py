"""`strategy=auto`: the app picks the gradient-worker fraction from `strategy.memory_budget_mb`,
logs the candidates, and stops with one line (exit status 2) when no fraction fits."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kfac_train.app import train
from kfac_train.errors import UserError

from .conftest import FAST, compose_config, run_cli

RUN = [*FAST, "trainer.max_steps=2", "strategy=auto"]


def test_a_budget_that_fits_runs_with_a_logged_choice(tmp_path: Path, caplog):
    with caplog.at_level(logging.INFO, logger="kfac_train.kfac"):
        summary = train(
            compose_config([*RUN, "strategy.memory_budget_mb=64", f"output_dir={tmp_path}"])
        )
    assert summary["status"] == "completed"
    table = [r.getMessage() for r in caplog.records if "strategy auto" in r.getMessage()]
    assert len(table) == 1 and "<- chosen" in table[0] and "67,108,864 B per rank" in table[0]
    held = summary["kfac"]["memory_bytes"]
    assert held["factors"] + held["second_order"] <= 64 * 2**20


def test_a_budget_below_every_fraction_stops_with_the_smallest_feasible_one(tmp_path: Path):
    with pytest.raises(
        UserError,
        match=r"strategy.memory_budget_mb=0.5: too small; K-FAC needs "
        r"at least 1\.\d{3} MiB per rank .* on 1 rank\(s\)",
    ):
        train(compose_config([*RUN, "strategy.memory_budget_mb=0.5", f"output_dir={tmp_path}"]))
    completed = run_cli([*RUN, "strategy.memory_budget_mb=0.5"], tmp_path)
    assert completed.returncode == 2
    assert completed.stderr.strip().count("\n") == 0 and "too small" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_auto_without_a_budget_and_a_budget_without_auto_are_refused(tmp_path: Path):
    with pytest.raises(UserError, match="strategy=auto needs the K-FAC memory budget"):
        train(compose_config([*RUN, "strategy.memory_budget_mb=null", f"output_dir={tmp_path}"]))
    with pytest.raises(UserError, match="only used by strategy=auto"):
        train(
            compose_config(
                [
                    *FAST,
                    "trainer.max_steps=2",
                    "strategy.memory_budget_mb=8",
                    f"output_dir={tmp_path}",
                ]
            )
        )
