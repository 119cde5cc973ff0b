"""When a publisher republishes a record: the minimum interval and the refresh.

Owns: `PublishPolicy`, the rule every periodic publisher follows (topology,
VM status): a changed record goes out at once unless the last one is
younger than the kind's `min_interval`; an unchanged one goes out again
after its `refresh`, before a soft kind's TTL runs out. Both are jittered
so machines started together drift apart. Pure: the caller gives the time
and the rng; nothing here does I/O or imports trio.
`PublishGate` is the same floor for every publication of ours, kept by
the record bus (agent and simulator), so no service can flood the clan
with one key however it is written.
Must never: let a change wait longer than `min_interval` (plus its jitter).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

__all__ = ["MIN_JITTER", "REFRESH_JITTER", "PublishGate", "PublishPolicy"]

# `min_interval` is stretched by up to MIN_JITTER of it, the refresh
# shortened by up to REFRESH_JITTER of it.
REFRESH_JITTER = 0.1
MIN_JITTER = 0.25


class PublishPolicy:
    """When to republish one record (sans-IO: the caller gives the time and the rng).

    A changed shape goes out at once unless the last publication is younger
    than `min_interval` (stretched by up to `min_jitter` of it, drawn per
    publication); then `hold_until` says when it may.  An unchanged shape
    goes out again `refresh` after the last (shortened by up to
    `refresh_jitter` of it, so machines started together drift apart)."""

    def __init__(
        self,
        *,
        min_interval: float,
        refresh: float | None,
        rng: random.Random,
        min_jitter: float = MIN_JITTER,
        refresh_jitter: float = REFRESH_JITTER,
    ) -> None:
        self.min_interval = min_interval
        self.refresh = refresh
        self.rng = rng
        self.min_jitter = min_jitter
        self.refresh_jitter = refresh_jitter
        self.shape: Any = None
        self.published_at = -math.inf
        self.earliest = -math.inf  # no publication before this
        self.next_refresh = -math.inf
        self.hold_until: float | None = None  # a change waits for min_interval until then
        # the last `due` said yes only for the refresh: the shape is unchanged,
        # so the publication only renews a soft record's TTL (no push needed)
        self.refresh_only = False

    def due(self, now: float, shape: Any) -> bool:
        """Should the view with this shape be published now?"""
        self.hold_until = None
        self.refresh_only = False
        if self.shape is None:
            return True
        if shape != self.shape:
            if now >= self.earliest:
                return True
            self.hold_until = self.earliest
            return False
        self.refresh_only = self.refresh is not None and now >= self.next_refresh
        return self.refresh_only

    def published(self, now: float, shape: Any) -> None:
        self.shape, self.published_at, self.hold_until = shape, now, None
        self.earliest = now + self.min_interval * (1 + self.min_jitter * self.rng.random())
        if self.refresh is not None:
            self.next_refresh = now + self.refresh * (1 - self.refresh_jitter * self.rng.random())


class PublishGate:
    """The floor under every publisher: one (kind, key) of ours goes out at
    most once per its kind's `min_interval` (stretched by up to MIN_JITTER).

    The record bus asks `wait(now, kind, key)` before a publication and waits
    that long (0: at once), then calls `published`; a service that publishes
    too often is slowed down, not refused. Sans-IO, one entry per key we
    publish (bounded by our own records)."""

    def __init__(self, min_interval: Callable[[str], float], rng: random.Random) -> None:
        self._min_interval = min_interval
        self._rng = rng
        self._next: dict[tuple[str, str], float] = {}
        self.delayed = 0  # publications that had to wait

    def wait(self, now: float, kind: str, key: str) -> float:
        due = self._next.get((kind, key), -math.inf)
        if due <= now:
            return 0.0
        self.delayed += 1
        return due - now

    def published(self, now: float, kind: str, key: str) -> None:
        floor = self._min_interval(kind)
        if floor > 0:
            self._next[(kind, key)] = now + floor * (1 + MIN_JITTER * self._rng.random())
        else:
            self._next.pop((kind, key), None)
