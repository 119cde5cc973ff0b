"""The Lifeguard suspicion timer: a deadline that shrinks with confirmations.

Owns: when a suspected member is declared dead.  The timer starts at
`max_timeout` and moves towards `min_timeout` on a log scale as `k`
independent peers confirm the suspicion; the member who raised it is not
counted (our own suspicion may be gossiped back to us).  Model: memberlist
`suspicion.go`, `remainingSuspicionTime`.

Must never: read the clock or fire anything itself.  The caller passes `now`
and compares it with `deadline`.
"""

from __future__ import annotations

import math

__all__ = ["Suspicion", "remaining_suspicion_time"]


def remaining_suspicion_time(
    n: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """Time left (may be negative) after `n` of `k` confirmations, seconds.

    Same as memberlist: the total timeout is floored to whole milliseconds
    and never below `min_timeout`; `elapsed` is subtracted from it.
    """
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    timeout = math.floor(1000.0 * raw) / 1000.0
    if timeout < min_timeout:
        timeout = min_timeout
    return timeout - elapsed


class Suspicion:
    """One member's suspicion timer."""

    __slots__ = ("k", "min_timeout", "max_timeout", "start", "n", "_confirmed", "_deadline")

    def __init__(
        self, from_node: str, k: int, min_timeout: float, max_timeout: float, now: float
    ) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        if not 0 <= min_timeout <= max_timeout:
            raise ValueError("need 0 <= min_timeout <= max_timeout")
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        self.start = now
        self.n = 0
        self._confirmed = {from_node}
        self._deadline = now + max_timeout

    @property
    def deadline(self) -> float:
        """When the member is to be declared dead, unless refuted first."""
        return self._deadline

    def confirm(self, from_node: str, now: float) -> bool:
        """Count `from_node`'s independent confirmation.

        Returns True when it was new information (the caller then re-gossips
        the suspicion so more peers can confirm), False for a repeat, the
        originator, or once `k` confirmations have already been counted.
        """
        if self.n >= self.k:
            return False
        if from_node in self._confirmed:
            return False
        self._confirmed.add(from_node)
        self.n += 1
        elapsed = now - self.start
        remaining = remaining_suspicion_time(
            self.n, self.k, elapsed, self.min_timeout, self.max_timeout
        )
        # A negative remainder means "fire now": the deadline is already past.
        self._deadline = now + remaining
        return True
