"""Rate-limited warnings for numerical events (float64 retries, fallbacks, dropped statistics).

Long runs would drown in one warning per layer per inverse update; a silent event, on the other
hand, hides a numerical problem. :class:`RateLimitedWarner` reports the first occurrence of each
``(event, layer)`` pair and then every ``every``-th one, with the running count.
"""

from __future__ import annotations

import warnings
from collections import Counter

#: Occurrences of one ``(event, layer)`` pair between two reports after the first.
DEFAULT_REPORT_EVERY = 100


class RateLimitedWarner:
    """Issues a ``RuntimeWarning`` on occurrence 1, 1 + every, 1 + 2·every, ... of each key."""

    def __init__(self, every: int = DEFAULT_REPORT_EVERY) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.counts: Counter[tuple[str, str]] = Counter()
        #: Checks queued on the device, read together later (``damping.report_swamped``).
        self.pending: list = []

    def warn(self, event: str, layer: str, message: str) -> bool:
        """Count one ``event`` of ``layer``; warn with ``message`` when it is due (returns
        whether it warned)."""
        key = (event, layer)
        self.counts[key] += 1
        count = self.counts[key]
        if (count - 1) % self.every:
            return False
        suffix = (
            f" [{event} #{count} for this layer; reported every {self.every}]"
            if count > 1
            else f" [first {event} for this layer; further ones reported every {self.every}]"
        )
        warnings.warn(f"K-FAC: {message}{suffix}", RuntimeWarning, stacklevel=3)
        return True
