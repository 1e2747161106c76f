"""The task interface: what the one training loop needs to know about a workload.

A task turns a micro-batch into a loss (training) and into metrics (evaluation). The engine
owns everything else: devices, DDP, accumulation, precision, the (preconditioned) optimizer,
schedules, logging and checkpoints. Classification, detection, segmentation and masked-LM
pretraining differ only here.

Conventions:
- A batch is whatever the data option's loader yields (a tuple, dict or dataclass of tensors).
  `move_batch` puts it on the device; the default moves every tensor found in nested
  tuples/lists/dicts.
- `training_loss` returns the loss of one micro-batch as a 0-d tensor, **averaged over the
  micro-batch** (the engine divides by the accumulation steps), and optional extra 0-d tensors
  to log. It must not call ``.item()`` (no host syncs in the step).
- `sample_fisher_loss` (optional) returns the loss of labels sampled from the model's
  predictive distribution, for ``kfac.fisher=mc``; tasks without a sampling rule refuse it.
- An `Evaluator` accumulates tensors over this rank's share of the evaluation set (shards do not
  overlap) and `compute()` reduces them across ranks — a collective every rank calls — and
  returns plain floats, identical on every rank.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kfac_train.config import ModelConfig, TaskConfig
from kfac_train.context import BuildContext
from kfac_train.distributed import all_reduce_sum
from kfac_train.errors import UserError


@dataclass
class LossOutput:
    """`loss`: 0-d tensor (mean over the micro-batch); `logs`: extra 0-d tensors to log;
    `output`: the model output the loss came from (what `Task.sample_fisher_loss` reads)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    output: Any = None


class Evaluator(abc.ABC):
    """Accumulates evaluation statistics on one rank; `compute` reduces them over all ranks."""

    @abc.abstractmethod
    def update(self, model: nn.Module, batch: Any) -> None:
        """Add one evaluation micro-batch (already on the device; model in eval mode, no grad)."""

    @abc.abstractmethod
    def compute(self) -> dict[str, float]:
        """Metrics over the whole evaluation set. Collective: call on every rank."""


class SumEvaluator(Evaluator):
    """Evaluator whose metrics are ratios of sums: subclasses add named sums in `update`.

    `compute` all-reduces every sum and returns ``numerator / denominator`` for each entry of
    `ratios`, e.g. ``{"accuracy": ("correct", "count")}`` (NaN when the denominator is 0).
    """

    def __init__(self, ratios: Mapping[str, tuple[str, str]]) -> None:
        self.ratios = dict(ratios)
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        """Add `value` (0-d tensor, any device) to the running sum `name` (kept as float64)."""
        value = value.detach().to(torch.float64)
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def compute(self) -> dict[str, float]:
        names = sorted({n for pair in self.ratios.values() for n in pair} | set(self.sums))
        device = next(iter(self.sums.values())).device if self.sums else torch.device("cpu")
        stacked = torch.stack(
            [self.sums.get(n, torch.zeros((), dtype=torch.float64, device=device)) for n in names]
        )
        totals = dict(zip(names, all_reduce_sum(stacked).tolist(), strict=True))
        return {
            metric: totals[num] / totals[den] if totals[den] else float("nan")
            for metric, (num, den) in self.ratios.items()
        }


class Task(abc.ABC):
    """One workload's loss and metrics. Subclasses are registered with `TASKS.register`.

    Args:
        cfg: the task's config node (its registered schema).
        ctx: the build context (the task is built first: `ctx.task` is None here).
    """

    def __init__(self, cfg: TaskConfig, ctx: BuildContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    def move_batch(self, batch: Any, device: torch.device) -> Any:
        """The batch with every tensor on `device` (non-blocking copies)."""
        return move_to_device(batch, device)

    def batch_size(self, batch: Any) -> int:
        """Number of samples in a micro-batch (default: length of the first tensor found)."""
        tensor = first_tensor(batch)
        if tensor is None:
            raise TypeError(f"cannot infer the batch size of {type(batch).__name__}")
        return int(tensor.shape[0])

    #: what the throughput in the logs counts (``<unit>_per_s``): samples, or tokens for BERT
    throughput_unit: str = "samples"

    def throughput_count(self, batch: Any) -> int:
        """How many `throughput_unit` a micro-batch holds (shapes only: no host sync)."""
        return self.batch_size(batch)

    def set_eval_info(self, info: Mapping[str, Any]) -> None:
        """Facts about the evaluation set from the data builder (`DataBundle.eval_info`).

        Called once by the application after the data is built; tasks whose evaluator needs
        more than the batches read their keys here (e.g. ``coco_ground_truth``,
        ``num_eval_volumes``). The default ignores them.
        """
        del info

    @abc.abstractmethod
    def training_loss(self, model: nn.Module, batch: Any) -> LossOutput:
        """Forward pass and loss of one micro-batch (mean over its samples)."""

    @abc.abstractmethod
    def evaluator(self) -> Evaluator:
        """A fresh evaluator for one pass over the evaluation set."""

    def synthetic_batch(
        self, model_cfg: ModelConfig, batch_size: int, generator: torch.Generator
    ) -> Any:
        """A random batch shaped like real data for `model_cfg` (used by ``data=synthetic``)."""
        raise UserError(
            f"data=synthetic is not available for task={self.cfg.name}: choose a real dataset"
        )

    def sample_fisher_loss(self, output: Any, batch: Any) -> torch.Tensor:
        """The loss of labels drawn from the model's predictive distribution (``kfac.fisher=mc``,
        the Monte-Carlo Fisher of Ba et al. Eq. 1 / SP-NGD's F_1mc), averaged like
        `training_loss`.

        `output` is `LossOutput.output` of this micro-batch's `training_loss` (its graph is kept);
        the labels are drawn without gradient, the loss stays differentiable in `output`. Tasks
        without a sampling rule keep this default, which refuses (`samples_fisher`).
        """
        raise UserError(
            f"kfac.fisher=mc: task={self.cfg.name} has no rule to sample labels from its "
            "predictive distribution; use kfac.fisher=empirical"
        )

    @classmethod
    def samples_fisher(cls) -> bool:
        """Whether the task implements `sample_fisher_loss` (checked when the config is)."""
        return cls.sample_fisher_loss is not Task.sample_fisher_loss

    def after_optimizer_step(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Hook run after every optimizer step (e.g. weight rescaling). Default: nothing."""


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Recursively move tensors in tuples, lists, dicts and dataclasses to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if hasattr(batch, "__dataclass_fields__"):
        return type(batch)(
            **{k: move_to_device(getattr(batch, k), device) for k in batch.__dataclass_fields__}
        )
    return batch


def first_tensor(batch: Any) -> torch.Tensor | None:
    """The first tensor found in a nested batch (depth-first), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        values: Any = batch.values()
    elif isinstance(batch, (list, tuple)):
        values = batch
    elif hasattr(batch, "__dataclass_fields__"):
        values = [getattr(batch, k) for k in batch.__dataclass_fields__]
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def sample_categorical(logits: torch.Tensor) -> torch.Tensor:
    """One label per row of `logits` ``(..., C)`` drawn from ``softmax(logits)`` (no gradient;
    the torch random generator of the logits' device)."""
    probs = torch.softmax(logits.detach().float(), dim=-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1).view(logits.shape[:-1])
