"""BERT options compose as documented; the phase recipes carry the published values and run.

The recipe runs swap BERT-Large for a tiny BERT and synthetic data after composing (recipes are
keyed on ``model=bert_large``), so every recipe's optimizer, schedule and K-FAC settings execute
on the CPU in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kfac_train.app import train
from kfac_train.data.synthetic import SyntheticConfig
from kfac_train.errors import UserError
from kfac_train.models.bert import KFAC_SKIP_LAYERS, BertTinyConfig

from .helpers import compose_run
from .test_squad_data import write_squad_file

PHASES = {
    # batch: (data option, lr, steps, warmup steps)
    65536: ("bert_phase1", 6.0e-3, 7038, 2001),
    32768: ("bert_phase2", 4.0e-3, 1563, 200),
}


@pytest.mark.parametrize("batch", sorted(PHASES))
@pytest.mark.parametrize("optim", ["kfac", "lamb"])
def test_batch_sizes_of_the_two_phases_select_their_recipes(batch: int, optim: str) -> None:
    data, lr, steps, warmup = PHASES[batch]
    config = compose_run("model=bert_large", f"data={data}", f"batch={batch}", f"optim={optim}")
    assert config.batch.size == batch and config.task.name == "masked_lm"
    assert config.optim.base == "lamb" and config.optim.lr == lr
    assert (config.optim.weight_decay, config.optim.eps) == (0.01, 1e-6)
    assert config.trainer.max_steps == steps
    schedule = config.schedule
    assert (schedule.name, schedule.unit, schedule.warmup, schedule.power) == (
        "poly",
        "step",
        warmup,
        0.5,
    )
    assert abs(warmup / steps - (0.2843 if batch == 65536 else 0.128)) < 1e-3
    assert tuple(config.kfac.skip_layers) == KFAC_SKIP_LAYERS
    if optim == "kfac":
        kfac = config.kfac
        assert (kfac.damping, kfac.factor_update_steps, kfac.inv_update_steps) == (0.003, 1, 10)
        assert (kfac.factor_decay, kfac.kl_clip, kfac.inv_dtype) == (0.95, 0.001, "float16")
        assert config.strategy.grad_worker_fraction == "hybrid-opt"
        assert config.optim.preconditioner == "kfac"
    else:
        assert config.optim.preconditioner == "none"


def test_bert_large_defaults_to_phase_one_data_and_batch() -> None:
    config = compose_run("model=bert_large")
    assert (config.data.name, config.batch.size, config.data.max_seq_length) == (
        "bert_phase1",
        65536,
        128,
    )
    assert config.data.max_predictions == 20  # type: ignore[attr-defined]
    phase2 = compose_run("model=bert_large", "data=bert_phase2", "batch=32768")
    assert (phase2.data.max_seq_length, phase2.data.max_predictions) == (512, 80)  # type: ignore


def test_squad_fine_tuning_defaults_to_adamw_for_three_epochs() -> None:
    config = compose_run("model=bert_squad")
    assert (config.data.name, config.task.name, config.optim.base) == ("squad", "squad", "adamw")
    assert (config.optim.lr, config.batch.size, config.trainer.max_epochs) == (5e-5, 32, 3)


@pytest.mark.parametrize("batch", sorted(PHASES))
def test_each_kfac_phase_recipe_runs_two_steps(batch: int, tmp_path: Path) -> None:
    data = PHASES[batch][0]
    config = compose_run(
        "model=bert_large",
        f"data={data}",
        f"batch={batch}",
        "optim=kfac",
        "batch.size=4",
        "trainer.micro_batch=2",
        "trainer.max_steps=2",
        "schedule.warmup=1",
        "task.synthetic_seq_length=32",
        "task.synthetic_max_predictions=5",
        "logger.progress=off",
        "checkpoint.at_end=false",
        f"output_dir={tmp_path}",
    )
    config = dataclasses.replace(
        config,
        model=BertTinyConfig(vocab_size=512),
        data=SyntheticConfig(num_train=8, num_eval=4),
    )
    summary = train(config)
    assert summary["status"] == "completed" and summary["steps"] == 2
    assert summary["accumulation_steps"] == 2
    assert summary["kfac"]["memory_bytes"]["second_order"] > 0


def test_unprepared_data_root_names_the_preparation_script(tmp_path: Path) -> None:
    config = compose_run(
        "model=bert_tiny",
        "data=bert_phase1",
        f"data.root={tmp_path}",
        f"output_dir={tmp_path / 'run'}",
    )
    with pytest.raises(UserError, match="scripts/prepare_bert_data.py"):
        train(config)


def test_squad_needs_the_pretraining_vocabulary_and_checkpoint(tmp_path: Path, demo_data) -> None:
    base = (
        "model=bert_squad",
        "model.size=bert_tiny",
        f"data.root={tmp_path}",
        f"output_dir={tmp_path / 'run'}",
    )
    with pytest.raises(UserError, match="data.vocab_file="):
        train(compose_run(*base))
    (tmp_path / "train-v1.1.json").write_text('{"data": []}')
    with pytest.raises(UserError, match="no questions"):
        train(compose_run(*base, f"data.vocab_file={demo_data / 'vocab.txt'}"))
    write_squad_file(tmp_path / "train-v1.1.json")
    write_squad_file(tmp_path / "dev-v1.1.json")
    with pytest.raises(UserError, match="model.weights="):
        train(compose_run(*base, f"data.vocab_file={demo_data / 'vocab.txt'}", "batch.size=2"))
