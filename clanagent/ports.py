"""The ports a part receives from the composition root (DESIGN.md rule 7).

Owns: the typed interfaces between the parts -- a clock, the record store
(read side), the record bus (publish; subscribe by kind), the membership
view, the inventory view and the event bus -- bundled as `Ports`, plus
`Subscriptions`, the plain by-kind dispatch table a bus implementation
keeps, and `NodeMembership`, the Membership port over a gossip node. The agent builds one `Ports` from its real parts (`agent.py`); the
whole-agent simulator (`tests/sim/agents.py`) builds the same from its
virtual clock and in-memory network, so the services it runs are the ones
people run.
Must never: hold state beyond the subscription tables, do I/O, or import
trio: a port is an interface, its implementations live with their owners.

A service receives `Ports` plus the few part-specific queries or settings
it needs (a directory, a callback) as plain constructor arguments; it never
receives the agent, and never reaches into another service.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .identity import Identity
    from .inventory.anchor import Anchor
    from .wire import SignedRecord

__all__ = [
    "Clock",
    "EventSink",
    "InventoryView",
    "Membership",
    "NodeMembership",
    "Ports",
    "RecordBus",
    "RecordReader",
    "Subscriptions",
]

log = logging.getLogger("clanagent.ports")


class Clock(Protocol):
    """Time as a part may read it. In the agent `now` is trio's clock and
    `wall` is `time.time`; in the simulator both follow the virtual clock."""

    def now(self) -> float:
        """Monotonic seconds: deadlines, intervals, settle times."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch: record timestamps and version floors only."""
        ...


class RecordReader(Protocol):
    """The read side of the record store (`clanagent.store.Store` is one)."""

    def get(self, origin: bytes, kind: str, key: str) -> SignedRecord | None: ...

    def of_kind(self, kind: str) -> list[SignedRecord]:
        """Every held record of one kind, from an index (never a whole-store scan)."""
        ...


class RecordBus(Protocol):
    """Where a part publishes its records and hears of everyone's."""

    async def publish(self, kind: str, key: str, body: Any, *, push: bool = True) -> bool:
        """Sign and spread one of our records; False when its body is refused
        by our own check (clanagent.records) -- it is then not published.
        `push=False` for a soft record republished unchanged (only to renew
        its TTL): it spreads by anti-entropy alone, not by epidemic push."""
        ...

    def subscribe(self, kinds: Collection[str], handler: Callable[[SignedRecord], None]) -> None:
        """Call `handler(record)` for every stored record (ours or a peer's) of
        these kinds. Handlers run on the event loop: they must only note the
        record and wake their own task."""
        ...


class Membership(Protocol):
    """The gossip membership as other parts may see it."""

    def state(self, node_id: str) -> str | None:
        """ "alive", "suspect", "dead", "left", or None for a stranger (node ids
        are `identity.node_id_of` strings)."""
        ...

    def rows(self) -> list[dict[str, Any]]:
        """One row per known member (`GossipNode.members()` shape)."""
        ...

    def synced(self) -> bool:
        """True once at least one anti-entropy exchange completed since start."""
        ...

    def subscribe(self, handler: Callable[[], None]) -> None:
        """Call `handler()` when someone joins, leaves or fails."""
        ...


class InventoryView(Protocol):
    """The clan's current desired state (`InventoryManager` is one)."""

    @property
    def inventory(self) -> Any:
        """The current head (`inventory.model.Inventory`) or None."""
        ...

    @property
    def anchor(self) -> Anchor | None: ...

    def subscribe(self, handler: Callable[[Any], None]) -> None:
        """Call `handler(inventory)` whenever the head changes."""
        ...


class EventSink(Protocol):
    """The local event stream (`clanctl events`, the web console)."""

    def publish(self, topic: str, **fields: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class Ports:
    """Everything a service may use of the rest of the agent."""

    clock: Clock
    identity: Identity
    store: RecordReader
    bus: RecordBus
    members: Membership
    inventory: InventoryView
    events: EventSink

    def me(self) -> str | None:
        """This machine's name in the current inventory, or None."""
        inv = self.inventory.inventory
        if inv is None:
            return None
        m = inv.machine_by_node_key(self.identity.public_key)
        return None if m is None else m.name


class Subscriptions:
    """A by-kind dispatch table: `subscribe(kinds, handler)`, `dispatch(record)`.

    A handler that raises is logged and counted; the others still run and the
    record stays stored (one part's bug must not stop another part hearing)."""

    def __init__(self) -> None:
        self._by_kind: dict[str, list[Callable[[SignedRecord], None]]] = {}
        self.faults = 0

    def subscribe(self, kinds: Iterable[str], handler: Callable[[SignedRecord], None]) -> None:
        for kind in kinds:
            self._by_kind.setdefault(kind, []).append(handler)

    def kinds(self) -> frozenset[str]:
        return frozenset(self._by_kind)

    def dispatch(self, rec: SignedRecord) -> None:
        for handler in self._by_kind.get(rec.kind, ()):
            try:
                handler(rec)
            except Exception as exc:  # noqa: BLE001 - one handler's fault stays there
                self.faults += 1
                log.warning(
                    "record handler failed",
                    extra={"kind": rec.kind, "error": f"{type(exc).__name__}: {exc}"},
                )


MAX_GONE = 16384  # forgotten members remembered (clan-size target with room)


class NodeMembership:
    """The Membership port over a gossip node (`GossipNode`'s queries).

    `node()` is asked on every call: the agent's gossip node is replaced when
    a clan change restarts gossip, and there is none before gossip runs.
    Whoever drives the node calls `changed()` when a member joins, leaves or
    fails; a handler that raises is logged and counted, the others still hear."""

    def __init__(self, node: Callable[[], Any]) -> None:
        self._node = node
        self._handlers: list[Callable[[], None]] = []
        self.faults = 0
        # Members the node has forgotten (memberlist reaps a dead or left
        # member after gossip_to_the_dead_time): their last row, so a machine
        # that left still shows "left" (not "unknown") until it comes back.
        # Per node object: a clan change starts afresh.
        self._gone: dict[str, dict[str, Any]] = {}
        self._gone_of: Any = None

    def state(self, node_id: str) -> str | None:
        node = self._node()
        if node is None:
            return None
        state = node.member_state(node_id)
        if state is None and self._gone_of is node:
            row = self._gone.get(node_id)
            return None if row is None else row["state"]
        return state

    def rows(self) -> list[dict[str, Any]]:
        node = self._node()
        if node is None:
            return []
        rows = node.members()
        if self._gone_of is not node:
            self._gone, self._gone_of = {}, node
        seen = set()
        for row in rows:
            seen.add(row["node_id"])
            if row["state"] in ("dead", "left"):
                if row["node_id"] in self._gone or len(self._gone) < MAX_GONE:
                    self._gone[row["node_id"]] = row
            else:
                self._gone.pop(row["node_id"], None)
        return rows + [row for nid, row in self._gone.items() if nid not in seen]

    def _note(self, node_id: str) -> None:
        node = self._node()
        if node is None:
            return
        if self._gone_of is not node:
            self.rows()  # a new node: start the record afresh
            return
        row = node.member_row(node_id)
        if row is None:
            return
        if row["state"] in ("dead", "left"):
            if node_id in self._gone or len(self._gone) < MAX_GONE:
                self._gone[node_id] = row
        else:
            self._gone.pop(node_id, None)

    def synced(self) -> bool:
        node = self._node()
        return node is not None and node.stats.get("ae_synced", 0) > 0

    def subscribe(self, handler: Callable[[], None]) -> None:
        self._handlers.append(handler)

    def changed(self, node_id: str | None = None) -> None:
        """A member changed state (`node_id`, when the caller knows which)."""
        # Note who is dead or left now, before the node forgets them: that
        # one member when we know which (listing all of them on every change
        # made a 1000-machine join cost N^2 rows per agent), else everyone.
        if node_id is None:
            self.rows()
        else:
            self._note(node_id)
        for handler in list(self._handlers):
            try:
                handler()
            except Exception as exc:  # noqa: BLE001 - one part's fault stays there
                self.faults += 1
                log.warning(
                    "membership handler failed", extra={"error": f"{type(exc).__name__}: {exc}"}
                )
