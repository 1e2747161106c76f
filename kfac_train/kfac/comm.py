"""Collective communication for distributed K-FAC, with byte accounting.

:class:`Communicator` is the single-process no-op; :class:`TorchCommunicator` runs the same
operations with ``torch.distributed`` (NCCL or gloo). Every operation names the *kind* of traffic
it carries, and :class:`CommStats` counts its payload: the bytes of the tensor(s) the collective
moves, counted once on every rank that takes part.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

FACTOR_ALLREDUCE = "factor_allreduce"
SECOND_ORDER_BROADCAST = "second_order_broadcast"
GRAD_BROADCAST = "grad_broadcast"
COMM_KINDS = (FACTOR_ALLREDUCE, SECOND_ORDER_BROADCAST, GRAD_BROADCAST)


@dataclass
class CommStats:
    """Payload bytes by kind: the step in progress, the last completed step, and the total."""

    step: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMM_KINDS, 0))
    last_step: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMM_KINDS, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMM_KINDS, 0))

    def add(self, kind: str, nbytes: int) -> None:
        self.step[kind] += nbytes
        self.total[kind] += nbytes

    def end_step(self) -> None:
        """Close the current step: its counts become :attr:`last_step` and counting restarts
        (traffic started during backward belongs to the step that follows it)."""
        self.last_step, self.step = self.step, dict.fromkeys(COMM_KINDS, 0)

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {"step": dict(self.last_step), "total": dict(self.total)}


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Concatenate flattened tensors into one 1-D buffer (cast to ``dtype`` if given)."""
    dtype = dtype or tensors[0].dtype
    return torch.cat([t.reshape(-1).to(dtype) for t in tensors])


def unflatten_into(buffer: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy consecutive slices of ``buffer`` back into ``tensors`` (casting as needed)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(buffer[offset : offset + n].view(t.shape))
        offset += n


class Pending:
    """An operation in flight; :meth:`wait` finishes it (and runs its completion step)."""

    def __init__(self, work: dist.Work | None = None, then: Callable[[], None] | None = None):
        self._work = work
        self._then = then

    def wait(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._then is not None:
            then, self._then = self._then, None
            then()


class Communicator:
    """Single-process communicator: every collective is a no-op that moves no bytes."""

    rank = 0
    world_size = 1

    def __init__(self) -> None:
        self.stats = CommStats()

    def setup_groups(self, groups: Iterable[tuple[int, ...]]) -> None:
        """Create the sub-groups the work plan needs (collective on every rank)."""

    def allreduce_sum(self, buffer: torch.Tensor, kind: str) -> Pending:
        """Start an in-place sum over all ranks of ``buffer``."""
        return Pending()

    def broadcast(
        self, tensors: Sequence[torch.Tensor], src: int, ranks: tuple[int, ...], kind: str
    ) -> Pending:
        """Start broadcasting ``tensors`` (one flattened buffer) from ``src`` inside ``ranks``;
        receiving ranks get them written into their ``tensors`` on :meth:`Pending.wait`."""
        return Pending()

    def send(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        """Point-to-point send (used only when gathering a checkpoint on rank 0)."""

    def recv(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        """Point-to-point receive into ``tensors``."""


class TorchCommunicator(Communicator):
    """Collectives over a ``torch.distributed`` process group. Ranks are group ranks.

    K-FAC talks on its own communicator (a new group over the same ranks): factor all-reduces
    start during backward on one rank and at ``step()`` on another (a layer unused on a rank),
    which on a shared group would interleave differently with DDP's or the caller's collectives.
    On its own group only K-FAC's sequence matters, and that is the same on every rank.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        parent = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(parent)
        self.world_size = dist.get_world_size(parent)
        members = [dist.get_global_rank(parent, r) for r in range(self.world_size)]
        # Only the members synchronise, so data-parallel groups of a larger job may each do this.
        self.group = dist.new_group(members, use_local_synchronization=True)
        self._subgroups: dict[tuple[int, ...], dist.ProcessGroup] = {}

    def _global(self, rank: int) -> int:
        return dist.get_global_rank(self.group, rank)

    def setup_groups(self, groups: Iterable[tuple[int, ...]]) -> None:
        # new_group is collective over the default group: every rank must create every group in
        # the same order, including the groups it is not a member of.
        for ranks in sorted(set(groups)):
            if 1 < len(ranks) < self.world_size and ranks not in self._subgroups:
                self._subgroups[ranks] = dist.new_group([self._global(r) for r in ranks])

    def _group_of(self, ranks: tuple[int, ...]) -> dist.ProcessGroup:
        return self.group if len(ranks) == self.world_size else self._subgroups[ranks]

    def allreduce_sum(self, buffer: torch.Tensor, kind: str) -> Pending:
        self.stats.add(kind, nbytes([buffer]))
        work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return Pending(work)

    def broadcast(
        self, tensors: Sequence[torch.Tensor], src: int, ranks: tuple[int, ...], kind: str
    ) -> Pending:
        if len(ranks) < 2 or self.rank not in ranks:
            return Pending()
        buffer = flatten(tensors)
        self.stats.add(kind, nbytes([buffer]))
        work = dist.broadcast(
            buffer, src=self._global(src), group=self._group_of(ranks), async_op=True
        )
        if self.rank == src:
            return Pending(work)
        return Pending(work, then=lambda: unflatten_into(buffer, tensors))

    def send(self, tensors: Sequence[torch.Tensor], dst: int) -> None:
        dist.send(flatten(tensors), dst=self._global(dst), group=self.group)

    def recv(self, tensors: Sequence[torch.Tensor], src: int) -> None:
        buffer = torch.empty(
            sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device
        )
        dist.recv(buffer, src=self._global(src), group=self.group)
        unflatten_into(buffer, tensors)


def make_communicator(group: dist.ProcessGroup | None) -> Communicator:
    """A :class:`TorchCommunicator` when a process group of more than one rank is initialised,
    else the single-process no-op."""
    if not (dist.is_available() and dist.is_initialized()):
        return Communicator()
    if dist.get_world_size(group if group is not None else dist.group.WORLD) < 2:
        return Communicator()
    return TorchCommunicator(group)
