"""The Lifeguard suspicion timer: a deadline that shrinks with confirmations.

Owns: when a suspected member is declared dead.  The timer starts at
`max_timeout` and moves towards `min_timeout` on a log scale as `k`
independent peers confirm the suspicion; the member who raised it is not
counted (our own suspicion may be gossiped back to us).  Model: memberlist
`suspicion.go`, `remainingSuspicionTime`.

A quorum shortens it further: once `quorum` independent peers have
confirmed, the member is declared dead `quorum_timeout` after the timer
started, when that is sooner.  memberlist's minimum grows with log10 of the
clan (12 s at 1000 machines) because it leaves time for the member to hear
of the suspicion and refute it; several observers that each failed to reach
it directly and through helpers are much stronger evidence than one, and a
refutation crosses even a 1000-member clan in well under a second (Rapid,
ATC 2018: alerts from multiple observers before acting).

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

    __slots__ = (
        "k",
        "min_timeout",
        "max_timeout",
        "quorum",
        "quorum_timeout",
        "start",
        "n",
        "checked",
        "_confirmed",
        "_deadline",
    )

    def __init__(
        self,
        from_node: str,
        k: int,
        min_timeout: float,
        max_timeout: float,
        now: float,
        *,
        quorum: int = 0,
        quorum_timeout: float = 0.0,
    ) -> None:
        if k < 0:
            raise ValueError("k must be >= 0")
        if not 0 <= min_timeout <= max_timeout:
            raise ValueError("need 0 <= min_timeout <= max_timeout")
        if quorum < 0 or quorum_timeout < 0:
            raise ValueError("quorum and quorum_timeout must be >= 0")
        self.k = k
        self.min_timeout = min_timeout
        self.max_timeout = max_timeout
        # 0: no quorum rule (Lifeguard's timer alone).
        self.quorum = quorum
        self.quorum_timeout = quorum_timeout
        self.start = now
        self.n = 0
        # The holder probed the member itself before acting on a timer that
        # too few confirmed (see Membership._suspicion_expired).
        self.checked = False
        self._confirmed = {from_node}
        # With nobody to confirm (k = 0: too few members), waiting for
        # confirmations is pointless: the minimum from the start, as memberlist.
        self._deadline = now + (max_timeout if k >= 1 else min_timeout)

    @property
    def wanted(self) -> int:
        """Confirmations that can still move the deadline: Lifeguard's `k`,
        or the quorum when that is larger."""
        return max(self.k, self.quorum)

    @property
    def confirmed_enough(self) -> bool:
        """True when Lifeguard's `k` confirmations (or a quorum) arrived."""
        return self.n >= max(self.k, 1) or bool(self.quorum and self.n >= self.quorum)

    def postpone(self, until: float) -> None:
        """Move the deadline to `until` (the holder is checking for itself)."""
        self._deadline = until

    def has_confirmed(self, from_node: str) -> bool:
        """True when `from_node` raised or already confirmed this suspicion."""
        return from_node in self._confirmed

    @property
    def deadline(self) -> float:
        """When the member is to be declared dead, unless refuted first."""
        return self._deadline

    def confirm(self, from_node: str, now: float) -> bool:
        """Count `from_node`'s independent confirmation.

        Returns True when it was new information (the caller then re-gossips
        the suspicion so more peers can confirm), False for a repeat, the
        originator, or once `wanted` confirmations have already been counted.
        """
        if self.n >= self.wanted:
            return False
        if from_node in self._confirmed:
            return False
        self._confirmed.add(from_node)
        self.n += 1
        elapsed = now - self.start
        if self.k:
            remaining = remaining_suspicion_time(
                min(self.n, self.k), self.k, elapsed, self.min_timeout, self.max_timeout
            )
        else:
            remaining = self.min_timeout - elapsed
        if self.quorum and self.n >= self.quorum:
            remaining = min(remaining, self.quorum_timeout - elapsed)
        # A negative remainder means "fire now": the deadline is already past.
        self._deadline = now + remaining
        return True
