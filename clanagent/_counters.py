"""Plain counters the parts keep for the metrics collector to read.

Owns: `LatencyHistogram` (cumulative-ready bucket counts and a sum, safe to
observe from a worker thread) and `LabelCounts` (counts by a small tuple of
labels, with a cap on how many distinct tuples it keeps).
Must never: import prometheus-client or trio (the store and the control
server use these without either), or grow without bound on labels an
untrusted caller chooses.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator

__all__ = ["LabelCounts", "LatencyHistogram", "OTHER"]

# The label value that stands in once a LabelCounts is full.
OTHER = "(other)"


class LatencyHistogram:
    """Observations (seconds) in fixed buckets: what a Prometheus histogram needs."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        if list(buckets) != sorted(buckets) or not buckets:
            raise ValueError("buckets must be a non-empty ascending tuple")
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.buckets, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """([(upper bound, cumulative count)] ending with +Inf, sum, count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out, running = [], 0
        for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
            running += n
            out.append((bound, running))
        return out, total, running


class LabelCounts:
    """Counts keyed by a tuple of label values, at most `max_keys` tuples.

    A new tuple beyond the cap is counted under (OTHER, ...) so a caller
    who sends a million method names costs one entry."""

    def __init__(self, max_keys: int = 256) -> None:
        self.max_keys = max_keys
        self._counts: dict[tuple[str, ...], int] = {}

    def add(self, *labels: str, n: int = 1) -> None:
        key = tuple(labels)
        if key not in self._counts and len(self._counts) >= self.max_keys:
            key = (OTHER,) * len(labels)
        self._counts[key] = self._counts.get(key, 0) + n

    def items(self) -> Iterator[tuple[tuple[str, ...], int]]:
        return iter(list(self._counts.items()))

    def __len__(self) -> int:
        return len(self._counts)
