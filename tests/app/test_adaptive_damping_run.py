"""`kfac.adaptive_damping=true` in the app: the engine re-evaluates the last micro-batch on due
steps, the damping moves and is logged as `kfac.damping` in metrics.jsonl, and a run resumed from
a checkpoint continues bit-exactly (the adapted damping is part of the K-FAC state)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kfac_train.app import train
from kfac_train.config import to_run_config
from kfac_train.engine.outputs import read_metrics
from kfac_train.errors import UserError
from kfac_train.validation import validate

from .conftest import FAST, compose_config

RUN = [
    *FAST,
    "trainer.max_steps=24",
    "trainer.log_every=2",
    "trainer.eval_every=0",
    "checkpoint.every=8",
    "checkpoint.keep_last=0",
    "seed=5",
    "kfac.adaptive_damping=true",
    "kfac.damping_adapt_interval=2",
    "kfac.damping=0.01",
    # augmentation is on in the default run: the extra forward must not disturb its RNG
]


def _dampings(run_dir: Path) -> list[float]:
    return [r["kfac"]["damping"] for r in read_metrics(run_dir / "metrics.jsonl") if "kfac" in r]


def test_adaptive_damping_moves_is_logged_and_resumes_bit_exactly(tmp_path: Path) -> None:
    straight = train(compose_config([*RUN, f"output_dir={tmp_path / 'a'}"]))
    assert straight["status"] == "completed"
    logged = _dampings(tmp_path / "a")
    assert len(logged) == 12 and len(set(logged)) > 1, logged  # adapted, not constant
    final_a = torch.load(tmp_path / "a/checkpoints/step_00000024.pt", weights_only=True)
    assert final_a["preconditioner"]["damping"] == logged[-1]

    fixed = train(
        compose_config([*RUN, "kfac.adaptive_damping=false", f"output_dir={tmp_path / 'fixed'}"])
    )
    assert set(_dampings(tmp_path / "fixed")) == {0.01}
    assert fixed["final_loss"] != straight["final_loss"]

    middle = tmp_path / "a/checkpoints/step_00000008.pt"
    resumed = train(
        compose_config([*RUN, f"output_dir={tmp_path / 'b'}", f"checkpoint.resume={middle}"])
    )
    assert resumed["steps"] == 24
    final_b = torch.load(tmp_path / "b/checkpoints/step_00000024.pt", weights_only=True)
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name
    assert final_b["preconditioner"]["damping"] == final_a["preconditioner"]["damping"]
    assert _dampings(tmp_path / "b") == logged[4:]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["kfac.damping_adapt_decay=1.0"], "kfac.damping_adapt_decay=1.0 is not allowed"),
        (["kfac.damping_adapt_interval=0"], "kfac.damping_adapt_interval=0 is not allowed"),
        (["kfac.min_damping=0"], "kfac.min_damping=0.0 is not allowed"),
        (
            ["kfac.adaptive_damping=true", "kfac.min_damping=1", "kfac.max_damping=0.5"],
            "kfac.min_damping=1.0 is not allowed: must be <= kfac.max_damping=0.5",
        ),
        (
            ["kfac.adaptive_damping=true", "kfac.damping_milestones=[3]"],
            "kfac.damping_milestones=[3.0] is not allowed: must be empty",
        ),
    ],
)
def test_adaptive_damping_options_are_validated(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        validate(to_run_config(compose_config(overrides)), world_size=1)
