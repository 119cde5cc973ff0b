"""The agent's implementations of two ports over trio: the clock and the record bus.

Owns: `TrioClock` (trio's clock for intervals, the system clock for
timestamps) and `AgentBus` (our records out through the agent's publish,
held to each kind's minimum interval by `PublishGate`; stored records back
to subscribers by kind).  The whole-agent simulator uses `AgentBus` too.
Must never: publish one (kind, key) faster than its kind's min_interval, or
block the event loop (a publisher that asks too soon sleeps on trio's clock).
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .ports import Subscriptions
from .publish_policy import PublishGate
from .records import min_interval

__all__ = ["AgentBus", "TrioClock"]


class TrioClock:
    """The Clock port: trio's clock for intervals, the system clock for timestamps."""

    def now(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return time.time()


class AgentBus:
    """The RecordBus port: our records go out through `publish` (the agent's
    body check, then gossip), never one (kind, key) faster than its kind's
    min_interval (`PublishGate`: a publisher that asks sooner waits, on
    trio's clock); stored records come back to subscribers by kind through
    `subscriptions.dispatch`. The whole-agent simulator uses it too."""

    def __init__(
        self,
        publish: Callable[[str, str, Any], Awaitable[bool]],
        rng: random.Random | None = None,
    ) -> None:
        self._publish = publish
        self.subscriptions = Subscriptions()
        self.gate = PublishGate(min_interval, rng or random.Random())

    async def publish(self, kind: str, key: str, body: Any) -> bool:
        wait = self.gate.wait(trio.current_time(), kind, key)
        if wait > 0:
            await trio.sleep(wait)
        self.gate.published(trio.current_time(), kind, key)
        return await self._publish(kind, key, body)

    def subscribe(self, kinds: Any, handler: Any) -> None:
        self.subscriptions.subscribe(kinds, handler)
