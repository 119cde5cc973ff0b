"""Who may hold a gossip connection, and what a failing one leaves behind (sans-IO).

Owns three small tables the listener and the service consult:

* `PendingTable`: the connections that have not finished the handshake yet
  (anyone on the network can open them), capped in total and per source
  (an IPv4 address, an IPv6 /64).  When the table is full a newcomer from
  the source that holds the most is refused; anyone else takes the place of
  the oldest connection of that source, so one flooding source can never
  starve the others.  A source at its own cap gives up its oldest connection
  to its newest (a slow-loris holds old ones; a live peer just dialed).
  Loopback sources get a larger cap of their own: every peer that reaches
  us over Tor arrives from 127.0.0.1.
* `SessionTable`: the authenticated sessions, capped in total and per peer
  node; the oldest give way.
* `FaultLog`: counts every unexpected exception that ended a connection and
  says whether to log it (once per peer and exception type, in a bounded
  table), so a bug triggered by one peer ends that peer's connection, is
  seen once in the log, and never stops the agent.

Must never: do I/O, read a clock (the order of arrival is the only time
these tables need), or import trio.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

__all__ = [
    "AdmissionLimits",
    "FaultLog",
    "PendingTable",
    "SessionTable",
    "Verdict",
    "source_of",
]

# The defaults, sized for a clan of a few hundred machines: a real peer holds a
# pending connection for a few round trips, so 128 pending slots serve a burst
# of everyone reconnecting at once, and an attacker's idle connections cost us
# at most 128 file descriptors.
MAX_PENDING = 128
MAX_PENDING_PER_SOURCE = 8
MAX_PENDING_LOOPBACK = 32  # per loopback address: all Tor peers share 127.0.0.1
MAX_SESSIONS = 320
MAX_SESSIONS_PER_PEER = 2  # both sides dialing at once, and nothing more
_FAULT_KEYS = 1024  # distinct (peer, exception type) pairs remembered for logging


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_pending: int = MAX_PENDING
    max_pending_per_source: int = MAX_PENDING_PER_SOURCE
    max_pending_loopback: int = MAX_PENDING_LOOPBACK
    max_sessions: int = MAX_SESSIONS
    max_sessions_per_peer: int = MAX_SESSIONS_PER_PEER

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int")


def source_of(host: str) -> tuple[str, bool]:
    """(the source a connection from `host` counts against, is it loopback).

    IPv4: the address.  IPv6: its /64, the smallest block one site gets, so
    that a host cannot take 2**64 sources.  An IPv4-mapped IPv6 address is
    its IPv4 address.  Anything that is not an IP address is its own source.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host, False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip), ip.is_loopback
    net = ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))
    return str(net), ip.is_loopback


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with a newcomer: keep it or not, and which pending connection
    (if any) to close now to make room."""

    admitted: bool
    evict: Hashable | None = None


class PendingTable:
    """The unauthenticated connections and their sources, oldest first."""

    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self._source: OrderedDict[Hashable, str] = OrderedDict()  # conn -> source, by age
        self._by_source: dict[str, OrderedDict[Hashable, None]] = {}
        self._loopback: set[str] = set()
        self.counts = {"pending_admitted": 0, "pending_refused": 0, "pending_evicted": 0}

    def __len__(self) -> int:
        return len(self._source)

    def __contains__(self, conn: Hashable) -> bool:
        return conn in self._source

    def held_by(self, host: str) -> int:
        """How many pending connections the source of `host` holds."""
        return len(self._by_source.get(source_of(host)[0], ()))

    def sources(self) -> int:
        return len(self._by_source)

    def admit(self, conn: Hashable, host: str) -> Verdict:
        """A connection `conn` arrived from `host`: keep it, and close whom?

        When the verdict names a connection to evict, that connection has
        already left the table; the caller closes it.
        """
        if conn in self._source:
            raise ValueError(f"connection {conn!r} is already pending")
        source, loopback = source_of(host)
        if loopback:
            self._loopback.add(source)
        held = self._by_source.get(source)
        evict: Hashable | None = None
        if held is not None and len(held) >= self._cap(source):
            evict = next(iter(held))  # the source's own oldest makes room
        elif len(self._source) >= self.limits.max_pending:
            biggest = self._biggest()
            if len(held or ()) >= len(self._by_source[biggest]):
                self.counts["pending_refused"] += 1
                return Verdict(False)
            evict = next(iter(self._by_source[biggest]))
        if evict is not None:
            self.release(evict)
            self.counts["pending_evicted"] += 1
        self._source[conn] = source
        self._by_source.setdefault(source, OrderedDict())[conn] = None
        self.counts["pending_admitted"] += 1
        return Verdict(True, evict)

    def release(self, conn: Hashable) -> None:
        """`conn` is authenticated or gone (idempotent)."""
        source = self._source.pop(conn, None)
        if source is None:
            return
        held = self._by_source[source]
        del held[conn]
        if not held:
            del self._by_source[source]
            self._loopback.discard(source)

    def _cap(self, source: str) -> int:
        if source in self._loopback:
            return self.limits.max_pending_loopback
        return self.limits.max_pending_per_source

    def _biggest(self) -> str:
        # The source holding the most; among equals, the one whose oldest
        # connection is the oldest.  At most max_pending entries: a scan is cheap.
        best, best_len = "", -1
        for source in self._source.values():
            n = len(self._by_source[source])
            if n > best_len:
                best, best_len = source, n
        return best


class SessionTable:
    """The authenticated sessions, per peer node, oldest first."""

    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self._node: OrderedDict[Hashable, str] = OrderedDict()  # session -> node id, by age
        self._by_node: dict[str, OrderedDict[Hashable, None]] = {}
        self.counts = {"sessions_opened": 0, "sessions_evicted": 0}

    def __len__(self) -> int:
        return len(self._node)

    def __contains__(self, session: Hashable) -> bool:
        return session in self._node

    def held_by(self, node_id: str) -> int:
        return len(self._by_node.get(node_id, ()))

    def open(self, session: Hashable, node_id: str) -> list[Hashable]:
        """A session with `node_id` is established; return the sessions to close
        (already removed from the table) to stay within the caps."""
        if session in self._node:
            raise ValueError(f"session {session!r} is already open")
        self._node[session] = node_id
        self._by_node.setdefault(node_id, OrderedDict())[session] = None
        self.counts["sessions_opened"] += 1
        evict: list[Hashable] = []
        held = self._by_node[node_id]
        while len(held) > self.limits.max_sessions_per_peer:
            evict.append(next(iter(held)))
            self.close(evict[-1])
        while len(self._node) > self.limits.max_sessions:
            evict.append(next(iter(self._node)))
            self.close(evict[-1])
        self.counts["sessions_evicted"] += len(evict)
        return evict

    def close(self, session: Hashable) -> None:
        """`session` ended (idempotent)."""
        node_id = self._node.pop(session, None)
        if node_id is None:
            return
        held = self._by_node[node_id]
        del held[session]
        if not held:
            del self._by_node[node_id]


class FaultLog:
    """Unexpected exceptions that ended one connection: count all, log each kind once.

    `absorb(peer, exc)` sorts what a connection's task raised: the errors
    (Exception, also inside an exception group, as a nursery raises them)
    are counted and end only that connection; what is not an Exception
    (trio's Cancelled, KeyboardInterrupt) is returned for the caller to
    re-raise, since it belongs to whoever cancelled.  Errors of the
    `expected` types (a peer going away, a refused handshake) are the
    ordinary end of a connection: neither counted nor logged here.
    """

    def __init__(self, max_keys: int = _FAULT_KEYS) -> None:
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._max_keys = max_keys
        self.counts = {"internal_errors": 0}

    def absorb(
        self,
        peer: str,
        exc: BaseException,
        expected: tuple[type[BaseException], ...] = (),
    ) -> tuple[list[BaseException], BaseException | None]:
        """(the errors to log now, what the caller must re-raise or None)."""
        if isinstance(exc, BaseExceptionGroup):
            errors, rest = exc.split(Exception)
            leaves = list(_leaves(errors)) if errors is not None else []
        elif isinstance(exc, Exception):
            leaves, rest = [exc], None
        else:
            return [], exc
        to_log = []
        for leaf in leaves:
            if expected and isinstance(leaf, expected):
                continue
            self.counts["internal_errors"] += 1
            if self._first(peer, type(leaf)):
                to_log.append(leaf)
        return to_log, rest

    def _first(self, peer: str, kind: type) -> bool:
        key = (peer, f"{kind.__module__}.{kind.__qualname__}")
        if key in self._seen:
            self._seen.move_to_end(key)
            return False
        self._seen[key] = None
        while len(self._seen) > self._max_keys:
            self._seen.popitem(last=False)
        return True


def _leaves(group: BaseExceptionGroup):
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc
