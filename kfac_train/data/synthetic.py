"""Random batches shaped like the model's real inputs, for smoke and throughput runs.

The task decides the batch structure (`Task.synthetic_batch`); batch i of epoch e on rank r is
drawn from a generator seeded by (seed, e, r, i), so runs and resumed runs see the same data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kfac_train.config import DataConfig
from kfac_train.data.base import DataBundle
from kfac_train.errors import UserError
from kfac_train.registry import DATA, BuildContext
from kfac_train.tasks.base import Task


@dataclass
class SyntheticConfig(DataConfig):
    """`num_train` / `num_eval`: samples per epoch / in the evaluation set (all ranks)."""

    name: str = "synthetic"
    num_train: int = 1024
    num_eval: int = 256


def _seed(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 1_000_003 + part) % (2**63 - 1)
    return value


class SyntheticLoader:
    """`EpochLoader` of `num_batches` random micro-batches per epoch on this rank."""

    def __init__(self, task: Task, ctx: BuildContext, num_batches: int, stream: int) -> None:
        self.task, self.ctx, self.num_batches, self.stream = task, ctx, num_batches, stream
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __iter__(self) -> Iterator[Any]:
        for index in range(self.skip, self.num_batches):
            seed = _seed(self.ctx.config.seed, self.stream, self.epoch, self.ctx.dist.rank, index)
            generator = torch.Generator().manual_seed(seed)
            yield self.task.synthetic_batch(self.ctx.config.model, self.ctx.micro_batch, generator)

    def __len__(self) -> int:
        return self.num_batches


@DATA.register("synthetic", schema=SyntheticConfig)
def build_synthetic(cfg: SyntheticConfig, ctx: BuildContext) -> DataBundle:
    assert ctx.task is not None, "the task is built before the data"
    per_step = ctx.micro_batch * ctx.dist.world_size
    num_batches = cfg.num_train // per_step
    if num_batches == 0:
        raise UserError(
            f"data.num_train={cfg.num_train} is smaller than one micro-batch on every rank "
            f"({ctx.micro_batch} x {ctx.dist.world_size}): raise data.num_train"
        )
    eval_batches = max(1, cfg.num_eval // per_step) if cfg.num_eval > 0 else 0
    evaluation = SyntheticLoader(ctx.task, ctx, eval_batches, stream=1) if eval_batches else None
    return DataBundle(
        train=SyntheticLoader(ctx.task, ctx, num_batches, stream=0),
        eval=evaluation,
        num_train_samples=num_batches * per_step,
    )
