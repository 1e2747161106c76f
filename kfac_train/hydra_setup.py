"""Hydra bootstrap: schemas into the ConfigStore, the resolvers, and validation before the run.

`kfac_train.config` holds plain schemas; this module connects them to Hydra:

- `register_configs()` stores the root schema as ``run_config``, each shared-schema group's
  schema as ``<group>_schema`` and every registered per-option schema (models, data, tasks) as
  ``<group>/<option>_schema``, after importing every component module;
- the resolvers ``${kfac_run_id:}`` (the run directory name, `launch_run_id`) and
  ``${kfac_rank_suffix:}`` (per-rank log file names) used by ``conf/config.yaml``;
- `ValidateBeforeRun`, a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``) that
  validates the composed configuration before Hydra creates or writes into the run directory.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kfac_train.config import (
    BatchConfig,
    LoggerConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    StrategyConfig,
    to_run_config,
)
from kfac_train.errors import UserError

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
    """ "" on rank 0 (or a single process), "_rank<r>" on other ranks (per-rank log files)."""
    from kfac_train.cli import launched_rank

    rank = launched_rank()
    return "" if rank == 0 else f"_rank{rank}"


def register_configs() -> None:
    """Store the root schema and every option schema in Hydra's ConfigStore (idempotent)."""
    global _registered
    if _registered:
        return
    OmegaConf.register_new_resolver("kfac_run_id", lambda: launch_run_id(), replace=True)
    OmegaConf.register_new_resolver("kfac_rank_suffix", rank_suffix, replace=True)
    store = ConfigStore.instance()
    store.store(name="run_config", node=RunConfig)
    for group, schema in SHARED_SCHEMAS.items():
        store.store(group=group, name=f"{group}_schema", node=schema)
    from kfac_train.registry import ALL_REGISTRIES

    for registry in ALL_REGISTRIES:
        for option, schema in registry.schemas().items():
            store.store(group=registry.group, name=f"{option}_schema", node=schema)
    _registered = True


def job_config(cfg: DictConfig) -> DictConfig:
    """A copy of Hydra's composed config without its ``hydra`` node (what the job receives)."""
    job = copy.deepcopy(cfg)
    with read_write(job), open_dict(job):
        job.pop("hydra", None)
    return job


class ValidateBeforeRun(Callback):
    """Refuse a bad configuration before Hydra makes the run directory.

    Hydra calls ``on_run_start`` after composing the config and before ``run_job`` creates
    ``hydra.run.dir`` and writes ``.hydra/`` and the log file into it, so a refused run leaves
    an existing run directory untouched. The error is printed as one line and the process
    exits with status 2, like every `UserError` (``train.py``). Sweeps (``-m``) are validated
    per job by `kfac_train.app.train`.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from kfac_train.cli import report_user_error
        from kfac_train.validation import validate

        try:
            validate(to_run_config(job_config(config)))
        except UserError as error:
            report_user_error(error)
            sys.exit(2)
