"""Factor reduction: average every block's batch statistics over ranks and fold them into the
running averages (step phase 1).

With ``overlap_comm`` a block's statistics are handed to the bucketed all-reduce
(:class:`.bucketing.FactorAllReducer`) during backward as soon as they are complete: when the
block has run as often as on the first factor-update step. A block without statistics on a rank
(a branch unused there) contributes its running average, which every rank holds identically, so
all ranks issue the same collectives in the same order.

With stale statistics (:mod:`.stale`) only the statistics due at a factor step are computed,
sent and folded; the schedule also counts the refreshes (``statistics_fraction``).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from . import precision
from .bucketing import FactorAllReducer
from .comm import Communicator
from .stale import DEFAULT_THRESHOLD, MODES, StaleStatistics


class FactorReduction:
    """Averages the blocks' batch statistics over ranks (none on one process) and folds them."""

    def __init__(
        self,
        blocks: dict[str, Any],
        comm: Communicator,
        *,
        overlap_comm: bool,
        bucket_cap_bytes: int,
        symmetry_aware: bool,
        comm_dtype: torch.dtype,
        stale: str = "off",
        stale_threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        if stale not in MODES:
            raise ValueError(f"stale must be one of {MODES}, got {stale!r}")
        self.blocks = blocks
        keys = [(n, i) for n, b in blocks.items() for i in range(len(b.factors()))]
        self.schedule = StaleStatistics(
            keys, adaptive=stale == "adaptive", threshold=stale_threshold
        )
        self.overlap_comm = overlap_comm
        self.reducer: FactorAllReducer | None = None
        if comm.world_size > 1:
            self.reducer = FactorAllReducer(
                comm,
                [
                    (n, [(f.shape, f.symmetric) for f in b.factors()])
                    for n, b in reversed(blocks.items())
                ],
                bucket_cap_bytes=bucket_cap_bytes,
                symmetry_aware=symmetry_aware,
                comm_dtype=comm_dtype,
            )
        self._calls_per_step: dict[str, int] | None = None
        self._sent_early: dict[str, int] = {}
        first = next(iter(blocks.values()), None)
        device = first.factors()[0].running.device if first is not None else None
        #: Statistics dropped for inf/NaN since the last report (0-d, on the device: no sync).
        self.dropped = torch.zeros((), dtype=torch.int64, device=device)

    @staticmethod
    def _counts(block: Any) -> set[int]:
        return {f.batch_count for f in block.factors() if f.active}

    def prepare(self, *, collecting: bool, capture: Any) -> None:
        """Before a step's forward: set ``capture.collecting`` and mark which statistics the
        step computes (all on a factor-update step, or those the stale schedule has due)."""
        capture.collecting = collecting
        idle = []
        for name, block in self.blocks.items():
            for index, factor in enumerate(block.factors()):
                factor.active = collecting and self.schedule.due((name, index))
            if not any(f.active for f in block.factors()):
                idle.append(name)
        if self.reducer is not None and collecting:
            self.reducer.start_step(idle)

    def on_complete(self, block: Any) -> None:
        """Backward hook callback: start the block's all-reduce once its statistics are whole."""
        if self.reducer is None or not self.overlap_comm or self._calls_per_step is None:
            return
        calls = self._calls_per_step.get(block.name, 0)
        if calls and self._counts(block) == {calls}:
            self._sent_early[block.name] = calls
            self.reducer.mark_ready(
                block.name, [f.batch() if f.active else None for f in block.factors()]
            )

    def _local(self, name: str) -> list[torch.Tensor | None]:
        """This rank's batch statistics (``None`` where not active); a block without statistics
        here contributes its running averages, which leaves the average unchanged if no rank
        saw the block."""
        factors = self.blocks[name].factors()
        batches = [f.batch() for f in factors]
        if any(b is None for b, f in zip(batches, factors, strict=True) if f.active):
            batches = [f.running for f in factors]
        return [b if f.active else None for b, f in zip(batches, factors, strict=True)]

    def reduce(self, decay: float, step: int) -> None:
        """Average this step's statistics over ranks and fold them into the running averages."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"factor_decay must be in [0, 1] at step {step}, got {decay}")
        changed = [
            name
            for name, calls in self._sent_early.items()
            if self._counts(self.blocks[name]) != {calls}
        ]
        if changed:
            raise RuntimeError(
                f"K-FAC: layers {changed[:3]} ran a different number of times than on the first "
                "factor-update step, after their factors were sent (overlap_comm); pass "
                "overlap_comm=False for models whose layers run a varying number of times"
            )
        self._sent_early.clear()
        if self._calls_per_step is None:
            # The first factor-update step sends everything at step() and learns how often each
            # block runs per step (accumulation × calls per forward); later steps send a block
            # during backward as soon as it reaches that count.
            self._calls_per_step = {
                name: counts.pop()
                for name, block in self.blocks.items()
                if len(counts := self._counts(block)) == 1
            }
        if self.reducer is None:
            batches = {
                n: [f.batch() if f.active else None for f in b.factors()]
                for n, b in self.blocks.items()
            }
        else:
            batches = self.reducer.finish(self._local)
        refreshed = {}
        for name, block in self.blocks.items():
            factors, stats = block.factors(), batches[name]
            sent = [
                (i, f, s) for i, (f, s) in enumerate(zip(factors, stats, strict=True)) if f.active
            ]
            if sent and all(s is not None for _, _, s in sent):
                # An overflow step drops the block's statistics together (A and G).
                keep = torch.stack([precision.all_finite(s) for _, _, s in sent]).all()
                for index, factor, stat in sent:
                    # A stale statistic's refresh stands for every factor step since the
                    # previous one: the running average decays over all of them.
                    elapsed = self.schedule.elapsed((name, index))
                    factor.update_running(stat, decay**elapsed, keep)
                    # The schedule compares the factor in force (non-finite when dropped).
                    refreshed[(name, index)] = (
                        torch.where(keep, factor.running, stat)
                        if self.schedule.adaptive
                        else factor.running  # only counted
                    )
                self.dropped = self.dropped.to(keep.device) + ~keep
            for factor in factors:
                factor.reset_batch()
        self.schedule.observe(refreshed)

    def warn_dropped(self) -> None:
        """Warn about statistics dropped since the last call (reads the count: a host sync)."""
        dropped = int(self.dropped.item())
        if dropped:
            warnings.warn(
                f"K-FAC: dropped {dropped} layer statistic(s) containing inf/NaN (AMP overflow?) "
                "since the last second-order update; the factors kept their previous values",
                RuntimeWarning,
                stacklevel=4,
            )
            self.dropped.zero_()

    def transient_bytes(self) -> int:
        """Bytes of the batch sums of one step plus, distributed, the all-reduce buckets."""
        sums = sum(f.batch_bytes() for b in self.blocks.values() for f in b.factors())
        return sums + (self.reducer.bucket_bytes() if self.reducer is not None else 0)
