"""The data interface: what a data builder returns, and helpers to build it from a Dataset.

A data option is a builder registered with `DATA.register(name, schema=...)`:

    builder(cfg: <its DataConfig subclass>, ctx: BuildContext) -> DataBundle

`DataBundle.train` is an `EpochLoader`: re-iterable, ``len()`` = micro-batches of a whole epoch
on this rank, and ``set_epoch(epoch, skip_batches)`` selects the epoch's shuffle (seeded by
``seed + epoch``, identical on every rank) and skips micro-batches already consumed (resume).
Each rank sees its own shard; every micro-batch has exactly ``ctx.micro_batch`` samples.
`DataBundle.eval` yields this rank's share of the evaluation set, without padding or overlap
between ranks, so that summed metrics count every sample once.

`make_train_loader` / `make_eval_loader` build both from a map-style `torch.utils.data.Dataset`;
other pipelines (e.g. DALI) implement `EpochLoader` themselves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kfac_train.context import BuildContext
from kfac_train.errors import UserError


@runtime_checkable
class EpochLoader(Protocol):
    """A training loader that can be positioned at (epoch, micro-batches already consumed)."""

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None: ...

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


@dataclass
class DataBundle:
    """What a data builder returns.

    Attributes:
        train: this rank's training micro-batches (see `EpochLoader`).
        eval: this rank's share of the evaluation set, or None when there is none.
        num_train_samples: training samples per epoch over all ranks (for samples/epoch logs).
        eval_info: facts about the evaluation set the task needs besides the batches (handed to
            `Task.set_eval_info`), e.g. ``{"coco_ground_truth": COCO}``. Builders return them
            here instead of changing the task.
        image_channels: channels of the input images, for image datasets whose channel count is
            fixed by the data (the app refuses a model with another ``model.in_channels`` in one
            line); None where the data follows the model (synthetic) or holds no images.
    """

    train: EpochLoader
    eval: Iterable[Any] | None
    num_train_samples: int
    eval_info: dict[str, Any] = field(default_factory=dict)
    image_channels: int | None = None


def require_dir(path: str | None, key: str = "data.root", example: str = "/path/to/data") -> str:
    """`path` if it is an existing directory; otherwise a `UserError` naming it and the key."""
    if path is None or path == "":
        raise UserError(f"{key} is not set: pass {key}={example}")
    expanded = os.path.expanduser(path)
    if not os.path.isdir(expanded):
        raise UserError(f"{key}={path} does not exist or is not a directory: set {key}={example}")
    return expanded


class ResumableDistributedSampler(Sampler[int]):
    """Shuffled, rank-sharded sample indices of one epoch, optionally starting mid-epoch.

    The permutation is drawn from ``torch.Generator().manual_seed(seed + epoch)`` (identical on
    every rank, independent of the global RNG). The tail that does not fill one micro-batch on
    every rank is dropped, so each rank yields ``len(self)`` indices, a multiple of
    `micro_batch`. Rank r takes positions r, r + world, r + 2·world, ... of the permutation.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        per_rank = num_samples // world_size
        self.num_per_rank = per_rank - per_rank % micro_batch
        if self.num_per_rank == 0:
            raise UserError(
                f"the training set has {num_samples} samples, fewer than one micro-batch per "
                f"rank ({micro_batch=} x world_size={world_size}): lower trainer.micro_batch"
            )
        self.num_samples = num_samples
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.skip_samples = 0, 0

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        self.epoch, self.skip_samples = epoch, skip_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        mine = order[self.rank :: self.world_size][: self.num_per_rank]
        return iter(mine[self.skip_samples :].tolist())

    def __len__(self) -> int:
        return self.num_per_rank - self.skip_samples


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... of an evaluation set: no padding, no overlap."""

    def __init__(self, num_samples: int, *, rank: int, world_size: int) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class TorchEpochLoader:
    """`EpochLoader` over a map-style Dataset for one rank (`ResumableDistributedSampler`).

    Without persistent workers a DataLoader is made for every epoch with its own generator
    seeded with ``seed + epoch`` (worker seeds and any loader randomness then do not consume the
    global RNG, which keeps resumed runs identical to uninterrupted ones when ``num_workers=0``).
    With ``persistent_workers`` (ImageNet) one DataLoader keeps its workers across epochs; the
    sampler runs in this process, so ``set_epoch`` takes effect at the next ``iter()``.
    Every micro-batch has ``micro_batch`` samples; ``len()`` is the number per epoch.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        micro_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        shuffle: bool = True,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        assert isinstance(dataset, Sized), "map-style datasets have a length"
        self.dataset = dataset
        self.seed = seed
        self.micro_batch = micro_batch
        self.sampler = ResumableDistributedSampler(
            len(dataset),
            rank=rank,
            world_size=world_size,
            micro_batch=micro_batch,
            seed=seed,
            shuffle=shuffle,
        )
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor if num_workers > 0 else None
        self.epoch = 0
        self.persistent_workers = persistent_workers and num_workers > 0
        self._persistent = (
            self._loader(torch.Generator().manual_seed(seed)) if self.persistent_workers else None
        )

    def _loader(self, generator: torch.Generator) -> DataLoader[Any]:
        return DataLoader(
            self.dataset,
            batch_size=self.micro_batch,
            sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            drop_last=True,
            generator=generator,
            persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor,
        )

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch, skip_batches * self.micro_batch)

    def __iter__(self) -> Iterator[Any]:
        if self._persistent is not None:
            return iter(self._persistent)
        return iter(self._loader(torch.Generator().manual_seed(self.seed + self.epoch)))

    def __len__(self) -> int:
        return self.sampler.num_per_rank // self.micro_batch


def make_train_loader(
    dataset: Dataset[Any],
    ctx: BuildContext,
    *,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> TorchEpochLoader:
    """This rank's shuffled training micro-batches of `dataset` (see `TorchEpochLoader`)."""
    return TorchEpochLoader(
        dataset,
        micro_batch=ctx.micro_batch,
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
        seed=ctx.config.seed,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=ctx.device.type == "cuda",
    )


def make_eval_loader(
    dataset: Dataset[Any],
    ctx: BuildContext,
    *,
    batch_size: int | None = None,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = False,
) -> DataLoader[Any]:
    """This rank's share of `dataset` in order (`ShardSampler`), batches of `batch_size`
    (pinned on CUDA unless `pin_memory` says otherwise; workers kept across evaluations with
    `persistent_workers`)."""
    assert isinstance(dataset, Sized), "map-style datasets have a length"
    return DataLoader(
        dataset,
        batch_size=batch_size or ctx.micro_batch,
        sampler=ShardSampler(len(dataset), rank=ctx.dist.rank, world_size=ctx.dist.world_size),
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=ctx.device.type == "cuda" if pin_memory is None else pin_memory,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=persistent_workers and num_workers > 0,
    )
