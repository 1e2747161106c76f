"""Stale statistics: SP-NGD's adaptive refresh intervals (Osawa et al., arXiv 2002.06015, Alg. 2).

Every statistic ``X`` — each factor of each block (``A`` and ``G`` of a Kronecker layer
separately, a BatchNorm block's ``F``) — keeps its own next refresh *factor step* ``t_X``,
counted in factor-update steps (``factor_update_steps`` apart). A statistic that is not due is
neither computed in the hooks nor communicated, and its running average stays as it is. When
``X`` is refreshed, its next interval ``Δ`` follows from the two previous intervals ``Δ₋₁``,
``Δ₋₂`` and the values ``X₋₁``, ``X₋₂`` of the two previous refreshes:

* ``X`` not similar to ``X₋₁``: ``Δ = max(1, ⌊Δ₋₁ / 2⌋)``;
* else ``X`` not similar to ``X₋₂``: ``Δ = Δ₋₁``;
* else ``Δ = Δ₋₁ + Δ₋₂``;

then ``t_X += Δ``. ``X`` is the statistic the preconditioner uses: the running average after
the rank-averaged batch value was folded in. SP-NGD keeps no running average (its statistic is
the latest batch value, ``factor_decay=0`` here, as in the SP-NGD recipes). With a running
average, a refresh stands for every factor step since the previous one: it is folded in with
weight ``1 − decay^Δ₋₁`` (:meth:`StaleStatistics.elapsed`), so the factor in force ages with the
steps rather than with the refreshes, and the test asks whether it moved over the stale gap.
(Folded with ``1 − decay``, a factor moves by a twentieth of the batch's deviation at decay
0.95, is nearly always "similar", and the intervals grow as Fibonacci numbers whatever the data.)
Similar means ``‖X − Y‖_F / ‖Y‖_F < α``, α = 0.1 in every experiment of the
paper. Intervals start at ``Δ₋₁ = Δ₋₂ = 1``; a missing ``X₋₁`` / ``X₋₂`` (the first refreshes)
counts as not similar, as does a non-finite ``X`` (an AMP overflow: the value is not kept).

The decisions are computed from rank-averaged statistics, identical on every rank, so every rank
takes the same decisions and issues the same collectives. Plain tensor code: no
``torch.distributed`` here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import precision

#: The similarity threshold α of SP-NGD (used in all of its experiments).
DEFAULT_THRESHOLD = 0.1
MODES = ("off", "adaptive")


@dataclass
class _Statistic:
    """Schedule of one statistic: next refresh factor step, ``Δ₋₁``, ``Δ₋₂``, ``X₋₁``, ``X₋₂``."""

    next: int = 0
    intervals: tuple[int, int] = (1, 1)
    history: list[torch.Tensor] = field(default_factory=list)


def next_interval(similar_last: bool, similar_before: bool, intervals: tuple[int, int]) -> int:
    """SP-NGD Alg. 2's interval rule from the two similarity tests and ``(Δ₋₁, Δ₋₂)``."""
    last, before = intervals
    if not similar_last:
        return max(1, last // 2)
    if not similar_before:
        return last
    return last + before


def relative_change(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``‖x − reference‖_F / ‖reference‖_F`` as a 0-d float64 tensor (inf for a zero reference)."""
    x, reference = x.to(torch.float64), reference.to(torch.float64)
    return torch.linalg.norm(x - reference) / torch.linalg.norm(reference)


class StaleStatistics:
    """The adaptive refresh schedule of a set of statistics, keyed ``(block name, factor index)``.

    Also counts, for every mode, the refreshes actually computed against the refreshes of
    updating every statistic at every factor step (:attr:`fraction`).
    """

    def __init__(
        self, keys: Iterable[tuple[str, int]], *, adaptive: bool, threshold: float
    ) -> None:
        if not threshold > 0:
            raise ValueError(f"stale_threshold must be > 0, got {threshold}")
        self.adaptive = adaptive
        self.threshold = threshold
        self.stats = {key: _Statistic() for key in keys}
        self.factor_steps = 0  # factor-update steps completed
        self.computed = 0  # statistics refreshed so far
        self.possible = 0  # statistics × factor steps so far

    def due(self, key: tuple[str, int]) -> bool:
        """Whether statistic ``key`` is refreshed at the coming factor step."""
        return not self.adaptive or self.stats[key].next <= self.factor_steps

    def elapsed(self, key: tuple[str, int]) -> int:
        """Factor steps that a refresh of ``key`` at the coming factor step stands for: the steps
        since its previous refresh (1 without the adaptive schedule, and at the first refresh)."""
        if not self.adaptive:
            return 1
        stat = self.stats[key]
        return max(1, self.factor_steps - stat.next + stat.intervals[0])

    @property
    def fraction(self) -> float:
        """Refreshes computed / refreshes of updating all statistics at every factor step (1.0
        before the first factor step)."""
        return self.computed / self.possible if self.possible else 1.0

    def observe(self, refreshed: dict[tuple[str, int], torch.Tensor]) -> None:
        """Close a factor step: ``refreshed`` maps each statistic refreshed at it to its
        rank-averaged batch value. Sets their next refresh steps (one host sync)."""
        self.computed += len(refreshed)
        self.possible += len(self.stats)
        if self.adaptive and refreshed:
            changes = []
            for key, x in refreshed.items():
                history = self.stats[key].history
                for h in (history + [None, None])[:2]:
                    changes.append(_NAN if h is None else relative_change(x, h.to(x.device)))
                changes.append(precision.all_finite(x).double())
            values = torch.stack([c.cpu() for c in changes]).view(-1, 3).tolist()
            for (key, x), (last, before, finite) in zip(refreshed.items(), values, strict=True):
                self._advance(self.stats[key], x, last, before, bool(finite))
        self.factor_steps += 1

    def _advance(
        self, stat: _Statistic, x: torch.Tensor, last: float, before: float, finite: bool
    ) -> None:
        similar_last = finite and last < self.threshold  # NaN compares False
        similar_before = finite and before < self.threshold
        interval = next_interval(similar_last, similar_before, stat.intervals)
        stat.intervals = (interval, stat.intervals[0])
        if finite:
            stat.history = [x.detach().clone(), *stat.history[:1]]
        stat.next = self.factor_steps + interval

    def history_bytes(self) -> int:
        """Bytes of the kept values ``X₋₁``, ``X₋₂`` (two copies of each statistic)."""
        return sum(t.numel() * t.element_size() for s in self.stats.values() for t in s.history)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters and, per statistic ``"name/index"``, its next step, intervals and history."""
        return {
            "factor_steps": self.factor_steps,
            "computed": self.computed,
            "possible": self.possible,
            "statistics": {
                f"{name}/{index}": {
                    "next": s.next,
                    "intervals": list(s.intervals),
                    "history": [t.clone() for t in s.history],
                }
                for (name, index), s in self.stats.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`; ``None`` (a checkpoint written without it) starts the
        schedule afresh: every statistic is due at the next factor step."""
        if state is None:
            return
        self.factor_steps = int(state["factor_steps"])
        self.computed, self.possible = int(state["computed"]), int(state["possible"])
        saved = state.get("statistics", {})
        for (name, index), stat in self.stats.items():
            entry = saved.get(f"{name}/{index}")
            if entry is None:
                stat.next, stat.intervals, stat.history = self.factor_steps, (1, 1), []
                continue
            stat.next = int(entry["next"])
            stat.intervals = (int(entry["intervals"][0]), int(entry["intervals"][1]))
            stat.history = [t.clone() for t in entry["history"]]


_NAN = torch.tensor(float("nan"), dtype=torch.float64)
