"""In-memory ports (clanagent.ports) for unit tests of one service (the VM and
topology tests; tests/_fake_ports.py is the secrets and services tests' kind).

Owns: a clock that follows trio's (virtual) clock, a record store and a bus
that signs, stores and hands every record back to the subscribers of its
kind (ours and, through `deliver`, a peer's -- as the agent does), a
membership view a test sets member by member, an inventory view a test
swaps, and an event sink that keeps what it got.
Must never: do I/O or reach a real agent: a test drives everything.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import trio

from clanagent.identity import Identity
from clanagent.ports import Ports, Subscriptions
from clanagent.wire import SignedRecord

__all__ = [
    "FakeClock",
    "FakeEvents",
    "FakeInventory",
    "FakeMembers",
    "MemoryBus",
    "MemoryStore",
    "fake_ports",
]

WALL0 = 1_800_000_000.0  # the wall clock when trio's clock reads 0


class FakeClock:
    """`now` is trio's clock (a MockClock in tests); `wall` runs alongside it."""

    def __init__(self, wall0: float = WALL0) -> None:
        self.wall0 = wall0
        self.outside = 0.0  # `now` when no trio run is current

    def now(self) -> float:
        try:
            return trio.current_time()
        except RuntimeError:
            return self.outside

    def wall(self) -> float:
        return self.wall0 + self.now()


class MemoryStore:
    """The RecordReader port over a dict: the newest version of each (origin, kind, key)."""

    def __init__(self) -> None:
        self._recs: dict[tuple[bytes, str, str], SignedRecord] = {}

    def put(self, rec: SignedRecord) -> bool:
        have = self._recs.get((rec.origin, rec.kind, rec.key))
        if have is not None and have.version >= rec.version:
            return False
        self._recs[(rec.origin, rec.kind, rec.key)] = rec
        return True

    def get(self, origin: bytes, kind: str, key: str) -> SignedRecord | None:
        return self._recs.get((origin, kind, key))

    def of_kind(self, kind: str) -> list[SignedRecord]:
        return [r for (_, k, _), r in self._recs.items() if k == kind]

    def max_version(self, origin: bytes) -> int:
        return max((r.version for (o, _, _), r in self._recs.items() if o == origin), default=0)


class MemoryBus:
    """The RecordBus port: sign with our identity, store, dispatch by kind.

    `check(record)` (optional) is the agent's own-record body check: it
    raises (clanagent.records.Refusal) to refuse, and `publish` then returns
    False. `published` keeps every (kind, key, body) that went out."""

    def __init__(
        self,
        identity: Identity,
        store: MemoryStore,
        check: Callable[[SignedRecord], Any] | None = None,
    ) -> None:
        self.identity = identity
        self.store = store
        self.check = check
        self.subscriptions = Subscriptions()
        self.published: list[tuple[str, str, Any]] = []
        self.refused: list[tuple[str, str, Any, Exception]] = []

    async def publish(self, kind: str, key: str, body: Any) -> bool:
        version = self.store.max_version(self.identity.public_key) + 1
        rec = SignedRecord.create(self.identity, kind, key, version, body)
        if self.check is not None:
            try:
                self.check(rec)
            except Exception as exc:  # noqa: BLE001 - the test reads what was refused
                self.refused.append((kind, key, body, exc))
                return False
        self.published.append((kind, key, body))
        self.deliver(rec)
        return True

    def subscribe(self, kinds: Collection[str], handler: Callable[[SignedRecord], None]) -> None:
        self.subscriptions.subscribe(kinds, handler)

    def deliver(self, rec: SignedRecord) -> bool:
        """A record arrives (ours or a peer's): stored, then its kind's handlers hear it."""
        if not self.store.put(rec):
            return False
        self.subscriptions.dispatch(rec)
        return True


class FakeMembers:
    """The Membership port: rows a test sets, and a change signal."""

    def __init__(self) -> None:
        self.members: dict[str, dict[str, Any]] = {}
        self._handlers: list[Callable[[], None]] = []
        self.is_synced = True

    def set(self, node_id: str, state: str, **fields: Any) -> None:
        """Add or change one member (fields: addr, rtt_ms, ...), then tell the listeners."""
        row = self.members.setdefault(node_id, {"node_id": node_id, "addr": "", "self": False})
        row.update(fields, state=state)
        for handler in list(self._handlers):
            handler()

    def state(self, node_id: str) -> str | None:
        row = self.members.get(node_id)
        return None if row is None else row["state"]

    def rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.members.values()]

    def synced(self) -> bool:
        return self.is_synced

    def subscribe(self, handler: Callable[[], None]) -> None:
        self._handlers.append(handler)


class FakeInventory:
    """The InventoryView port: a head a test swaps with `set`."""

    def __init__(self, inventory: Any = None, anchor: Any = None) -> None:
        self.inventory = inventory
        self.anchor = anchor
        self._handlers: list[Callable[[Any], None]] = []

    def set(self, inventory: Any) -> None:
        self.inventory = inventory
        for handler in list(self._handlers):
            handler(inventory)

    def subscribe(self, handler: Callable[[Any], None]) -> None:
        self._handlers.append(handler)


class FakeEvents:
    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, **fields: Any) -> None:
        self.got.append((topic, fields))


def fake_ports(
    identity: Identity | None = None,
    *,
    inventory: Any = None,
    check: Callable[[SignedRecord], Any] | None = None,
    clock: FakeClock | None = None,
) -> Ports:
    """Ports over fresh in-memory parts; `inventory` is an InventoryView (a
    FakeInventory, or a real InventoryManager)."""
    identity = identity or Identity.generate()
    store = MemoryStore()
    return Ports(
        clock=clock or FakeClock(),
        identity=identity,
        store=store,
        bus=MemoryBus(identity, store, check),
        members=FakeMembers(),
        inventory=inventory if inventory is not None else FakeInventory(),
        events=FakeEvents(),
    )
