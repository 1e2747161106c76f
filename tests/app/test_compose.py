"""Every option of every config group composes, validates and builds its component.

Options are discovered by listing conf/, so options added by workload modules are covered too.
Each option is composed once, with the rest of the defaults (for a dataset: with the model
whose workload defaults to it, when there is one).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

from kfac_train.config import RunConfig, to_run_config
from kfac_train.distributed import DistInfo
from kfac_train.engine.batching import plan_batches
from kfac_train.errors import UserError
from kfac_train.optim.first_order import build_optimizer
from kfac_train.optim.preconditioner import NoPreconditioner, build_preconditioner
from kfac_train.registry import DATA, LOGGERS, MODELS, TASKS, BuildContext
from kfac_train.schedules.lr import lr_multiplier

from .conftest import CONF, compose_with_choices

RECIPE_GROUPS = ("recipe", "recipe_optim")
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in RECIPE_GROUPS)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def context(config: RunConfig) -> BuildContext:
    plan = plan_batches(config.batch.size, config.trainer.micro_batch, 1)
    return BuildContext(
        config, DistInfo(0, 1, 0, torch.device("cpu")), plan.micro_batch, plan.accumulation_steps
    )


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 36, 3))


@cache
def model_defaulting_to(data: str) -> str | None:
    """The model option whose yaml re-defaults the data group to `data`, if any."""
    for model in options("model"):
        text = (CONF / "model" / f"{model}.yaml").read_text()
        if f"override /data@_global_.data: {data}" in text:
            return model
    return None


def assert_actionable(error: UserError) -> None:
    """One line that names the config key to set (``data.root``, ``model.weights``, ...)."""
    assert "\n" not in str(error) and re.search(r"\b[a-z_]+\.[a-z_]+\b", str(error)), error


def check_model(config: RunConfig) -> None:
    try:
        with torch.device("meta"):  # shapes only: no memory or time for the big models
            model = MODELS.build(config.model.name, config.model, context(config))
    except UserError as error:  # e.g. needs prepared data (a vocabulary) or model.weights
        assert_actionable(error)
        return
    assert isinstance(model, nn.Module)
    assert sum(p.numel() for p in model.parameters()) > 0


def check_task(config: RunConfig) -> None:
    task = TASKS.build(config.task.name, config.task, context(config))
    assert callable(task.training_loss) and callable(task.evaluator)


def check_data(config: RunConfig) -> None:
    ctx = context(config)
    ctx = ctx.with_task(TASKS.build(config.task.name, config.task, ctx))
    try:
        bundle = DATA.build(config.data.name, config.data, ctx)
    except UserError as error:  # data that must be on disk: one line naming what to set
        assert_actionable(error)
        return
    assert len(bundle.train) > 0


def check_optim(config: RunConfig) -> None:
    model = tiny_model()
    optimizer = build_optimizer(model, config.optim)
    assert optimizer.param_groups[0]["lr"] == config.optim.lr
    preconditioner = build_preconditioner(
        config.optim.preconditioner,
        model,
        optimizer,
        kfac=config.kfac,
        strategy=config.strategy,
        schedule_unit="epoch",
        steps_per_epoch=10,
        accumulation_steps=1,
        grad_scaler=None,
    )
    is_kfac = config.optim.preconditioner == "kfac"
    assert isinstance(preconditioner, NoPreconditioner) != is_kfac


def check_schedule(config: RunConfig) -> None:
    multiplier = lr_multiplier(config.schedule, total_steps=1000, steps_per_epoch=10)
    values = [multiplier(step) for step in range(1000)]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert max(values) == pytest.approx(1.0)


def check_strategy(config: RunConfig) -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    preconditioner = build_preconditioner(
        "kfac",
        model,
        optimizer,
        kfac=config.kfac,
        strategy=config.strategy,
        schedule_unit="epoch",
        steps_per_epoch=10,
        accumulation_steps=1,
        grad_scaler=None,
    )
    assert len(preconditioner.layer_names) == 2


def check_logger(config: RunConfig, tmp_path: Path) -> None:
    loggers = LOGGERS.build(config.logger.name, config.logger, str(tmp_path), {"seed": 0}, 10)
    for logger in loggers:
        logger.log(
            {
                "kind": "train",
                "step": 1,
                "epoch": 0.1,
                "samples": 8,
                "lr": 0.1,
                "loss": 1.0,
                "metrics": {},
            }
        )
        logger.close({"status": "completed"})
    if config.logger.name == "wandb":
        assert list(tmp_path.rglob("offline-run-*")), "an offline W&B run was written"


def cases() -> list[tuple[str, str]]:
    return [(group, option) for group in GROUPS for option in options(group)]


@pytest.mark.parametrize(("group", "option"), cases())
def test_every_option_composes_validates_and_builds(group, option, tmp_path, monkeypatch):
    overrides = [f"{group}={option}"]
    if group == "data" and model_defaulting_to(option):
        overrides.insert(0, f"model={model_defaulting_to(option)}")
    if group == "strategy":
        overrides.append("optim=kfac")
    if group == "logger":  # W&B offline, files under tmp_path, nothing uploaded
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        monkeypatch.delenv("WANDB_MODE", raising=False)
        overrides += ["logger.progress=off", "logger.wandb_mode=offline"]
    cfg, choices = compose_with_choices(overrides)
    assert choices[group] == option
    config = to_run_config(cfg)
    if group == "batch":
        assert config.batch.size == int(option)
    elif group == "model":
        check_model(config)
    else:
        check = {
            "task": check_task,
            "data": check_data,
            "optim": check_optim,
            "schedule": check_schedule,
            "strategy": check_strategy,
        }.get(group)
        if group == "logger":
            check_logger(config, tmp_path)
        elif check is not None:
            check(config)


def test_the_config_groups_mirror_the_package_folders():
    package = CONF.parent / "kfac_train"
    folders = {
        "model": "models",
        "data": "data",
        "task": "tasks",
        "optim": "optim",
        "schedule": "schedules",
        "logger": "loggers",
    }
    for group, folder in folders.items():
        assert (CONF / group).is_dir() and (package / folder).is_dir(), group


def test_kfac_runs_on_the_workloads_baseline_optimizer_unless_told_otherwise():
    config = to_run_config(compose_with_choices(["optim=kfac"])[0])
    assert config.optim.base == config.model.baseline_optim == "sgd"
    config = to_run_config(compose_with_choices(["optim=kfac", "optim.base=lars"])[0])
    assert config.optim.base == "lars"


def recipe_cases() -> list[tuple[str, str, list[str]]]:
    """(group, file name, overrides that select it) of every recipe file."""
    models, batches, optims = options("model"), options("batch"), options("optim")
    found = []
    for group in RECIPE_GROUPS:
        for name in options(group):
            matches = [
                [f"model={m}", f"batch={b}"] + ([f"optim={o}"] if o else [])
                for m in models
                for b in batches
                for o in (optims if group == "recipe_optim" else [""])
                if name == "_".join(x for x in (m, b, o) if x)
            ]
            assert len(matches) == 1, f"{group}/{name}.yaml matches no (model, batch[, optim])"
            found.append((group, name, matches[0]))
    return found


@pytest.mark.parametrize(("group", "name", "overrides"), recipe_cases())
def test_every_recipe_is_selected_by_its_model_batch_and_optim_and_validates(
    group, name, overrides
):
    cfg, choices = compose_with_choices(overrides)
    assert choices[group] == name
    to_run_config(cfg)
