"""ResNet-50 / ImageNet recipes: selected by `batch=`, values as published, each runs 2 steps.

``model=resnet50`` implies ``data=imagenet`` and ``task=imagenet``. The runs swap ResNet-50 for
a tiny CIFAR ResNet after composing (the recipes are keyed on ``model=resnet50``) and use
synthetic data, so that every recipe's optimizer, schedule, K-FAC settings and task extras
execute on the CPU in about a second.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kfac_train.app import train
from kfac_train.cli import normalise_argv
from kfac_train.config import RunConfig, to_run_config
from kfac_train.data.synthetic import SyntheticConfig
from kfac_train.hydra_setup import register_configs
from kfac_train.models.resnet_cifar import ResNet20Config

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
KAISA_SIZES = (512, 1024, 2048)
SPNGD_SIZES = (4096, 8192, 16384, 32768, 65536, 131072)
RECIPES = [(size, optim) for size in KAISA_SIZES for optim in ("kfac", "sgd")] + [
    (size, optim) for size in SPNGD_SIZES for optim in ("kfac", "lars")
]


def compose_run(*overrides: str) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=normalise_argv(list(overrides)))
    return to_run_config(cfg)


def test_batch_32768_with_resnet50_and_kfac_selects_the_sp_ngd_32k_recipe() -> None:
    # exactly the headline command
    config = compose_run("model=resnet50", "optim=kfac", "batch=32768")
    assert config.batch.size == 32768
    assert config.task.name == "imagenet"
    assert (config.optim.lr, config.optim.momentum, config.optim.weight_decay) == (0.03, 0.97, 0)
    schedule = config.schedule
    assert (schedule.name, schedule.decay_start, schedule.decay_end, schedule.power) == (
        "poly",
        1.5,
        49.5,
        3.5,
    )
    assert schedule.momentum_tied and schedule.warmup == 0
    assert config.kfac.damping == 2.0e-4 and config.kfac.factored_damping  # SP-NGD Eq. 12
    assert config.kfac.factor_decay == 0.0  # chainerkfac cov_ema_decay 1.0 = latest batch only
    assert config.kfac.grad_scaling == "per_example" and config.kfac.kl_clip is None
    task = config.task
    assert task.mixup_alpha == 0.6 and task.random_erasing == 0.5  # type: ignore[attr-defined]
    assert task.weight_rescaling  # type: ignore[attr-defined]
    assert config.trainer.max_steps == 1760 and config.trainer.target_value == 0.759


def test_batch_2048_with_kfac_selects_the_kaisa_recipe() -> None:
    config = compose_run("model=resnet50", "optim=kfac", "batch=2048")
    assert (config.optim.lr, config.kfac.damping) == (0.8, 0.003)
    assert (config.kfac.inv_update_steps, config.kfac.factor_update_steps) == (500, 50)
    assert config.schedule.milestones == [25, 35, 40, 45, 50] and config.schedule.warmup == 5
    assert config.task.label_smoothing == 0.1  # type: ignore[attr-defined]
    assert config.trainer.max_epochs == 55


def test_the_sgd_baseline_at_2048_trains_90_epochs_with_the_standard_decay() -> None:
    config = compose_run("model=resnet50", "optim=sgd", "batch=2048")
    assert config.optim.preconditioner == "none" and config.optim.lr == 0.8
    assert config.schedule.milestones == [30, 60, 80] and config.trainer.max_epochs == 90


def test_sp_ngd_recipes_follow_the_paper_table() -> None:
    table = {  # batch: (alpha, p_decay, e_start, e_end, lr, momentum, damping λ, steps)
        4096: (0.4, 11.0, 1, 53, 8.18e-3, 0.997, 2.5e-4, 10948),
        8192: (0.4, 8.0, 1, 53.5, 1.25e-2, 0.993, 2.5e-4, 5434),
        16384: (0.4, 8.0, 1, 53.5, 2.5e-2, 0.985, 2.5e-4, 2737),
        32768: (0.6, 3.5, 1.5, 49.5, 3.0e-2, 0.97, 2.0e-4, 1760),
        65536: (0.6, 2.9, 2, 64.5, 4.0e-2, 0.95, 1.5e-4, 1173),
        131072: (1.0, 2.9, 3, 100, 7.0e-2, 0.93, 1.0e-4, 873),
    }
    for size, (alpha, power, start, end, lr, momentum, damping, steps) in table.items():
        c = compose_run("model=resnet50", "optim=kfac", f"batch={size}")
        got = (
            c.task.mixup_alpha,  # type: ignore[attr-defined]
            c.schedule.power,
            c.schedule.decay_start,
            c.schedule.decay_end,
            c.optim.lr,
            c.optim.momentum,
            c.kfac.damping,
            c.trainer.max_steps,
        )
        assert got == pytest.approx((alpha, power, start, end, lr, momentum, damping, steps), 1e-3)
        assert c.kfac.factored_damping and c.kfac.compute_method == "inverse"
        assert c.kfac.batchnorm == "unit_wise"


@pytest.mark.parametrize(("size", "optim"), RECIPES, ids=[f"{s}-{o}" for s, o in RECIPES])
def test_every_recipe_runs_two_steps_on_synthetic_data(
    size: int, optim: str, tmp_path: Path
) -> None:
    config = compose_run(
        "model=resnet50",
        f"optim={optim}",
        f"batch={size}",
        "data=synthetic",
        "data.num_train=16",
        "data.num_eval=8",
        "batch.size=8",
        "trainer.micro_batch=4",
        "trainer.max_steps=2",
        "trainer.max_epochs=null",
        "logger.progress=off",
        "checkpoint.at_end=false",
        f"output_dir={tmp_path}",
    )
    tiny = ResNet20Config(depth=8, width=4, image_size=8, num_classes=10)
    config = dataclasses.replace(
        config, model=tiny, data=dataclasses.replace(config.data, name="synthetic")
    )
    assert isinstance(config.data, SyntheticConfig)
    summary = train(config)
    assert summary["steps"] == 2
    assert math.isfinite(summary["metrics"]["loss"])
