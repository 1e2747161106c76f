"""One Kronecker factor: its per-step batch statistic, running average and second-order data."""

from __future__ import annotations

import torch

from . import precision


class Factor:
    """A symmetric ``n × n`` Kronecker factor (a layer's ``A`` or ``G``).

    Holds three things with different lifetimes:

    * the per-step *batch* statistic, summed over the micro-batches of one optimizer step
      (``accumulate``) and averaged by :meth:`batch`;
    * the *running average* ``F ← decay·F + (1 − decay)·F_batch``, starting from the identity
      (checkpointed state);
    * the *second-order data* derived from it: eigenvectors ``Q`` or the damped ``inverse``
      (recomputable; only allocated on ranks that need it).

    ``dtype`` is the requested factor dtype; the statistic's product runs in it, while sums and
    the running average are held in :attr:`dtype` = ``precision.factor_storage_dtype(dtype)``
    (float32 for bfloat16/float16, see :mod:`.precision`).
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.size = size
        self.stat_dtype = dtype
        self.dtype = precision.factor_storage_dtype(dtype)
        self.running = torch.eye(size, dtype=self.dtype, device=device)
        self._batch_sum: torch.Tensor | None = None
        self.batch_count = 0
        self.eigvecs: torch.Tensor | None = None
        self.inverse: torch.Tensor | None = None

    def accumulate(self, rows: torch.Tensor) -> None:
        """Add the statistic ``rowsᵀ rows / N`` of one micro-batch; ``rows`` is ``(N, size)``."""
        if self.running.device != rows.device:
            self.running = self.running.to(rows.device)
        stat = precision.gram_mean(rows, self.stat_dtype).to(self.dtype)
        if self._batch_sum is None:
            self._batch_sum = stat
        else:
            self._batch_sum.add_(stat)
        self.batch_count += 1

    def batch(self) -> torch.Tensor | None:
        """The symmetrised mean of this step's micro-batch statistics (``None`` if none)."""
        if self._batch_sum is None:
            return None
        mean = self._batch_sum / self.batch_count
        return (mean + mean.T) / 2

    def reset_batch(self) -> None:
        self._batch_sum = None
        self.batch_count = 0

    def update_running(self, batch: torch.Tensor, decay: float, keep: torch.Tensor) -> None:
        """Fold ``batch`` into the running average where the 0-d bool tensor ``keep`` is true.

        The choice stays on the device (``torch.where``): no host synchronisation.
        """
        updated = self.running * decay + batch.to(self.running.dtype) * (1.0 - decay)
        self.running = torch.where(keep, updated, self.running)

    def second_order_bytes(self) -> int:
        held = (t for t in (self.eigvecs, self.inverse) if t is not None)
        return sum(t.numel() * t.element_size() for t in held)

    def running_bytes(self) -> int:
        return self.running.numel() * self.running.element_size()
