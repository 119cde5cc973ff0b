"""Fake ports for one part under test, and for the whole-agent simulator.

Owns: small in-memory implementations of the `clanagent.ports` interfaces,
one class per port -- a clock you move by hand (`FakeClock`) or one that
follows trio's clock (`TrioFollowingClock`), a real in-memory `Store`, a
record bus that signs, stores, then dispatches by kind (`ListBus`), a
membership table of rows you edit (`FakeMembership`), an inventory view you
set (`FakeInventory`) and an event log (`EventLog`) -- bundled by
`FakePorts.build(...)`, whose `.ports` is the real `Ports` a service is
constructed with; `fake_ports(...)` is the short form that returns those
`Ports` at once (on trio's clock) for a test that drives everything through
them.
Must never: do I/O, or behave differently from the agent's ports in what a
part can observe (a published record passes the body check, is stored, then
dispatched; a handler runs synchronously, in the publisher's task).

Typical use::

    fp = FakePorts.build(identity, inventory=inventory_of(doc))
    svc = SomeService(fp.ports, ...)
    fp.members.set(node_id_of(peer_key), "alive")  # handlers hear it
    fp.bus.deliver(peer_record)                     # a peer's record arrives
    fp.bus.published                                # what the part published

    ports = fake_ports(identity, inventory=manager)  # any InventoryView
    ports.members.set(node_id, "alive", addr="10.0.0.2:7946", rtt_ms=0.5)
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import trio

from clanagent.identity import Identity, node_id_of
from clanagent.inventory.anchor import Anchor
from clanagent.inventory.model import Inventory
from clanagent.ports import InventoryView, Ports, Subscriptions
from clanagent.store import Store
from clanagent.wire import SignedRecord

__all__ = [
    "WALL0",
    "EventLog",
    "FakeClock",
    "FakeInventory",
    "FakeMembership",
    "FakePorts",
    "ListBus",
    "Rounds",
    "TrioFollowingClock",
    "anchor_of",
    "fake_ports",
    "inventory_of",
]

# The wall clock at now() == 0: a plausible epoch time (January 2027), after
# anything a test stamps with the real time.time(), so those are never "from
# the future" for a body check that reads the fake wall clock.
WALL0 = 1_800_000_000.0


class FakeClock:
    """The Clock port, moved by hand: `advance(dt)` moves both clocks."""

    def __init__(self, now: float = 0.0, wall: float = WALL0) -> None:
        self.t = now
        self._wall = wall - now

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self._wall + self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class TrioFollowingClock:
    """The Clock port following trio's clock: under `trio.testing.MockClock`
    both `now` and `wall` are virtual. Outside `trio.run` (a test setting up)
    `now` reads `outside`."""

    def __init__(self, wall0: float = WALL0, *, outside: float = 0.0) -> None:
        self.wall0 = wall0
        self.outside = outside

    def now(self) -> float:
        try:
            return trio.current_time()
        except RuntimeError:
            return self.outside

    def wall(self) -> float:
        return self.wall0 + self.now()


class ListBus:
    """The RecordBus port over an in-memory store.

    `publish` checks the body, signs a record of ours (next version, our
    clan's id), stores it, appends it to `published` and dispatches it to the
    subscribers of its kind; `deliver` stores a record made elsewhere (a
    peer's) and dispatches it if the store took it. `check(kind, key, body)
    -> bool`, when given, plays the agent's own-record body check
    (`Agent.check_own_record`): False refuses the record -- nothing is
    published, and `refused` keeps (kind, key, body)."""

    def __init__(
        self,
        identity: Identity,
        store: Store,
        *,
        clan: Callable[[], bytes] = lambda: b"",
        check: Callable[[str, str, Any], bool] | None = None,
    ) -> None:
        self.identity = identity
        self.store = store
        self.clan = clan
        self.check = check
        self.subscriptions = Subscriptions()
        self.published: list[SignedRecord] = []
        self.refused: list[tuple[str, str, Any]] = []
        self.unpushed: list[SignedRecord] = []  # published with push=False (refreshes)
        self._changed: trio.Event | None = None

    async def publish(self, kind: str, key: str, body: Any, *, push: bool = True) -> bool:
        if self.check is not None and not self.check(kind, key, body):
            self.refused.append((kind, key, body))
            return False
        version = self.store.max_version(self.identity.public_key) + 1
        rec = SignedRecord.create(self.identity, kind, key, version, body, clan=self.clan())
        self.published.append(rec)
        if not push:
            self.unpushed.append(rec)
        self.deliver(rec)
        return True

    def subscribe(self, kinds: Collection[str], handler: Callable[[SignedRecord], None]) -> None:
        self.subscriptions.subscribe(kinds, handler)

    def deliver(self, rec: SignedRecord) -> bool:
        """A record arrives (ours or a peer's): stored, then heard. False when
        the store already held it (or a newer one): nobody hears it then."""
        if not self.store.put(rec):
            return False
        self.subscriptions.dispatch(rec)
        if self._changed is not None:
            self._changed.set()
        return True

    def of(self, kind: str, key: str | None = None) -> list[SignedRecord]:
        """What we published of one kind (and key)."""
        return [r for r in self.published if r.kind == kind and (key is None or r.key == key)]

    async def wait_published(
        self, kind: str, key: str | None = None, *, count: int = 1
    ) -> SignedRecord:
        """Wait until we published `count` records of this kind (and key); the newest."""
        while len(self.of(kind, key)) < count:
            if self._changed is None or self._changed.is_set():
                self._changed = trio.Event()
            await self._changed.wait()
        return self.of(kind, key)[-1]


class FakeMembership:
    """The Membership port as an editable table: `members` maps a node id to
    its row (the `GossipNode.members()` shape: state, addr, rtt_ms, ...).

    `set` and `set_keys` tell the subscribers; a test may also edit a row in
    place (an RTT that drifts, a failure nobody announced): nobody hears that."""

    def __init__(self, *, synced: bool = True) -> None:
        self.members: dict[str, dict[str, Any]] = {}
        self.is_synced = synced
        self._handlers: list[Callable[[], None]] = []

    def state(self, node_id: str) -> str | None:
        row = self.members.get(node_id)
        return None if row is None else row["state"]

    def rows(self) -> list[dict[str, Any]]:
        return [dict(row) for _, row in sorted(self.members.items())]

    def synced(self) -> bool:
        return self.is_synced

    def subscribe(self, handler: Callable[[], None]) -> None:
        self._handlers.append(handler)

    def set(self, node_id: str, state: str | None, *, notify: bool = True, **fields: Any) -> None:
        """Add or change one member (None: forget it) -- `fields` are other
        row fields (addr, rtt_ms, name, ...) -- and tell the subscribers."""
        if state is None:
            self.members.pop(node_id, None)
        else:
            self._row(node_id).update(fields, state=state)
        if notify:
            self._notify()

    def set_keys(self, keys: Collection[bytes], state: str = "alive") -> None:
        """Every one of these node keys in `state`, one notification."""
        for key in keys:
            self._row(node_id_of(key))["state"] = state
        self._notify()

    def _row(self, node_id: str) -> dict[str, Any]:
        return self.members.setdefault(
            node_id,
            {
                "node_id": node_id,
                "name": "",
                "addr": "",
                "state": "alive",
                "incarnation": 0,
                "rtt_ms": None,
                "self": False,
            },
        )

    def _notify(self) -> None:
        for handler in list(self._handlers):
            handler()


class FakeInventory:
    """The InventoryView port: an inventory you set (subscribers hear it)."""

    def __init__(self, inventory: Inventory | None = None, anchor: Anchor | None = None) -> None:
        self._inventory = inventory
        self._anchor = anchor
        self._handlers: list[Callable[[Any], None]] = []

    @property
    def inventory(self) -> Inventory | None:
        return self._inventory

    @property
    def anchor(self) -> Anchor | None:
        return self._anchor

    def subscribe(self, handler: Callable[[Any], None]) -> None:
        self._handlers.append(handler)

    def set(self, inventory: Inventory) -> None:
        self._inventory = inventory
        for handler in list(self._handlers):
            handler(inventory)


@dataclass
class EventLog:
    """The EventSink port: every event, in order, as (topic, fields)."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def publish(self, topic: str, **fields: Any) -> None:
        self.events.append((topic, fields))

    def topics(self) -> list[str]:
        return [t for t, _ in self.events]


def inventory_of(doc: dict[str, Any]) -> Inventory:
    """The real inventory model of a document (validated, as the manager would)."""
    return Inventory(doc)


def anchor_of(doc: dict[str, Any]) -> Anchor:
    clan = doc["clan"]
    return Anchor(clan["id"], clan["name"], tuple(clan["admins"]))


@dataclass
class FakePorts:
    """One machine's fake ports; `.ports` is what a service is built with."""

    clock: Any
    identity: Identity
    store: Store
    bus: ListBus
    members: FakeMembership
    inventory: InventoryView
    events: EventLog

    @classmethod
    def build(
        cls,
        identity: Identity | None = None,
        *,
        inventory: Inventory | None = None,
        anchor: Anchor | None = None,
        view: InventoryView | None = None,
        clock: Any = None,
        store: Store | None = None,
        synced: bool = True,
        check: Callable[[str, str, Any], bool] | None = None,
    ) -> FakePorts:
        """`inventory` (and `anchor`, else the inventory's [clan] section) make
        a `FakeInventory`; or `view` is the InventoryView itself (a
        `FakeInventory`, or a real `InventoryManager`). Our records carry the
        view's anchor's clan id, as the agent's do."""
        identity = identity or Identity.generate()
        store = store if store is not None else Store(None)
        if view is None:
            if anchor is None and inventory is not None:
                anchor = anchor_of(inventory.doc)
            view = FakeInventory(inventory, anchor)
        elif inventory is not None or anchor is not None:
            raise TypeError("give either view, or inventory (and anchor)")

        def clan() -> bytes:
            return b"" if view.anchor is None else view.anchor.clan_id

        return cls(
            clock=clock if clock is not None else FakeClock(),
            identity=identity,
            store=store,
            bus=ListBus(identity, store, clan=clan, check=check),
            members=FakeMembership(synced=synced),
            inventory=view,
            events=EventLog(),
        )

    @property
    def ports(self) -> Ports:
        return Ports(
            clock=self.clock,
            identity=self.identity,
            store=self.store,
            bus=self.bus,
            members=self.members,
            inventory=self.inventory,
            events=self.events,
        )


def fake_ports(
    identity: Identity | None = None,
    *,
    inventory: InventoryView | None = None,
    check: Callable[[str, str, Any], bool] | None = None,
    clock: Any = None,
) -> Ports:
    """`FakePorts.build(...).ports` on trio's clock (a `TrioFollowingClock`
    unless `clock` is given); `inventory` is an InventoryView (a
    `FakeInventory`, or a real `InventoryManager`), an empty one if None.
    The fakes stay reachable through the ports: `ports.bus.published`,
    `ports.members.set(...)`, `ports.inventory.set(...)`."""
    return FakePorts.build(
        identity,
        view=inventory if inventory is not None else FakeInventory(),
        check=check,
        clock=clock if clock is not None else TrioFollowingClock(),
    ).ports


class Rounds:
    """Counts a service's completed `sync_once` rounds, and lets a test await
    the next one (instead of sleeping): `rounds = Rounds(svc)` before
    `svc.run` starts, then `await rounds.reach(n)`."""

    def __init__(self, service: Any) -> None:
        self.done = 0
        self._event = trio.Event()
        real = service.sync_once

        async def counted() -> None:
            try:
                await real()
            finally:
                self.done += 1
                self._event.set()

        service.sync_once = counted

    async def reach(self, n: int) -> None:
        while self.done < n:
            if self._event.is_set():
                self._event = trio.Event()
            await self._event.wait()
