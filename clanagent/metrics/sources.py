"""What the metrics collector reads: the getters of the parts.

Owns: `MetricsSources`, filled by the composition root. Light on purpose:
the agent imports it at start, and prometheus-client only when a scrape
happens (`collector.py`), so an agent nobody scrapes never loads it.
Must never: read a part itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Getter", "MetricsSources"]

Getter = Callable[[], Any]


@dataclass(frozen=True, slots=True)
class MetricsSources:
    """What the collector reads, each asked for at scrape time."""

    identity: Getter
    name: str
    started_wall: float
    capabilities: Callable[[], list[dict[str, Any]]]
    inventory: Getter  # the current Inventory or None
    gossip: Getter
    store: Getter
    mesh: Getter
    secrets: Getter
    vms: Getter
    control: Getter
    web: Getter
    record_checks: Getter  # RecordChecker (its by_kind counts)
    events: Getter  # EventBus (its counts by type)
    listener: Getter = lambda: None  # the HTTP listener, when it runs
    wall: Callable[[], float] = time.time
