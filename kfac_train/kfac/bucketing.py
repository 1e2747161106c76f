"""Bucketed, ordered all-reduce of the layers' batch factors (averaged over ranks)."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

import torch

from .comm import FACTOR_ALLREDUCE, Communicator, Pending


class _TriangleCodec:
    """Packs symmetric ``n × n`` matrices to their ``n(n+1)/2`` upper triangle and back."""

    def __init__(self) -> None:
        self._indices: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _triu(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n, device)
        if key not in self._indices:
            rows, cols = torch.triu_indices(n, n, device=device)
            self._indices[key] = (rows, cols)
        return self._indices[key]

    def pack(self, matrix: torch.Tensor) -> torch.Tensor:
        rows, cols = self._triu(matrix.shape[0], matrix.device)
        return matrix[rows, cols]

    def unpack(self, values: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        rows, cols = self._triu(n, values.device)
        matrix = torch.empty(n, n, dtype=dtype, device=values.device)
        matrix[rows, cols] = values.to(dtype)
        matrix[cols, rows] = values.to(dtype)
        return matrix


class FactorAllReducer:
    """Averages each layer's batch factors (``[A_batch, G_batch]``, or any list of statistics)
    over all ranks. ``layers`` gives each layer's statistics as ``(shape, symmetric)``;
    ``symmetry_aware`` sends the symmetric ones as their upper triangle.

    Layers are grouped into static buckets of at most ``bucket_cap_bytes`` (a bucket holds at
    least one layer) in the order given, which should be the order in which layers finish their
    backward pass (reverse model order). A bucket is launched, asynchronously, once all its layers
    are ready *and* every earlier bucket has been launched, so all ranks issue the same
    collectives in the same order. :meth:`finish` launches what is left and waits.
    """

    def __init__(
        self,
        comm: Communicator,
        layers: Sequence[tuple[str, Sequence[tuple[tuple[int, ...], bool]]]],
        *,
        bucket_cap_bytes: int,
        symmetry_aware: bool,
        comm_dtype: torch.dtype,
    ) -> None:
        self.comm = comm
        self.symmetry_aware = symmetry_aware
        self.comm_dtype = comm_dtype
        self._codec = _TriangleCodec()
        self.buckets: list[list[str]] = []
        self._specs = {name: list(specs) for name, specs in layers}
        self._total_len = sum(self._packed_len(*s) for specs in self._specs.values() for s in specs)
        size = 0
        elem = torch.empty((), dtype=comm_dtype).element_size()
        for name, specs in layers:
            layer_bytes = sum(self._packed_len(*s) for s in specs) * elem
            if not self.buckets or size + layer_bytes > bucket_cap_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(name)
            size += layer_bytes
        self.start_step()

    def _packs(self, symmetric: bool) -> bool:
        return self.symmetry_aware and symmetric

    def _packed_len(self, shape: Sequence[int], symmetric: bool) -> int:
        if self._packs(symmetric):
            return shape[0] * (shape[0] + 1) // 2
        return math.prod(shape)

    def bucket_bytes(self) -> int:
        """Bytes of all bucket buffers of one step (they can be in flight together)."""
        elem = torch.empty((), dtype=self.comm_dtype).element_size()
        return self._total_len * elem

    def start_step(self, idle: Collection[str] = ()) -> None:
        """Begin a factor step; the layers in ``idle`` send nothing at it (stale statistics).

        A layer's list may also hold ``None`` for a statistic it does not send this step. Which
        statistics are sent must be the same on every rank (each bucket sends what its layers
        hold; a bucket with nothing to send issues no collective).
        """
        self._ready: dict[str, list[torch.Tensor | None]] = {
            name: [None] * len(self._specs[name]) for name in idle
        }
        self._launched = 0
        self._pending: list[tuple[Pending, torch.Tensor, list[str]]] = []

    def mark_ready(self, name: str, factors: list[torch.Tensor | None]) -> None:
        """Record a layer's local batch factors; launch every bucket that became complete."""
        self._ready[name] = factors
        while self._launched < len(self.buckets) and all(
            n in self._ready for n in self.buckets[self._launched]
        ):
            self._launch(self.buckets[self._launched])
            self._launched += 1

    def _launch(self, names: list[str]) -> None:
        pieces = []
        for name in names:
            for f, (_, symmetric) in zip(self._ready[name], self._specs[name], strict=True):
                if f is not None:
                    pieces.append(self._codec.pack(f) if self._packs(symmetric) else f.reshape(-1))
        if not pieces:
            return
        buffer = torch.cat([p.to(self.comm_dtype) for p in pieces])
        self._pending.append((self.comm.allreduce_sum(buffer, FACTOR_ALLREDUCE), buffer, names))

    def finish(
        self, local: Callable[[str], list[torch.Tensor | None]]
    ) -> dict[str, list[torch.Tensor | None]]:
        """Launch the remaining buckets (``local(name)`` supplies a layer's tensors if it never
        became ready) and return every layer's rank-averaged factors, in their original dtype
        (``None`` for what was not sent)."""
        for names in self.buckets[self._launched :]:
            for name in names:
                if name not in self._ready:
                    self._ready[name] = local(name)
            self._launch(names)
        self._launched = len(self.buckets)
        averaged = {name: list(self._ready[name]) for names in self.buckets for name in names}
        world = self.comm.world_size
        for pending, buffer, names in self._pending:
            pending.wait()
            buffer /= world
            offset = 0
            for name in names:
                out = []
                for f, (shape, symmetric) in zip(self._ready[name], self._specs[name], strict=True):
                    if f is None:
                        out.append(None)
                        continue
                    length = self._packed_len(shape, symmetric)
                    chunk = buffer[offset : offset + length]
                    offset += length
                    if self._packs(symmetric):
                        out.append(self._codec.unpack(chunk, f.shape[0], f.dtype))
                    else:
                        out.append(chunk.view(f.shape).to(f.dtype))
                averaged[name] = out
        self.start_step()
        return averaged
