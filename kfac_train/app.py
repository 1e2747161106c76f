"""`train(cfg)`: the whole application behind ``python train.py``, importable for tests and sweeps.

Builds, in order: distributed setup, batch plan, task, data, model (+ DDP), base optimizer,
preconditioner (K-FAC or the no-op one), schedule, grad scaler, loggers and outputs; resumes
if asked; runs the engine; writes summary.json. See docs/architecture.md.
"""

from __future__ import annotations

import logging
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kfac_train.config import RunConfig, to_run_config
from kfac_train.context import BuildContext
from kfac_train.data.base import DataBundle
from kfac_train.distributed import DistInfo, broadcast_object, init_distributed, teardown
from kfac_train.engine.batching import plan_batches
from kfac_train.engine.loop import Components, Trainer
from kfac_train.engine.outputs import RunOutputs
from kfac_train.engine.precision import autocast_factory, make_grad_scaler
from kfac_train.engine.sharding import shard_model
from kfac_train.engine.signals import requeue_after_stop
from kfac_train.errors import UserError
from kfac_train.hydra_setup import launch_run_id, register_configs
from kfac_train.optim.first_order import build_optimizer
from kfac_train.optim.graft import LayerwiseGraft
from kfac_train.optim.preconditioner import build_preconditioner
from kfac_train.registry import DATA, LOGGERS, MODELS, TASKS
from kfac_train.schedules.controller import ScheduleController
from kfac_train.schedules.lr import lr_multiplier
from kfac_train.validation import validate

log = logging.getLogger("kfac_train")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_run_dir(config: RunConfig) -> Path:
    """`output_dir` if set, else Hydra's run directory, else ``outputs/<date>/<time>``."""
    if config.output_dir:
        return Path(config.output_dir)
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / launch_run_id()


def total_training_steps(config: RunConfig, steps_per_epoch: int) -> int:
    """min(max_steps, ceil(max_epochs · steps_per_epoch)); one of the two must be set."""
    limits = []
    if config.trainer.max_steps is not None:
        limits.append(config.trainer.max_steps)
    if config.trainer.max_epochs is not None:
        limits.append(math.ceil(config.trainer.max_epochs * steps_per_epoch))
    if not limits:
        raise UserError("set trainer.max_steps or trainer.max_epochs (the run has no end)")
    total = min(limits)
    if total <= 0:
        raise UserError(f"the run has {total} steps: raise trainer.max_steps/max_epochs")
    return total


def check_input_channels(config: RunConfig, data: DataBundle) -> None:
    """A one-line error when the data's images have another channel count than the model takes
    (``model.in_channels``), before the first forward would fail with a shape error."""
    wanted = getattr(config.model, "in_channels", None)
    have = data.image_channels
    if wanted is not None and have is not None and wanted != have:
        raise UserError(
            f"model.in_channels={wanted}, but data={config.data.name} has {have}-channel "
            f"images: add model.in_channels={have}"
        )


def prepare_model(module: nn.Module, config: RunConfig, dist_info: DistInfo) -> nn.Module:
    """Move to the device (channels-last if asked); wrap in DDP, or shard with FSDP2
    (`trainer.parallelism=fsdp`), for several ranks."""
    module.to(dist_info.device)
    if config.trainer.channels_last:
        module.to(memory_format=torch.channels_last)
    model: nn.Module = module
    if config.trainer.parallelism not in ("ddp", "fsdp"):
        raise UserError(f"trainer.parallelism={config.trainer.parallelism}: choose ddp or fsdp")
    if dist_info.is_distributed and config.trainer.parallelism == "fsdp":
        model = shard_model(module)  # the same module, now FSDP2-sharded (engine/sharding.py)
    elif dist_info.is_distributed:
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
    return model


def train(cfg: DictConfig | RunConfig) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to summary.json by rank 0)."""
    set_offline_environment()
    register_configs()
    config = to_run_config(cfg)
    validate(config)  # train.py validated already, before Hydra made the run directory
    dist_info = init_distributed(config.trainer.device)
    try:
        return _train(config, cfg, dist_info)
    finally:
        teardown()


def _train(config: RunConfig, cfg: DictConfig | RunConfig, dist_info: DistInfo) -> dict[str, Any]:
    if config.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    if config.trainer.cpu_threads is not None:
        torch.set_num_threads(config.trainer.cpu_threads)
    seed_everything(config.seed)
    plan = plan_batches(config.batch.size, config.trainer.micro_batch, dist_info.world_size)
    ctx = BuildContext(config, dist_info, plan.micro_batch, plan.accumulation_steps)

    task = TASKS.build(config.task.name, config.task, ctx)
    ctx = ctx.with_task(task)
    data = DATA.build(config.data.name, config.data, ctx)
    task.set_eval_info(data.eval_info)
    check_input_channels(config, data)
    module = MODELS.build(config.model.name, config.model, ctx)
    wrapped = prepare_model(module, config, dist_info)

    micro_per_epoch = len(data.train)
    steps_per_epoch = micro_per_epoch // plan.accumulation_steps
    if steps_per_epoch == 0:
        raise UserError(
            f"one epoch has {micro_per_epoch} micro-batches per rank, fewer than one optimizer "
            f"step ({plan.accumulation_steps} micro-batches of {plan.micro_batch}): "
            "lower batch.size"
        )
    total_steps = total_training_steps(config, steps_per_epoch)

    optimizer = build_optimizer(module, config.optim)
    scaler = make_grad_scaler(config.trainer.precision, dist_info.device)
    autocast = autocast_factory(config.trainer.precision, dist_info.device)
    preconditioner = build_preconditioner(
        config.optim.preconditioner,
        wrapped,  # K-FAC hooks the modules themselves, not a compiled graph
        optimizer,
        kfac=config.kfac,
        strategy=config.strategy,
        schedule_unit=config.schedule.unit,
        steps_per_epoch=steps_per_epoch,
        accumulation_steps=plan.accumulation_steps,
        grad_scaler=scaler,
    )
    graft = (
        LayerwiseGraft.for_preconditioner(preconditioner)
        if config.optim.preconditioner == "kfac" and config.kfac.graft
        else None
    )
    model = torch.compile(wrapped) if config.trainer.compile else wrapped
    schedule = ScheduleController(
        optimizer,
        lr_multiplier(config.schedule, total_steps, steps_per_epoch),
        config.schedule.momentum_tied,
    )

    run_dir = Path(broadcast_object(str(resolve_run_dir(config))))
    checkpoint_dir = Path(config.checkpoint.dir)
    if not checkpoint_dir.is_absolute():
        checkpoint_dir = run_dir / checkpoint_dir
    config_yaml = OmegaConf.to_yaml(OmegaConf.structured(config))
    outputs, loggers = None, []
    if dist_info.is_main:
        outputs = RunOutputs(run_dir)
        outputs.write_config(config_yaml)
        config_dict = OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
        assert isinstance(config_dict, dict)
        loggers = LOGGERS.build(
            config.logger.name, config.logger, str(run_dir), config_dict, total_steps
        )

    parts = Components(
        config=config,
        dist=dist_info,
        plan=plan,
        task=task,
        data=data,
        module=module,
        model=model,
        optimizer=optimizer,
        preconditioner=preconditioner,
        schedule=schedule,
        scaler=scaler,
        autocast=autocast,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        checkpoint_dir=checkpoint_dir,
        config_yaml=config_yaml,
        outputs=outputs,
        loggers=loggers,
        graft=graft,
    )
    trainer = Trainer(parts)
    # Per-rank random streams (dropout, augmentation) from here on; weights were initialised
    # identically on every rank above.
    seed_everything(config.seed + dist_info.rank)
    trainer.resume(config.checkpoint.resume)
    for logger in loggers:
        logger.message(
            f"run {run_dir}: model={config.model.name} data={config.data.name} "
            f"optim={config.optim.base}+{config.optim.preconditioner} "
            f"batch {plan.global_batch} = {plan.micro_batch} x {plan.world_size} ranks x "
            f"{plan.accumulation_steps} accumulation, {total_steps} steps "
            f"({steps_per_epoch} per epoch) on {dist_info.device}"
        )
    try:
        summary = trainer.run()
    finally:
        if outputs is not None:
            outputs.close()
    summary["run_dir"] = str(run_dir)
    if outputs is not None:
        outputs.write_summary(summary)
        for logger in loggers:
            logger.message(_final_line(summary))
            logger.close(summary)
        if trainer.requeue_signal is not None:  # after every output is written
            requeue_after_stop(trainer.requeue_signal, resume=config.checkpoint.resume)
    return summary


def _final_line(summary: dict[str, Any]) -> str:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items())
    return (
        f"{summary['status']}: {summary['steps']} steps in {summary['train_time']:.1f} s"
        + (f"; eval {metrics}" if metrics else "")
        + f"; outputs in {summary['run_dir']}"
    )


def set_offline_environment() -> None:
    """Keep Hugging Face libraries from reaching the hub (nothing is downloaded at run time)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
