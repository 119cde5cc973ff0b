"""A small stand-in for `clanagent.gossip.node.GossipNode`, for testing the harness.

Owns: nothing of the product.  It follows the GossipNode API exactly (same
method names, the same four action classes by name) with a deliberately
naive protocol: join by asking a seed for its member list, push gossip of
rumours (alive, dead, records) to `gossip_nodes` random members every
`gossip_interval`, direct pings only (no indirect probes), suspicion then
death after `suspicion_timeout`.  It exists so the driver, the cluster
helpers and the driver's own overhead can be tested without the real node.

Must never: be used to judge the real protocol's numbers.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import msgpack

from clanagent.gossip.config import GossipConfig
from clanagent.wire import SignedRecord

__all__ = ["FakeNode", "MemberChanged", "Persist", "RecordAccepted", "SendTo"]


@dataclass(frozen=True, slots=True)
class SendTo:
    node_id: str | None
    addr: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Persist:
    records: tuple[SignedRecord, ...]


@dataclass(frozen=True, slots=True)
class MemberChanged:
    node_id: str
    name: str
    addr: str
    state: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class RecordAccepted:
    record: SignedRecord


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


class FakeNode:
    def __init__(
        self,
        identity: Any,
        config: GossipConfig,
        *,
        addr: str,
        clan: bytes,
        store: Any,
        rng: random.Random,
        now: float,
        name: str = "",
    ) -> None:
        self.identity = identity
        self.node_id: str = identity.node_id
        self.config = config
        self.addr = addr
        self.clan = clan
        self.store = store
        self.rng = rng
        self.name = name
        self.incarnation = 0
        self.stats: dict[str, int] = {"bytes_sent": 0, "msgs_sent": 0, "bytes_received": 0}
        # node_id -> [addr, state, incarnation, name]
        self._members: dict[str, list[Any]] = {self.node_id: [addr, "alive", 0, name]}
        self._queue: list[list[Any]] = []  # [item, sends_left]
        self._probes: dict[int, tuple[str, float]] = {}
        self._suspects: dict[str, float] = {}
        self._seq = 0
        self._next_probe = now + rng.random() * config.probe_interval
        self._next_gossip = now + rng.random() * config.gossip_interval
        self._version = 0
        self._left = False

    # -- API --------------------------------------------------------------

    def join(self, now: float, seeds: list[str]) -> list[Any]:
        me = self._members[self.node_id]
        msg = _pack(["join", self.node_id, self.addr, self.incarnation, self.name])
        del me
        return [self._send(None, s, msg) for s in seeds if s != self.addr]

    def receive(self, now: float, from_addr: str, data: bytes) -> list[Any]:
        self.stats["bytes_received"] += len(data)
        msg = msgpack.unpackb(data, raw=False)
        kind = msg[0]
        out: list[Any] = []
        if kind == "ping":
            self._apply(now, msg[3], out)
            out.append(self._send(msg[2], from_addr, _pack(["ack", msg[1], self._piggyback()])))
        elif kind == "ack":
            probe = self._probes.pop(msg[1], None)
            if probe is not None:
                self._suspects.pop(probe[0], None)
                m = self._members.get(probe[0])
                if m is not None and m[1] == "suspect":
                    m[1] = "alive"
                    out.append(MemberChanged(probe[0], m[3], m[0], "alive", m[2]))
            self._apply(now, msg[2], out)
        elif kind == "join":
            _, nid, addr, inc, name = msg
            self._apply(now, [["a", nid, addr, inc, name]], out)
            state = [[k, *v] for k, v in self._members.items()]
            out.append(self._send(nid, from_addr, _pack(["state", state])))
        elif kind == "state":
            self._apply(now, [["a", e[0], e[1], e[3], e[4]] for e in msg[1]], out)
        elif kind == "gossip":
            self._apply(now, msg[1], out)
        return out

    def tick(self, now: float) -> list[Any]:
        out: list[Any] = []
        cfg = self.config
        n = len(self._members)
        for seq, (target, deadline) in list(self._probes.items()):
            if deadline <= now:
                del self._probes[seq]
                m = self._members.get(target)
                if m is not None and m[1] == "alive":
                    m[1] = "suspect"
                    self._suspects[target] = now + cfg.suspicion_timeout(n)
                    out.append(MemberChanged(target, m[3], m[0], "suspect", m[2]))
        for target, deadline in list(self._suspects.items()):
            if deadline <= now:
                del self._suspects[target]
                m = self._members[target]
                if m[1] == "suspect":
                    self._apply(now, [["d", target, m[2]]], out)
        if now >= self._next_probe:
            self._next_probe = now + cfg.probe_interval
            alive = [k for k, v in self._members.items() if v[1] == "alive" and k != self.node_id]
            if alive:
                target = self.rng.choice(alive)
                self._seq += 1
                self._probes[self._seq] = (target, now + cfg.probe_timeout)
                data = _pack(["ping", self._seq, self.node_id, self._piggyback()])
                out.append(self._send(target, self._members[target][0], data))
        if now >= self._next_gossip:
            self._next_gossip = now + cfg.gossip_interval
            if self._queue:
                peers = [
                    k for k, v in self._members.items() if v[1] != "dead" and k != self.node_id
                ]
                for target in self.rng.sample(peers, min(cfg.gossip_nodes, len(peers))):
                    items = self._piggyback()
                    if items:
                        data = _pack(["gossip", items])
                        out.append(self._send(target, self._members[target][0], data))
        return out

    def next_deadline(self) -> float:
        d = min(self._next_probe, self._next_gossip)
        for _, deadline in self._probes.values():
            d = min(d, deadline)
        for deadline in self._suspects.values():
            d = min(d, deadline)
        return d if not self._left else math.inf

    def publish(self, now: float, kind: str, key: str, body: Any) -> tuple[SignedRecord, list[Any]]:
        self._version += 1
        rec = SignedRecord.create(self.identity, kind, key, self._version, body, self.clan)
        return rec, [Persist((rec,))]

    def persisted(self, now: float, records: tuple[SignedRecord, ...]) -> list[Any]:
        out: list[Any] = []
        for rec, new in zip(records, self.store.put_many(records), strict=True):
            if new:
                self._queue.append([["r", rec.encode()], self._limit()])
                out.append(RecordAccepted(rec))
        return out

    def leave(self, now: float) -> list[Any]:
        self._left = True
        return []

    def members(self) -> list[dict[str, Any]]:
        return [
            {"node_id": k, "addr": v[0], "state": v[1], "incarnation": v[2], "name": v[3]}
            for k, v in self._members.items()
        ]

    def member_state(self, node_id: str) -> str | None:
        m = self._members.get(node_id)
        return None if m is None else m[1]

    # -- internals ------------------------------------------------------------

    def _limit(self) -> int:
        return self.config.retransmit_limit(len(self._members))

    def _send(self, node_id: str | None, addr: str, data: bytes) -> SendTo:
        self.stats["bytes_sent"] += len(data)
        self.stats["msgs_sent"] += 1
        return SendTo(node_id, addr, data)

    def _piggyback(self) -> list[Any]:
        items = []
        for entry in self._queue[:8]:
            items.append(entry[0])
            entry[1] -= 1
        self._queue = [e for e in self._queue if e[1] > 0]
        return items

    def _apply(self, now: float, items: list[Any], out: list[Any]) -> None:
        for item in items:
            tag = item[0]
            if tag == "a":
                _, nid, addr, inc, name = item
                m = self._members.get(nid)
                if nid == self.node_id:
                    continue
                if m is None or inc > m[2] or (m[1] == "dead" and inc >= m[2] and addr == m[0]):
                    if m is not None and m[1] == "dead" and inc <= m[2]:
                        continue
                    self._members[nid] = [addr, "alive", inc, name]
                    self._suspects.pop(nid, None)
                    out.append(MemberChanged(nid, name, addr, "alive", inc))
                    self._queue.append([item, self._limit()])
            elif tag == "d":
                _, nid, inc = item
                if nid == self.node_id:
                    if not self._left and inc >= self.incarnation:
                        self.incarnation = inc + 1
                        me = self._members[nid]
                        me[2] = self.incarnation
                        alive = ["a", nid, self.addr, self.incarnation, self.name]
                        self._queue.append([alive, self._limit()])
                    continue
                m = self._members.get(nid)
                if m is not None and m[1] != "dead" and inc >= m[2]:
                    m[1] = "dead"
                    self._suspects.pop(nid, None)
                    out.append(MemberChanged(nid, m[3], m[0], "dead", m[2]))
                    self._queue.append([item, self._limit()])
            elif tag == "r":
                rec = SignedRecord.decode(item[1], verify=False)
                out.append(Persist((rec,)))


class ChatterNode:
    """The cheapest possible node: measures the driver's and network's own cost.

    Every `interval` it sends one small datagram to a random peer among
    "n0".."n{n_peers-1}"; what it receives it only counts.
    """

    def __init__(self, addr: str, n_peers: int, rng: random.Random, interval: float = 0.2) -> None:
        self.addr = addr
        self.node_id = addr
        self.rng = rng
        self.n_peers = n_peers
        self.interval = interval
        self.received = 0
        self._next = rng.random() * interval
        self._payload = b"x" * 64

    def tick(self, now: float) -> list[Any]:
        self._next = now + self.interval
        peer = f"n{self.rng.randrange(self.n_peers)}"
        return [SendTo(None, peer, self._payload)]

    def receive(self, now: float, from_addr: str, data: bytes) -> list[Any]:
        self.received += 1
        return []

    def next_deadline(self) -> float:
        return self._next
