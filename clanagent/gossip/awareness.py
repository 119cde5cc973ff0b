"""Lifeguard local health awareness: how much we trust our own timeliness.

Owns: a small integer score (0 = healthy) that goes up when our probes fail
in ways that point at *us* (missed nacks, having to refute a suspicion) and
down when probes succeed, and the scaling of the probe interval by it.
Model: memberlist `awareness.go`.

Must never: read the clock or block; it is a counter.
"""

from __future__ import annotations

__all__ = ["Awareness"]


class Awareness:
    """Score in [0, max_multiplier - 1]; timeouts are scaled by score + 1."""

    __slots__ = ("_max", "_score")

    def __init__(self, max_multiplier: int) -> None:
        if not isinstance(max_multiplier, int) or max_multiplier < 1:
            raise ValueError("max_multiplier must be an int >= 1")
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """Current score; 0 is the healthiest."""
        return self._score

    @property
    def max_multiplier(self) -> int:
        return self._max

    def apply_delta(self, delta: int) -> int:
        """Add `delta`, clamped to the range, and return the new score.

        Clamping (rather than accumulating debt) means a long healthy streak
        cannot hide a sudden problem, and vice versa.
        """
        score = self._score + delta
        if score < 0:
            score = 0
        elif score > self._max - 1:
            score = self._max - 1
        self._score = score
        return score

    def scale_timeout(self, timeout: float) -> float:
        """`timeout` stretched by our unhealthiness (score + 1)."""
        return timeout * (self._score + 1)
