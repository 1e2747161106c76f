"""Pretraining through the app on the CPython-text corpus: K-FAC + LAMB learns, phase 2 resumes
from phase 1's checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kfac_train.app import train
from kfac_train.distributed import DistInfo
from kfac_train.registry import MODELS, BuildContext

from .helpers import compose_run

PHASE1_STEPS = 30


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def phase1_run(demo_cache: Path, tmp_path_factory) -> Path:
    """30 steps of K-FAC + LAMB on the demo corpus (batch 8, sequence 64)."""
    run_dir = tmp_path_factory.mktemp("phase1")
    config = compose_run(
        "model=bert_tiny",
        "optim=kfac",
        f"data.root={demo_cache}",
        "data.max_seq_length=64",
        "data.max_predictions=10",
        "data.eval_samples=64",
        "batch.size=8",
        f"trainer.max_steps={PHASE1_STEPS}",
        "schedule.warmup=3",
        "optim.lr=2e-2",
        "trainer.eval_every=1000",
        "trainer.log_every=2",
        "logger.progress=off",
        f"output_dir={run_dir}",
    )
    summary = train(config)
    assert summary["status"] == "completed", summary
    return run_dir


def test_kfac_with_lamb_lowers_the_held_out_mlm_loss_by_a_clear_margin(
    phase1_run: Path, demo_data: Path
) -> None:
    vocab_size = json.loads((demo_data / "meta.json").read_text())["vocab_size"]
    first = records(phase1_run, "train")[0]["metrics"]["mlm_loss"]
    assert first == pytest.approx(math.log(vocab_size), abs=0.3)  # an untrained model's loss
    summary = json.loads((phase1_run / "summary.json").read_text())
    held_out = summary["metrics"]["mlm_loss"]
    assert held_out < first - 1.0, (first, held_out)
    assert summary["metrics"]["mlm_accuracy"] > 0.02  # chance: 1 / vocab_size = 0.0003
    assert summary["kfac"]["memory_bytes"]["factors"] > 0  # K-FAC was active


def test_phase_two_starts_from_the_phase_one_checkpoint(
    phase1_run: Path, demo_cache: Path, demo_data: Path, tmp_path: Path
) -> None:
    checkpoint = phase1_run / "checkpoints" / f"step_{PHASE1_STEPS:08d}.pt"
    phase2 = (
        "model=bert_tiny",
        "optim=kfac",
        f"model.weights={checkpoint}",
        f"data.root={demo_cache}",
        "data.max_seq_length=128",
        "data.max_predictions=20",
        "data.eval_samples=16",
        "batch.size=4",
        "trainer.max_steps=2",
        "schedule.warmup=1",
        "trainer.log_every=1",
        "logger.progress=off",
        f"output_dir={tmp_path / 'phase2'}",
    )
    config = compose_run(*phase2)
    ctx = BuildContext(config, DistInfo(0, 1, 0, torch.device("cpu")), 4, 1)
    model = MODELS.build(config.model.name, config.model, ctx)
    saved = torch.load(checkpoint, weights_only=True)["model"]
    assert model.state_dict().keys() == saved.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key

    summary = train(config)
    assert summary["status"] == "completed"
    first_phase2 = records(tmp_path / "phase2", "train")[0]["metrics"]["mlm_loss"]
    last_phase1 = records(phase1_run, "train")[-1]["metrics"]["mlm_loss"]
    # On twice as long pairs of the same text, the phase-1 model is about as good as at the end
    # of phase 1 (a random model would score ~log(vocab) = 8).
    assert first_phase2 < last_phase1 + 0.5, (first_phase2, last_phase1)
