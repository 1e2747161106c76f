"""Typed configuration schemas (plain dataclasses) with the allowed values of every option.

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

Allowed values are declared here, next to each field, and nowhere else: `one_of` (a fixed set
of choices) and `within` (a numeric `Range`) store them in the dataclass field's metadata, and
`kfac_train.validation.validate` checks every field of a composed `RunConfig` against them
(plus the few rules that relate two fields). Hydra only sees plain ``str``/``int``/``float``
fields, so a bad value is reported by the validator in one line (exit status 2), not by
OmegaConf. Hydra's ConfigStore registration and resolvers live in `kfac_train.hydra_setup`.

Library code never receives a DictConfig: `to_run_config` turns the composed config into these
dataclasses (``OmegaConf.to_object``) and builders get their own node as a dataclass instance.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from omegaconf import MISSING, DictConfig, OmegaConf

from kfac_train.errors import UserError
from kfac_train.kfac import KFACPreconditioner


# ---------------------------------------------------------------------------------------------
# Allowed values, attached to fields as metadata.
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A numeric interval; ``None`` ends are unbounded, ``*_open`` ends exclude the bound.

    Every admitted value is finite (``nan`` and ``inf`` are refused).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def admits(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return (
                "a finite number"
                if self.low is None
                else (f"{'>' if self.low_open else '>='} {self.low:g}")
            )
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)
AT_LEAST_ONE = Range(low=1)
FRACTION = Range(0, 1, low_open=True)  # (0, 1]
UNIT_INTERVAL = Range(0, 1)  # [0, 1]
DECAY = Range(0, 1, high_open=True)  # [0, 1)
OPEN_UNIT_INTERVAL = Range(0, 1, low_open=True, high_open=True)  # (0, 1)

#: Names of the floating dtypes K-FAC can store factors, second-order data and messages in.
DTYPES = ("float32", "bfloat16", "float16", "float64")
PRECISIONS = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
PARALLELISMS = ("ddp", "fsdp")
PROGRESS_MODES = ("auto", "bar", "lines", "off")
WANDB_MODES = ("offline", "online", "disabled")
SCHEDULE_UNITS = ("epoch", "step")
PRECONDITIONERS = ("none", "kfac")
COMPUTE_METHODS = ("eigen", "inverse")
BATCHNORM_MODES = ("skip", "unit_wise")
EMBEDDING_MODES = ("skip", "diagonal")
LAYERNORM_MODES = ("skip", "unit_wise")
CONV_FACTORS = ("patches", "spatial_mean")
GRAD_SCALINGS = ("mean", "per_example")
ASSIGNMENT_COSTS = ("compute", "memory")
STALE_MODES = ("off", "adaptive")
FACTOR_INITS = ("identity", "first_batch")
FISHER_ESTIMATES = ("empirical", "mc")


def one_of(default: Any, choices: tuple[str, ...]) -> Any:
    """A field whose value must be one of `choices` (None allowed if the field is Optional)."""
    return field(default=default, metadata={"choices": choices})


def within(default: Any, allowed: Range, *, ascending: bool = False) -> Any:
    """A numeric field (or list of numbers) whose values must lie in `allowed`.

    For lists, `ascending=True` also requires non-decreasing order (milestones).
    """
    metadata = {"range": allowed, "ascending": ascending}
    if isinstance(default, list):
        values = list(default)
        return field(default_factory=lambda: list(values), metadata=metadata)
    return field(default=default, metadata=metadata)


def library_default(name: str) -> Any:
    """The default of `KFACPreconditioner`'s argument `name` (written once, in the library)."""
    return inspect.signature(KFACPreconditioner).parameters[name].default


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
    num_workers: int = within(0, NON_NEGATIVE)


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

    preconditioner: str = one_of("none", PRECONDITIONERS)
    base: str = "sgd"
    lr: float = within(0.1, POSITIVE)
    momentum: float = within(0.9, DECAY)
    nesterov: bool = False
    weight_decay: float = within(0.0, NON_NEGATIVE)
    betas: list[float] = within([0.9, 0.999], DECAY)
    eps: float = within(1e-8, POSITIVE)
    trust_coefficient: float = within(0.001, POSITIVE)
    exclude_norm_and_bias_from_weight_decay: bool = False
    grad_clip_norm: Optional[float] = within(None, POSITIVE)


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
    unit: str = one_of("epoch", SCHEDULE_UNITS)
    warmup: float = within(0.0, NON_NEGATIVE)
    warmup_start_factor: float = within(0.0, UNIT_INTERVAL)
    milestones: list[float] = within([], NON_NEGATIVE, ascending=True)
    gamma: float = within(0.1, POSITIVE)
    decay_start: float = within(0.0, NON_NEGATIVE)
    decay_end: Optional[float] = within(None, NON_NEGATIVE)
    power: float = within(2.0, POSITIVE)
    final_factor: float = within(0.0, UNIT_INTERVAL)
    momentum_tied: bool = False


@dataclass
class KFACConfig:
    """K-FAC hyperparameters (used when ``optim.preconditioner=kfac``); see docs/kfac.md.

    `async_inverse`: second-order data computed off the critical path from the factors of an
    inverse-update step and installed `async_delay` steps later (reproducible, resumable).
    `damping_milestones` (in `schedule.unit`) multiply the damping by `damping_gamma` at each
    milestone; `interval_milestones` multiply both update intervals by `interval_factor`. Dtypes are
    names of torch dtypes (`DTYPES`); `precondition_dtype`: the dtype of the preconditioning
    products (None: float32 or better; bfloat16: 4-5x faster products on bf16-capable CPUs and GPUs,
    best with `inv_dtype=bfloat16` and `compute_method=eigen`). `inv_update_steps` must be a
    multiple of `factor_update_steps` (second-order data is recomputed right after a factor update,
    never from factors that have not changed). `damping`, `factor_decay` and `kl_clip` default to
    the library's defaults (`KFACPreconditioner`), `grad_scaling` too ("per_example": the Kronecker
    blocks approximate the per-example Fisher, so `damping` is relative to curvature; "mean":
    KAISA's convention, for recipes tuned with it). `adaptive_damping`: Levenberg–Marquardt damping
    (every `damping_adapt_interval` steps, multiplied or divided by `damping_adapt_decay **
    damping_adapt_interval`, kept in [`min_damping`, `max_damping`]); `damping` is then its initial
    value and `damping_milestones` must be empty. `stale=adaptive`: SP-NGD's per-statistic refresh
    intervals with similarity threshold `stale_threshold` (the library's `stale`). `fisher=mc`: G
    from the loss of `mc_samples` label draws from the model's predictive distribution
    (`Task.sample_fisher_loss`); `empirical`: from the true loss. `factor_init`: the running
    averages start at the identity (KAISA, kfac-pytorch) or, with `first_batch`, at the first step's
    statistics (factor decay 0 at step 0), so early factors have the data's scale whatever the
    convention. `graft`: layer-wise grafting (`kfac_train.optim.graft`): each preconditioned
    tensor moves along K-FAC's direction by the length of the base optimizer's step on the plain
    gradient.
    """

    factor_update_steps: int = within(10, AT_LEAST_ONE)
    inv_update_steps: int = within(100, AT_LEAST_ONE)
    damping: float = within(library_default("damping"), POSITIVE)
    factor_decay: float = within(library_default("factor_decay"), DECAY)
    factor_init: str = one_of("identity", FACTOR_INITS)
    kl_clip: Optional[float] = within(library_default("kl_clip"), POSITIVE)
    compute_method: str = one_of("eigen", COMPUTE_METHODS)
    factored_damping: bool = False
    batchnorm: str = one_of("skip", BATCHNORM_MODES)
    embedding: str = one_of("skip", EMBEDDING_MODES)
    layernorm: str = one_of("skip", LAYERNORM_MODES)
    conv_factor: str = one_of("patches", CONV_FACTORS)
    grad_scaling: str = one_of(library_default("grad_scaling"), GRAD_SCALINGS)
    skip_layers: list[str] = field(default_factory=list)
    factor_dtype: str = one_of("float32", DTYPES)
    inv_dtype: str = one_of("float32", DTYPES)
    precondition_dtype: Optional[str] = one_of(None, DTYPES)
    damping_milestones: list[float] = within([], NON_NEGATIVE, ascending=True)
    damping_gamma: float = within(0.5, POSITIVE)
    interval_milestones: list[float] = within([], NON_NEGATIVE, ascending=True)
    interval_factor: int = within(10, AT_LEAST_ONE)
    stale: str = one_of(library_default("stale"), STALE_MODES)
    stale_threshold: float = within(library_default("stale_threshold"), POSITIVE)
    fisher: str = one_of("empirical", FISHER_ESTIMATES)
    mc_samples: int = within(1, AT_LEAST_ONE)
    adaptive_damping: bool = False
    damping_adapt_interval: int = within(5, AT_LEAST_ONE)
    damping_adapt_decay: float = within(0.95, OPEN_UNIT_INTERVAL)
    min_damping: float = within(1e-8, POSITIVE)
    max_damping: float = within(100.0, POSITIVE)
    async_inverse: bool = False
    async_delay: int = within(1, AT_LEAST_ONE)
    graft: bool = False


@dataclass
class StrategyConfig:
    """KAISA's memory/communication trade-off (distributed K-FAC runs).

    `grad_worker_fraction`: a float in (0, 1] or "comm-opt" (1), "hybrid-opt" (1/2),
    "mem-opt" (1/world size) or "auto" (strategy=auto: the least-traffic fraction whose K-FAC
    state fits `memory_budget_mb` MiB per rank); the library's `resolve_grad_worker_fraction`
    decides what is accepted (``mem_opt`` is the same name). The option files of
    ``conf/strategy/`` are presets of this value; the chosen option's name is Hydra's
    (``.hydra/hydra.yaml``: runtime.choices). `comm_dtype`: None = the factor dtype.
    """

    grad_worker_fraction: Union[float, str] = "comm-opt"
    memory_budget_mb: Optional[float] = within(None, POSITIVE)
    bucket_cap_mb: float = within(25.0, POSITIVE)
    symmetry_aware: bool = False
    comm_dtype: Optional[str] = one_of(None, DTYPES)
    colocate_factors: bool = True
    assignment_cost: str = one_of("compute", ASSIGNMENT_COSTS)
    overlap_comm: bool = True


@dataclass
class BatchConfig:
    """The global batch (samples per optimizer step, all ranks and micro-batches together)."""

    size: int = within(64, AT_LEAST_ONE)


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl: console only, or also Weights & Biases.

    Attributes:
        progress: "auto" (bar on a terminal, plain lines otherwise), "bar", "lines", "off".
        wandb_mode: offline, online or disabled (wandb only).
    """

    name: str = "console"
    progress: str = one_of("auto", PROGRESS_MODES)
    wandb_project: str = "kfac-train"
    wandb_entity: Optional[str] = None
    wandb_mode: str = one_of("offline", WANDB_MODES)
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

    max_steps: Optional[int] = within(None, AT_LEAST_ONE)
    max_epochs: Optional[float] = within(None, POSITIVE)
    micro_batch: Optional[int] = within(None, AT_LEAST_ONE)
    device: str = one_of("auto", DEVICES)
    precision: str = one_of("fp32", PRECISIONS)
    eval_every: int = within(0, NON_NEGATIVE)
    log_every: int = within(10, AT_LEAST_ONE)
    target_metric: Optional[str] = None
    target_value: Optional[float] = within(None, Range())
    target_mode: str = one_of("max", ("max", "min"))
    deterministic: bool = False
    channels_last: bool = False
    compile: bool = False
    cpu_threads: Optional[int] = within(None, AT_LEAST_ONE)
    parallelism: str = one_of("ddp", PARALLELISMS)


@dataclass
class CheckpointConfig:
    """Checkpointing.

    Attributes:
        every: save every this many optimizer steps (0 = only at the end and on SIGTERM/SIGUSR1).
        resume: a checkpoint path, "auto" (latest in `dir` if any) or None.
        keep_last: number of step checkpoints of the run's lineage kept in `dir` (0 = keep all).
        dir: directory of checkpoints (relative paths are inside the run directory).
        at_end: save a final checkpoint when training finishes.
    """

    every: int = within(0, NON_NEGATIVE)
    resume: Optional[str] = None
    keep_last: int = within(2, NON_NEGATIVE)
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
