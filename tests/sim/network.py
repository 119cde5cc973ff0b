"""An in-memory datagram network on a virtual clock, for the cluster simulator.

Owns: which datagram gets through and when it arrives (latency drawn per
packet from a configurable model, loss globally and per link, partitions
into groups of addresses, crashed nodes whose inbound traffic vanishes), and
the per-address byte and message counters.  Everything random comes from one
`random.Random(seed)`, so a run is a function of its seed and of the order in
which the driver calls `send`.

Must never: read the wall clock, sleep, keep a queue of its own or call a
node; the driver owns the event heap and asks `send` when (if ever) a
datagram arrives and `accept` whether it may still be delivered.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Latency", "Network", "NodeCounters"]


@dataclass(frozen=True, slots=True)
class Latency:
    """One-way delay model: base + a fixed per-node access delay + per-packet jitter.

    `node_spread`: every address draws a fixed access delay uniform in
    [0, node_spread) once; a link's fixed delay is the sum of both ends' (so
    links differ, like hosts on different switches, in O(N) memory).
    `jitter`: the median of a lognormal per-packet extra (sigma `sigma`); the
    long right tail is what makes a probe timeout occasionally too short.
    """

    base: float = 0.001
    node_spread: float = 0.002
    jitter: float = 0.0005
    sigma: float = 0.6

    def __post_init__(self) -> None:
        for name in ("base", "node_spread", "jitter", "sigma"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")

    @classmethod
    def lan(cls) -> Latency:
        """About 1-5 ms one way: a busy LAN or one datacenter."""
        return cls()

    @classmethod
    def fixed(cls, delay: float) -> Latency:
        """Every datagram takes exactly `delay`: for tests that count time."""
        return cls(base=delay, node_spread=0.0, jitter=0.0)


class NodeCounters:
    """Traffic of one address as the network saw it."""

    __slots__ = ("bytes_sent", "msgs_sent", "bytes_received", "msgs_received", "msgs_dropped")

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.msgs_sent = 0
        self.bytes_received = 0
        self.msgs_received = 0
        # Datagrams this address sent that never arrived (loss, partition, crash).
        self.msgs_dropped = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Network:
    """Datagram delivery decisions between string addresses."""

    def __init__(
        self,
        seed: int = 0,
        latency: Latency | None = None,
        loss: float = 0.0,
        mtu: int | None = None,
    ) -> None:
        """`mtu`: if set, a datagram larger than this travels as that many IP
        fragments, each lost independently, and is lost if any one is (what
        UDP over a real network does); None loses whole datagrams only."""
        if mtu is not None and mtu < 1:
            raise ValueError("mtu must be >= 1")
        self.mtu = mtu
        self.rng = random.Random(seed)
        self.latency = latency if latency is not None else Latency()
        self.loss = 0.0
        self.set_loss(loss)
        self._access: dict[str, float] = {}
        self._link_loss: dict[tuple[str, str], float] = {}
        self._group: dict[str, int] | None = None
        self.down: set[str] = set()
        self.counters: dict[str, NodeCounters] = {}

    # -- topology ----------------------------------------------------------

    def register(self, addr: str) -> None:
        """Attach `addr` (idempotent; a fixed access delay is drawn once)."""
        if addr not in self.counters:
            self.counters[addr] = NodeCounters()
            self._access[addr] = self.rng.random() * self.latency.node_spread

    def crash(self, addr: str) -> None:
        """From now on datagrams to `addr` are lost (also those already in flight)."""
        self.down.add(addr)

    def restart(self, addr: str) -> None:
        self.down.discard(addr)

    def is_up(self, addr: str) -> bool:
        return addr not in self.down

    def set_loss(self, p: float) -> None:
        """Probability that any datagram is lost (independently per datagram)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError("loss must be in [0, 1]")
        self.loss = p

    def set_link_loss(self, a: str, b: str, p: float, *, symmetric: bool = True) -> None:
        """Loss on the link a -> b (and b -> a) instead of the global loss."""
        if not 0.0 <= p <= 1.0:
            raise ValueError("loss must be in [0, 1]")
        self._link_loss[(a, b)] = p
        if symmetric:
            self._link_loss[(b, a)] = p

    def clear_link_loss(self) -> None:
        self._link_loss.clear()

    def partition(self, groups: Iterable[Iterable[str]]) -> None:
        """Split the network: traffic between different groups is dropped.

        An address in no group is cut off from everyone (a group of its own).
        """
        group: dict[str, int] = {}
        for i, members in enumerate(groups):
            for addr in members:
                if addr in group:
                    raise ValueError(f"{addr} is in two groups")
                group[addr] = i
        self._group = group

    def heal(self) -> None:
        self._group = None

    def reachable(self, src: str, dst: str) -> bool:
        """Whether a partition lets src talk to dst right now (loss aside)."""
        group = self._group
        if group is None:
            return True
        gs = group.get(src, -1)
        return gs != -1 and gs == group.get(dst, -2)

    # -- datagrams ----------------------------------------------------------

    def send(self, now: float, src: str, dst: str, size: int) -> float | None:
        """Account a datagram of `size` bytes; return its arrival time, or None if lost.

        Loss and partitions are decided here (at send time) and the partition
        and the receiver's crash again in `accept` (at arrival time), so a
        partition or crash also eats what is already in flight.
        """
        c = self.counters[src]
        c.bytes_sent += size
        c.msgs_sent += 1
        if dst not in self.counters or (self._group is not None and not self.reachable(src, dst)):
            c.msgs_dropped += 1
            return None
        rng = self.rng
        p = self._link_loss.get((src, dst), self.loss) if self._link_loss else self.loss
        if p and self.mtu is not None and size > self.mtu:
            p = 1.0 - (1.0 - p) ** -(-size // self.mtu)
        if p and rng.random() < p:
            c.msgs_dropped += 1
            return None
        lat = self.latency
        delay = lat.base + self._access[src] + self._access[dst]
        if lat.jitter:
            delay += lat.jitter * math.exp(lat.sigma * rng.gauss(0.0, 1.0))
        return now + delay

    def accept(self, src: str, dst: str, size: int) -> bool:
        """At arrival: may the datagram src -> dst be handed to dst?  Counts it."""
        if dst in self.down or (self._group is not None and not self.reachable(src, dst)):
            self.counters[src].msgs_dropped += 1
            return False
        c = self.counters[dst]
        c.bytes_received += size
        c.msgs_received += 1
        return True

    def totals(self) -> dict[str, int]:
        """Sum of every address's counters."""
        out = dict.fromkeys(NodeCounters.__slots__, 0)
        for c in self.counters.values():
            for name in NodeCounters.__slots__:
                out[name] += getattr(c, name)
        return out
