"""The agent's implementations of two ports over trio: the clock and the record bus.

Owns: `TrioClock` (trio's clock for intervals, the system clock for
timestamps), `AgentBus` (our records out through the agent's publish,
held to each kind's minimum interval by `PublishGate`; stored records back
to subscribers by kind), how a record of ours goes out (`publish_own`:
through gossip when it runs under our clan, else signed into the store) and
forgetting records signed for another clan (`drop_other_clans`).  The
whole-agent simulator uses `AgentBus` too.
Must never: publish one (kind, key) faster than its kind's min_interval,
sign a record under another clan than the one gossip runs under, or block
the event loop (store writes run in a worker thread).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._log import kv
from .ports import Subscriptions
from .publish_policy import PublishGate
from .records import min_interval
from .wire import SignedRecord

__all__ = ["AgentBus", "TrioClock", "drop_other_clans", "publish_own"]

log = logging.getLogger("clanagent.agent")


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
        publish: Callable[..., Awaitable[bool]],
        rng: random.Random | None = None,
    ) -> None:
        self._publish = publish
        self.subscriptions = Subscriptions()
        self.gate = PublishGate(min_interval, rng or random.Random())

    async def publish(self, kind: str, key: str, body: Any, *, push: bool = True) -> bool:
        wait = self.gate.wait(trio.current_time(), kind, key)
        if wait > 0:
            await trio.sleep(wait)
        self.gate.published(trio.current_time(), kind, key)
        return await self._publish(kind, key, body, push=push)

    def subscribe(self, kinds: Any, handler: Any) -> None:
        self.subscriptions.subscribe(kinds, handler)


async def publish_own(
    gossip: Any,
    anchor: Any,
    store: Any,
    identity: Any,
    kind: str,
    key: str,
    body: Any,
    *,
    push: bool = True,
) -> None:
    """Gossip a record of ours (already checked), or only store it when gossip
    is off or still runs under another clan than our anchor's.  push=False:
    anti-entropy only (an unchanged soft refresh), no push to peers."""
    if (
        gossip is not None
        and gossip.node is not None
        and (anchor is None or gossip.clan == anchor.clan_id)
    ):
        gossip.publish(kind, key, body, push=push)
        return
    assert store is not None and identity is not None
    clan = anchor.clan_id if anchor else b""
    version = store.max_version(identity.public_key) + 1
    rec = SignedRecord.create(identity, kind, key, version, body, clan=clan)
    await trio.to_thread.run_sync(store.put, rec)


async def drop_other_clans(store: Any, clan_id: bytes) -> int:
    """Forget records signed for another clan (ours from before a clan init,
    or from an older bug): peers refuse them and score the sender down, and
    our own would never be republished (same body).  How many went."""

    def drop() -> int:
        stale = [r for r in store.records() if r.clan != clan_id]
        return sum(store.delete(r.origin, r.kind, r.key) for r in stale)

    dropped = await trio.to_thread.run_sync(drop)
    if dropped:
        log.info("dropped records of another clan", extra=kv(records=dropped))
    return dropped
