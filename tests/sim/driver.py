"""A discrete-event driver for many sans-IO gossip nodes on one virtual clock.

Owns: virtual time; two heaps, one of datagram deliveries and one of node
timer deadlines (lazily invalidated: after every call into a node its
`next_deadline()` is read again and pushed if it changed, and stale heap
entries are skipped when popped); carrying out the actions a node returns
(SendTo -> the network, Persist -> `node.persisted` at once, since the
simulated store is in memory, MemberChanged / RecordAccepted /
PeerMisbehaved -> the `EventLog` with their virtual time).

Must never: use trio, threads, sockets or the wall clock (that is what lets
a 1000-node run take seconds), or reach into a node's internals; it only uses
the node API of `clanagent.gossip.node.GossipNode`.

Actions are dispatched on their class *name* (SendTo, Persist, MemberChanged,
RecordAccepted) so the same driver runs the real node and the small fake in
`tests/sim/fakenode.py`.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

from tests.sim.network import Network

__all__ = ["Driver", "EventLog", "MemberEvent", "SimulationError"]

# Smallest step a node is rescheduled by when it asks to be ticked again at
# (or before) the instant it was just ticked; a real node must not do that,
# and `Driver.stats["stuck_timers"]` counts it so tests can say so.
_MIN_STEP = 1e-6


class SimulationError(Exception):
    """The harness was misused (e.g. a call into a crashed node)."""


class MemberEvent(tuple):
    """(t, observer_addr, state, incarnation) of one MemberChanged about a subject."""

    __slots__ = ()

    @property
    def t(self) -> float:
        return self[0]

    @property
    def observer(self) -> str:
        return self[1]

    @property
    def state(self) -> str:
        return self[2]

    @property
    def incarnation(self) -> int:
        return self[3]


class EventLog:
    """What nodes reported, with virtual times, indexed for the questions tests ask."""

    def __init__(self, record_alive: bool = True) -> None:
        # Joins are N*N "alive" events; a 1000-node benchmark does not need them.
        self.record_alive = record_alive
        self.by_subject: dict[str, list[MemberEvent]] = {}
        self.member_event_counts: dict[str, int] = {}
        # record_id -> {observer_addr: first virtual time it was accepted}
        self.accepted: dict[bytes, dict[str, float]] = {}
        self.records: dict[bytes, Any] = {}
        # (t, observer_addr, subject_node_id) for every "dead" verdict on a
        # node that was up and had never crashed at that time.
        self.false_positives: list[tuple[float, str, str]] = []
        # (t, observer_addr, peer_addr, reason) of every PeerMisbehaved.
        self.misbehaved: list[tuple[float, str, str, str]] = []

    def member(self, t: float, observer: str, node_id: str, state: str, incarnation: int) -> None:
        self.member_event_counts[state] = self.member_event_counts.get(state, 0) + 1
        if state == "alive" and not self.record_alive:
            return
        self.by_subject.setdefault(node_id, []).append(
            MemberEvent((t, observer, state, incarnation))
        )

    def record(self, t: float, observer: str, record: Any) -> None:
        rid = record.record_id
        seen = self.accepted.get(rid)
        if seen is None:
            seen = self.accepted[rid] = {}
            self.records[rid] = record
        seen.setdefault(observer, t)

    # -- queries --------------------------------------------------------------

    def first_times(self, subject: str, state: str, since: float = -math.inf) -> dict[str, float]:
        """observer -> first time (>= since) it reported `subject` in `state`."""
        out: dict[str, float] = {}
        for ev in self.by_subject.get(subject, ()):
            if ev[2] == state and ev[0] >= since and ev[1] not in out:
                out[ev[1]] = ev[0]
        return out

    def all_marked_at(
        self, subject: str, state: str, observers: Iterable[str], since: float = -math.inf
    ) -> float | None:
        """When the last of `observers` first reported `subject` in `state`, or None."""
        times = self.first_times(subject, state, since)
        latest = -math.inf
        for obs in observers:
            t = times.get(obs)
            if t is None:
                return None
            latest = max(latest, t)
        return latest

    def holders_at(self, record_id: bytes) -> dict[str, float]:
        """observer -> first time it accepted the record."""
        return self.accepted.get(record_id, {})


class Driver:
    """Runs nodes keyed by address; see the module docstring."""

    def __init__(self, network: Network, *, record_alive: bool = True) -> None:
        self.network = network
        self.now = 0.0
        self.nodes: dict[str, Any] = {}
        self.addr_of: dict[str, str] = {}  # node_id -> addr
        self.log = EventLog(record_alive=record_alive)
        self.ever_crashed: set[str] = set()
        self._gen: dict[str, int] = {}
        self._deadline: dict[str, float | None] = {}
        self._timers: list[tuple[float, int, str, int]] = []
        self._deliveries: list[tuple[float, int, str, str, bytes]] = []
        self._seq = itertools.count()
        self.stats = {
            "deliveries": 0,
            "ticks": 0,
            "sends": 0,
            "stuck_timers": 0,
            "past_deadlines": 0,
        }
        self._handlers: dict[type, Callable[[str, Any, Any], None]] = {}

    # -- nodes ----------------------------------------------------------------

    def add_node(self, node: Any) -> None:
        """Attach `node` at `node.addr` (replacing a previous node there, as on restart)."""
        addr = node.addr
        self.network.register(addr)
        self.network.restart(addr)
        self.nodes[addr] = node
        self.addr_of[node.node_id] = addr
        self._gen[addr] = self._gen.get(addr, 0) + 1
        self._deadline[addr] = None
        self._rearm(addr, node)

    def crash(self, addr: str) -> None:
        """Stop the node at `addr`: no more ticks, inbound traffic dropped."""
        self.network.crash(addr)
        self.ever_crashed.add(self.nodes[addr].node_id)
        self._gen[addr] += 1  # its pending timers go stale

    def is_up(self, addr: str) -> bool:
        return addr in self.nodes and self.network.is_up(addr)

    def live_addrs(self) -> list[str]:
        return [a for a in self.nodes if self.network.is_up(a)]

    def call(self, addr: str, fn: Callable[[Any], Any]) -> Any:
        """Call `fn(node)` now; it returns actions or (value, actions); returns value."""
        if not self.is_up(addr):
            raise SimulationError(f"{addr} is not running")
        node = self.nodes[addr]
        out = fn(node)
        value = None
        if isinstance(out, tuple):
            value, actions = out
        else:
            actions = out
        if actions:
            self._handle(addr, node, actions)
        self._rearm(addr, node)
        return value

    # -- time -----------------------------------------------------------------

    def run_until(self, t_end: float) -> None:
        """Process every event due at or before `t_end`; then now = t_end."""
        deliveries, timers = self._deliveries, self._timers
        net, nodes, stats = self.network, self.nodes, self.stats
        pop = heapq.heappop
        n_del = n_tick = 0
        while True:
            td = deliveries[0][0] if deliveries else math.inf
            tt = timers[0][0] if timers else math.inf
            if td <= tt:
                if td > t_end:
                    break
                t, _, src, dst, data = pop(deliveries)
                assert t >= self.now, "virtual time ran backwards"
                if not net.accept(src, dst, len(data)):
                    continue
                node = nodes.get(dst)
                if node is None:
                    continue
                self.now = t
                n_del += 1
                actions = node.receive(t, src, data)
                addr = dst
            else:
                if tt > t_end:
                    break
                t, _, addr, gen = pop(timers)
                if gen != self._gen[addr] or self._deadline[addr] != t:
                    continue
                node = nodes[addr]
                assert t >= self.now, "virtual time ran backwards"
                self.now = t
                self._deadline[addr] = None
                n_tick += 1
                actions = node.tick(t)
                if actions:
                    self._handle(addr, node, actions)
                self._rearm(addr, node, after_tick=True)
                continue
            if actions:
                self._handle(addr, node, actions)
            self._rearm(addr, node)
        stats["deliveries"] += n_del
        stats["ticks"] += n_tick
        if t_end > self.now:
            self.now = t_end

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_true(
        self, pred: Callable[[], bool], timeout: float, check_every: float = 0.1
    ) -> bool:
        """Run until `pred()` holds (checked every `check_every` virtual s) or `timeout`."""
        deadline = self.now + timeout
        while True:
            if pred():
                return True
            if self.now >= deadline:
                return False
            self.run_until(min(self.now + check_every, deadline))

    @property
    def events(self) -> int:
        return self.stats["deliveries"] + self.stats["ticks"]

    # -- internals ------------------------------------------------------------

    def _rearm(self, addr: str, node: Any, after_tick: bool = False) -> None:
        if not self.network.is_up(addr):
            return
        d = node.next_deadline()
        if d == self._deadline[addr] or d == math.inf:
            return
        if d <= self.now:
            if after_tick:
                # Asked to be ticked again at the instant it was just ticked.
                self.stats["stuck_timers"] += 1
                d = self.now + _MIN_STEP
            else:
                # A deadline already past means "as soon as possible"; time
                # never runs backwards.
                self.stats["past_deadlines"] += 1
                d = self.now
            if d == self._deadline[addr]:
                return
        self._deadline[addr] = d
        heapq.heappush(self._timers, (d, next(self._seq), addr, self._gen[addr]))

    def _handle(self, addr: str, node: Any, actions: Iterable[Any]) -> None:
        handlers = self._handlers
        for action in actions:
            h = handlers.get(type(action))
            if h is None:
                h = self._handler_for(type(action))
            h(addr, node, action)

    def _handler_for(self, cls: type) -> Callable[[str, Any, Any], None]:
        table = {
            "SendTo": self._on_send,
            "Persist": self._on_persist,
            "MemberChanged": self._on_member,
            "RecordAccepted": self._on_record,
            "PeerMisbehaved": self._on_misbehaved,
        }
        try:
            h = table[cls.__name__]
        except KeyError:
            raise SimulationError(f"unknown action {cls.__name__}") from None
        self._handlers[cls] = h
        return h

    def _on_send(self, addr: str, node: Any, action: Any) -> None:
        data = action.data
        self.stats["sends"] += 1
        t = self.network.send(self.now, addr, action.addr, len(data))
        if t is not None:
            heapq.heappush(self._deliveries, (t, next(self._seq), addr, action.addr, data))

    def _on_persist(self, addr: str, node: Any, action: Any) -> None:
        more = node.persisted(self.now, action.records)
        if more:
            self._handle(addr, node, more)

    def _on_member(self, addr: str, node: Any, action: Any) -> None:
        state = action.state
        self.log.member(self.now, addr, action.node_id, state, action.incarnation)
        if state == "dead" and action.node_id not in self.ever_crashed:
            subject_addr = self.addr_of.get(action.node_id)
            if subject_addr is not None and self.network.is_up(subject_addr):
                self.log.false_positives.append((self.now, addr, action.node_id))

    def _on_record(self, addr: str, node: Any, action: Any) -> None:
        self.log.record(self.now, addr, action.record)

    def _on_misbehaved(self, addr: str, node: Any, action: Any) -> None:
        self.log.misbehaved.append((self.now, addr, action.addr, action.reason))
