"""One curvature statistic: its per-step batch value and its running average."""

from __future__ import annotations

import torch

from . import precision


class Factor:
    """A curvature statistic of one layer: a Kronecker factor ``A`` or ``G`` (symmetric
    ``n × n``), or a packed block statistic such as unit-wise BatchNorm's ``(C, 3)``.

    Holds two things with different lifetimes:

    * the per-step *batch* statistic, summed over the micro-batches of one optimizer step
      (:meth:`accumulate` / :meth:`add`) and averaged by :meth:`batch`;
    * the *running average* ``F ← decay·F + (1 − decay)·F_batch``, starting from the identity
      (or ``initial``); this is checkpointed state.

    The second-order data derived from the running averages belongs to the layer's
    :mod:`~kfac_train.kfac.second_order` method object.

    ``dtype`` is the requested factor dtype: the statistic's matrix product runs in it
    (:attr:`stat_dtype`), while batch sums and the running average are held in :attr:`dtype` =
    ``precision.factor_storage_dtype(dtype)`` (float32 for bfloat16/float16, see
    :mod:`.precision`).
    """

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        initial: torch.Tensor | None = None,
    ) -> None:
        self.size = size
        self.stat_dtype = dtype
        self.dtype = precision.factor_storage_dtype(dtype)
        #: Square statistics are symmetric: the factor all-reduce may send only their upper
        #: triangle. They are Gram matrices (``rowsᵀ rows``, or blocks mirrored by
        #: :mod:`.conv_correlation` / :mod:`.conv_stats`), and every decomposition reads one
        #: triangle only (``eigh``, Cholesky), so no symmetrising pass is spent on them: a
        #: rounding-level asymmetry of a BLAS product (none on the CPU: MKL's ``XᵀX`` is
        #: bitwise symmetric) cannot reach the second-order data.
        self.symmetric = initial is None
        self.running = (
            torch.eye(size, dtype=self.dtype, device=device)
            if initial is None
            else initial.to(dtype=self.dtype, device=device)
        )
        self._batch_sum: torch.Tensor | None = None
        self.batch_count = 0
        #: Whether this step collects the statistic (``False``: skipped as stale, :mod:`.stale`).
        self.active = True

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.running.shape)

    def accumulate(self, rows: torch.Tensor) -> None:
        """Add the statistic ``rowsᵀ rows / N`` of one micro-batch; ``rows`` is ``(N, size)``."""
        self.add(precision.gram_mean(rows, self.stat_dtype))

    def add(self, stat: torch.Tensor) -> None:
        """Add one micro-batch's statistic (already in the running average's shape); ignored
        while the statistic is not :attr:`active`."""
        if not self.active:
            return
        stat = stat.to(self.dtype)
        if self.running.device != stat.device:
            self.running = self.running.to(stat.device)
        if self._batch_sum is None:
            self._batch_sum = stat
        else:
            self._batch_sum.add_(stat)
        self.batch_count += 1

    def batch(self) -> torch.Tensor | None:
        """The mean of this step's micro-batch statistics (``None`` if there were none)."""
        total = self._batch_sum
        if total is None:
            return None
        return total / self.batch_count if self.batch_count > 1 else total

    def reset_batch(self) -> None:
        self._batch_sum = None
        self.batch_count = 0

    def update_running(self, batch: torch.Tensor, decay: float, keep: torch.Tensor) -> None:
        """Fold ``batch`` into the running average where the 0-d bool tensor ``keep`` is true.

        One fused pass (``torch.lerp``: ``F + (1 − decay)(F_batch − F)``). On an accelerator the
        choice stays on the device (``torch.where``): no host synchronisation; on the CPU,
        where reading the flag costs nothing, the dropped case skips the fold.
        """
        batch = batch.to(self.running.dtype)
        if keep.device.type == "cpu":
            if bool(keep):
                self.running = torch.lerp(self.running, batch, 1.0 - decay)
            return
        self.running = torch.where(keep, torch.lerp(self.running, batch, 1.0 - decay), self.running)

    def running_bytes(self) -> int:
        return self.running.numel() * self.running.element_size()

    def batch_bytes(self) -> int:
        """Bytes of the batch sum while a step collects statistics."""
        return self.running.numel() * torch.empty((), dtype=self.dtype).element_size()
