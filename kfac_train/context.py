"""`BuildContext`: what every component builder may read besides its own config node.

Builders (models, data, tasks) receive ``(cfg, ctx)``. The context is immutable: the task is
built first from a context without a task, and `BuildContext.with_task` gives the context that
data and model builders receive. Builders read from the context and return what they make;
facts the task needs from the data (e.g. the evaluation ground truth) travel in the returned
`DataBundle.eval_info`, which the application hands to `Task.set_eval_info`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from kfac_train.config import ModelConfig, RunConfig
    from kfac_train.distributed import DistInfo


class BuiltTask(Protocol):
    """What builders may use of the run's task (a `kfac_train.tasks.base.Task`).

    Declared here so that this module does not depend on the task interface, which depends on
    it. Builders that need a particular task check it with ``isinstance``.
    """

    def synthetic_batch(
        self, model_cfg: ModelConfig, batch_size: int, generator: torch.Generator
    ) -> Any:
        """A random batch shaped like real data for `model_cfg` (``data=synthetic``)."""
        ...


@dataclass(frozen=True)
class BuildContext:
    """What every builder may read besides its own config node.

    Attributes:
        config: the whole typed run configuration (read, never mutate).
        dist: rank, world size, local rank and the device of this process.
        micro_batch: samples per forward/backward on this rank.
        accumulation_steps: micro-batches per optimizer step.
        task: the task of this run (None in the context the task itself is built from).
    """

    config: RunConfig
    dist: DistInfo
    micro_batch: int
    accumulation_steps: int
    task: BuiltTask | None = None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def with_task(self, task: BuiltTask) -> BuildContext:
        """This context, with the run's task (for the data and model builders)."""
        return dataclasses.replace(self, task=task)
