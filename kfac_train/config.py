"""Typed configuration schemas (Hydra structured configs) and their registration.

Layout of the composed config (``python train.py --cfg job`` prints it)::

    model:    ModelConfig subclass, one schema per option   (conf/model/<name>.yaml)
    data:     DataConfig subclass, one schema per option    (conf/data/<name>.yaml)
    task:     TaskConfig subclass, one schema per option    (conf/task/<name>.yaml)
    optim:    OptimConfig   (one schema; options are presets)  (conf/optim/)
    schedule: ScheduleConfig (one schema; options are presets) (conf/schedule/)
    strategy: StrategyConfig (one schema)                      (conf/strategy/)
    batch:    BatchConfig    (one schema; options named by size) (conf/batch/)
    logger:   LoggerConfig   (one schema)                      (conf/logger/)
    kfac, trainer, checkpoint, seed, output_dir: plain nodes with defaults below.

Groups whose options differ in kind (model, data, task) use one dataclass per option; groups
that recipes must be able to change by value (optim, schedule, strategy, batch) share one
schema, because a recipe file (``conf/recipe/``) may set values but cannot switch options.

Library code never receives a DictConfig: `to_run_config` turns the composed config into these
dataclasses (``OmegaConf.to_object``) and builders get their own node as a dataclass instance.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kfac_train.errors import UserError


# ---------------------------------------------------------------------------------------------
# Base schemas of the per-option groups. Options subclass these and set `name` to their option.
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Base of every model option's schema.

    Attributes:
        name: the registered model name (the option name).
        baseline_optim: the workload's first-order optimizer (`optim.base` of ``optim=kfac``
            defaults to it): sgd, lars, lamb, adam or adamw.
        weights: optional local file with a state dict to initialise from (never downloaded).
    """

    name: str = MISSING
    baseline_optim: str = "sgd"
    weights: Optional[str] = None


@dataclass
class ClassifierConfig(ModelConfig):
    """Image classifiers: inputs (B, in_channels, image_size, image_size), logits (B, classes)."""

    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32


@dataclass
class DataConfig:
    """Base of every data option's schema.

    Attributes:
        name: the registered dataset name (the option name).
        root: directory holding the data on disk (None for bundled or generated data).
        num_workers: DataLoader worker processes per rank (0 = load in the training process).
    """

    name: str = MISSING
    root: Optional[str] = None
    num_workers: int = 0


@dataclass
class TaskConfig:
    """Base of every task option's schema (`name` is the registered task name)."""

    name: str = MISSING


# ---------------------------------------------------------------------------------------------
# Shared-schema groups.
# ---------------------------------------------------------------------------------------------
@dataclass
class OptimConfig:
    """The optimizer: a first-order `base` optimizer and an optional preconditioner.

    Every base optimizer reads the fields it understands: sgd (lr, momentum, nesterov,
    weight_decay, dampening-free), lars (lr, momentum, weight_decay, trust_coefficient, eps),
    lamb (lr, betas, eps, weight_decay), adam/adamw (lr, betas, eps, weight_decay).

    Attributes:
        preconditioner: "none" for the baselines, "kfac" to precondition with K-FAC (settings in
            the top-level `kfac` node, distribution in `strategy`).
        base: registered base optimizer name (sgd, lars, lamb, adam, adamw).
        lr: peak learning rate (the schedule multiplies it per iteration).
        exclude_norm_and_bias_from_weight_decay: no weight decay on biases and 1-d parameters.
    """

    preconditioner: str = "none"
    base: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    trust_coefficient: float = 0.001
    exclude_norm_and_bias_from_weight_decay: bool = False
    grad_clip_norm: Optional[float] = None


@dataclass
class ScheduleConfig:
    """Per-iteration learning-rate schedule, a multiplier of `optim.lr`.

    Lengths are in `unit` ("epoch" or "step"); fractional epochs are allowed.

    Attributes:
        name: constant, multistep, poly or cosine.
        warmup: linear warmup length from `warmup_start_factor`·lr to lr (0 = none).
        milestones, gamma: multistep: multiply by `gamma` at each milestone.
        decay_start, decay_end, power: poly: constant until `decay_start`, then
            ``(1 - (t - start) / (end - start)) ** power`` down to `final_factor` at `decay_end`
            (None = end of training). cosine decays from `decay_start` to `decay_end` likewise.
        final_factor: the multiplier reached at the end of a poly/cosine decay.
        momentum_tied: momentum follows the rate: m(t) = momentum · lr(t)/lr (Osawa et al.).
    """

    name: str = "constant"
    unit: str = "epoch"
    warmup: float = 0.0
    warmup_start_factor: float = 0.0
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    decay_start: float = 0.0
    decay_end: Optional[float] = None
    power: float = 2.0
    final_factor: float = 0.0
    momentum_tied: bool = False


@dataclass
class KFACConfig:
    """K-FAC hyperparameters (used when ``optim.preconditioner=kfac``); see docs/kfac.md.

    `damping_milestones` (in `schedule.unit`) multiply the damping by `damping_gamma` at each
    milestone; `interval_milestones` multiply both update intervals by `interval_factor`.
    Dtypes are names of torch dtypes ("float32", "bfloat16", "float16").
    """

    factor_update_steps: int = 10
    inv_update_steps: int = 100
    damping: float = 0.001
    factor_decay: float = 0.95
    kl_clip: Optional[float] = 0.001
    compute_method: str = "eigen"
    factored_damping: bool = False
    batchnorm: str = "skip"
    conv_factor: str = "patches"
    grad_scaling: str = "mean"
    skip_layers: list[str] = field(default_factory=list)
    factor_dtype: str = "float32"
    inv_dtype: str = "float32"
    damping_milestones: list[float] = field(default_factory=list)
    damping_gamma: float = 0.5
    interval_milestones: list[float] = field(default_factory=list)
    interval_factor: int = 10


@dataclass
class StrategyConfig:
    """KAISA's memory/communication trade-off (distributed K-FAC runs).

    `grad_worker_fraction`: a float in (0, 1] or "comm-opt" (1), "hybrid-opt" (1/2),
    "mem-opt" (1/world size) or "auto" (strategy=auto: the least-traffic fraction whose K-FAC
    state fits `memory_budget_mb` MiB per rank). `comm_dtype`: None = the factor dtype.
    """

    name: str = "comm_opt"
    grad_worker_fraction: Union[float, str] = "comm-opt"
    memory_budget_mb: Optional[float] = None
    bucket_cap_mb: float = 25.0
    symmetry_aware: bool = False
    comm_dtype: Optional[str] = None
    colocate_factors: bool = True
    assignment_cost: str = "compute"
    overlap_comm: bool = True


@dataclass
class BatchConfig:
    """The global batch (samples per optimizer step, all ranks and micro-batches together)."""

    size: int = 64


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl: console only, or also Weights & Biases.

    Attributes:
        progress: "auto" (bar on a terminal, plain lines otherwise), "bar", "lines", "off".
        wandb_mode: offline, online or disabled (wandb only).
    """

    name: str = "console"
    progress: str = "auto"
    wandb_project: str = "kfac-train"
    wandb_entity: Optional[str] = None
    wandb_mode: str = "offline"
    wandb_tags: list[str] = field(default_factory=list)


@dataclass
class TrainerConfig:
    """The training loop.

    Attributes:
        max_steps: stop after this many optimizer steps (None = no step limit).
        max_epochs: stop after this many epochs, may be fractional (None = no epoch limit).
        micro_batch: samples per forward/backward per rank (None = global batch / world size).
        device: auto (cuda if available), cpu or cuda.
        precision: fp32, bf16 (autocast) or fp16 (autocast + GradScaler).
        eval_every: evaluate every this many steps (0 = at the end of every epoch); always at
            the end of training.
        log_every: write a metrics.jsonl record / progress line every this many steps.
        target_metric, target_value, target_mode: stop once eval metric `target_metric` is
            >= (mode "max") or <= (mode "min") `target_value`; summary.json records the time
            and steps to target.
        deterministic: use deterministic kernels (torch.use_deterministic_algorithms).
        channels_last: convert the model and image batches to channels-last memory format.
        compile: wrap the model in torch.compile.
        cpu_threads: torch intra-op threads (None = torch's default; 1 is fastest for small
            models on a busy machine).
        parallelism: ddp (replicated model, DistributedDataParallel) or fsdp (FSDP2
            `fully_shard` per block and the root; K-FAC gathers each layer's gradient).
    """

    max_steps: Optional[int] = None
    max_epochs: Optional[float] = None
    micro_batch: Optional[int] = None
    device: str = "auto"
    precision: str = "fp32"
    eval_every: int = 0
    log_every: int = 10
    target_metric: Optional[str] = None
    target_value: Optional[float] = None
    target_mode: str = "max"
    deterministic: bool = False
    channels_last: bool = False
    compile: bool = False
    cpu_threads: Optional[int] = None
    parallelism: str = "ddp"


@dataclass
class CheckpointConfig:
    """Checkpointing.

    Attributes:
        every: save every this many optimizer steps (0 = only at the end and on SIGTERM/SIGUSR1).
        resume: a checkpoint path, "auto" (latest in `dir` if any) or None.
        keep_last: number of step checkpoints kept in `dir`.
        dir: directory of checkpoints (relative paths are inside the run directory).
        at_end: save a final checkpoint when training finishes.
    """

    every: int = 0
    resume: Optional[str] = None
    keep_last: int = 2
    dir: str = "checkpoints"
    at_end: bool = True


@dataclass
class RunConfig:
    """The root of the composed configuration."""

    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    task: TaskConfig = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    kfac: KFACConfig = field(default_factory=KFACConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    output_dir: Optional[str] = None


SHARED_SCHEMAS: dict[str, type] = {
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "strategy": StrategyConfig,
    "batch": BatchConfig,
    "logger": LoggerConfig,
}

_registered = False


def launch_run_id(env: dict[str, str] | None = None) -> str:
    """The run directory name under ``outputs/``, identical on every rank of one launch.

    - Slurm: ``slurm-<job id>[_<array task>].<step id>`` (a requeued job gets the same name, so
      ``checkpoint.resume=auto`` finds its checkpoints);
    - torchrun: ``<date>/torchrun-<rendezvous id>`` (``--standalone`` draws a fresh one; with
      ``--rdzv-id`` unset, the torchrun agent's process id);
    - a single process: ``<date>/<time>``.
    """
    env = dict(os.environ if env is None else env)
    date = time.strftime("%Y-%m-%d")
    if "SLURM_JOB_ID" in env and ("SLURM_PROCID" in env or "RANK" in env):
        job = env["SLURM_JOB_ID"]
        if "SLURM_ARRAY_TASK_ID" in env:
            job = f"{env.get('SLURM_ARRAY_JOB_ID', job)}_{env['SLURM_ARRAY_TASK_ID']}"
        return f"slurm-{job}.{env.get('SLURM_STEP_ID', '0')}"
    if "TORCHELASTIC_RUN_ID" in env and "RANK" in env:
        run_id = env["TORCHELASTIC_RUN_ID"]
        if run_id in ("", "none"):
            run_id = f"agent{os.getppid()}"
        return f"{date}/torchrun-{run_id[:12]}"
    return f"{date}/{time.strftime('%H-%M-%S')}"


def rank_suffix() -> str:
    """"" on rank 0 (or a single process), "_rank<r>" on other ranks (per-rank log files)."""
    from kfac_train.cli import launched_rank

    rank = launched_rank()
    return "" if rank == 0 else f"_rank{rank}"


def register_configs() -> None:
    """Store the root schema and every option schema in Hydra's ConfigStore (idempotent).

    The root is stored as ``run_config``; each shared-schema group gets ``<group>_schema``;
    per-option schemas are stored by `Registry.register` when the component modules are
    imported here.
    """
    global _registered
    if _registered:
        return
    OmegaConf.register_new_resolver("kfac_run_id", lambda: launch_run_id(), replace=True)
    OmegaConf.register_new_resolver("kfac_rank_suffix", rank_suffix, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="run_config", node=RunConfig)
    for group, schema in SHARED_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=schema)
    from kfac_train.registry import discover_all

    discover_all()
    _registered = True


def to_run_config(cfg: DictConfig | RunConfig) -> RunConfig:
    """The typed `RunConfig` of a composed config (interpolations resolved)."""
    if isinstance(cfg, RunConfig):
        return cfg
    try:
        run_config = OmegaConf.to_object(cfg)
    except Exception as error:  # omegaconf reports missing values and bad interpolations here
        raise UserError(f"invalid configuration: {error}".splitlines()[0]) from error
    assert isinstance(run_config, RunConfig), type(run_config)
    return run_config


def format_config(cfg: Any) -> str:
    """YAML text of a config (a DictConfig or a dataclass instance)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg) if not isinstance(cfg, DictConfig) else cfg)
