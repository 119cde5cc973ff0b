"""NAT traversal in the simulator: a few dozen machines behind simulated NAT
routers, each running the real sans-IO cores of the mesh (`Traversal`, and
through it `nat.ReflexiveBook`, `nat.PunchPlanner`, `relay.choose_relays`,
`relay.RelayGrants`; `relay.RelayPair` forwards at the relays; a
`PathSelector` per machine), on a virtual wall clock, with no kernel.

Owns: the NAT model (`Router`: an endpoint-independent mapping, one that
maps per destination -- "symmetric" -- or a public address behind a stateful
firewall; all filter inbound by the remote address and port the inside sent
to, as Linux conntrack does), a WireGuard model (every tick each machine
sends a handshake to every peer it has an endpoint for; the answer goes
back to where the initiation came from; a received packet moves the
receiver's endpoint to its source, as WireGuard roams), instant gossip of
the `nat` records, and the relay's ports.

Must never: read a clock, sleep, or touch the network; everything random
comes from one seeded `random.Random`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import count
from typing import Any

from clanagent.identity import Identity
from clanagent.mesh import nat
from clanagent.mesh.candidates import collect
from clanagent.mesh.paths import PathSelector
from clanagent.mesh.relay import RelayConfig, RelayLimiter, RelayPair
from clanagent.mesh.traversal import Traversal
from clanagent.mesh.wireguard import Device, PeerConfig, PeerStatus
from clanagent.wire import SignedRecord

__all__ = ["NatSim", "Router", "SimMachine"]

WG_PORT = 51820
INIT = b"\x01\x00\x00\x00" + bytes(144)  # a WireGuard initiation's framing (148 bytes)
RESP = b"\x02\x00\x00\x00" + bytes(88)  # a response (92 bytes)
T0 = 1_800_000_000.0


def split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


class Router:
    """One site's router: `eim` (one mapping per inside socket), `symmetric`
    (one per inside socket and destination) or `firewall` (no translation:
    the inside host has the public address). Inbound to a mapping passes only
    from an address the inside sent to through it."""

    def __init__(self, kind: str, ip: str, rng: random.Random) -> None:
        assert kind in ("eim", "symmetric", "firewall")
        self.kind, self.ip, self._rng = kind, ip, rng
        self._ports: dict[Any, int] = {}
        self._inside: dict[int, str] = {}
        self._sent: dict[int, set[str]] = {}

    def out(self, inside: str, dst: str) -> str:
        """The source address `dst` sees a packet from `inside` come from."""
        if self.kind == "firewall":
            port = split(inside)[1]
        else:
            key = inside if self.kind == "eim" else (inside, dst)
            port = self._ports.get(key)
            if port is None:
                port = self._rng.randrange(20000, 60000)
                while port in self._inside:
                    port = self._rng.randrange(20000, 60000)
                self._ports[key] = port
        self._inside[port] = inside
        self._sent.setdefault(port, set()).add(dst)
        return f"{self.ip}:{port}"

    def inbound(self, src: str, port: int) -> str | None:
        if src not in self._sent.get(port, ()):
            return None  # unsolicited: dropped
        return self._inside[port]


@dataclass
class SimMachine:
    name: str
    ident: Identity
    wg_key: bytes
    kind: str  # "public", "eim", "symmetric", "firewall"
    addr: str  # where its WireGuard socket is (inside a site for a NATed one)
    router: Router | None
    public: bool  # not tagged no-public
    traversal: Traversal = field(init=False)
    selector: PathSelector = field(init=False)
    endpoint: dict[bytes, str | None] = field(default_factory=dict)  # peer key -> WG endpoint
    handshake: dict[bytes, float] = field(default_factory=dict)
    rx: dict[bytes, int] = field(default_factory=dict)
    record: SignedRecord | None = None
    candidates: dict[bytes, list[Any]] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        return self.ident.public_key


class NatSim:
    """The clan: `machines` is [(name, kind, tags)]; kind "public" machines
    have a public address of their own and advertise it (in their
    `endpoints` record, as the service does), the rest sit alone behind
    a router of that kind and advertise nothing that others can reach."""

    def __init__(self, machines: Iterable[tuple[str, str, list[str]]], seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.wall = T0
        self.machines: dict[str, SimMachine] = {}
        self.by_key: dict[bytes, SimMachine] = {}
        self.doc: dict[str, Any] = {"machines": {}}
        self._versions = count(1)
        self._hosts: dict[str, SimMachine] = {}  # public IP -> machine
        self._routers: dict[str, tuple[Router, SimMachine]] = {}
        # relay ports: (ip, port) -> (relay machine, pair state, side, other port)
        self._relay_ports: dict[tuple[str, int], tuple[SimMachine, RelayPair, str, int]] = {}
        self._relay_next = count(40000)
        self._limiters: dict[str, RelayLimiter] = {}
        self.relay_config = RelayConfig()
        self.records_sent = 0
        self.rtt: dict[frozenset[str], float] = {}
        for i, (name, kind, tags) in enumerate(machines, 1):
            ident = Identity.generate()
            public = "no-public" not in tags
            if kind == "public":
                ip, router = f"192.0.2.{i}", None
            elif kind == "firewall":
                ip = f"198.19.{i}.1"
                router = Router(kind, ip, self.rng)
            else:
                ip = f"10.{i}.0.2"
                router = Router(kind, f"198.18.{i}.1", self.rng)
            m = SimMachine(name, ident, bytes([i]) * 32, kind, f"{ip}:{WG_PORT}", router, public)
            m.traversal = Traversal(m.key, ident.box_key)
            m.selector = PathSelector(public, random.Random(seed * 1000 + i))
            self.machines[name] = m
            self.by_key[m.key] = m
            if router is None:
                self._hosts[ip] = m
            else:
                self._routers[router.ip] = (router, m)
            self.doc["machines"][name] = {
                "node_key": m.key,
                "box_key": ident.box_public,
                "wg_key": m.wg_key,
                "tags": list(tags),
                "public": public,
                "endpoints": [],
            }
        # what the endpoints records say: a public member's own address; a
        # NATed machine's LAN address (private: nobody outside its site reaches
        # it); a firewalled one advertises nothing (its address is only learnt)
        self.endpoint_records = {
            m.key: {
                "lan": [f"{m.addr.rpartition(':')[0]}:7946"]
                if m.kind in ("eim", "symmetric")
                else [],
                "public": [f"{m.addr.rpartition(':')[0]}:7946"] if m.kind == "public" else [],
                "wg_port": WG_PORT,
            }
            for m in self.machines.values()
        }
        self._chosen_at: dict[tuple[str, bytes], tuple[Any, float]] = {}

    # ---- the network ---------------------------------------------------------------

    def _rtt(self, a: str, b: str) -> float:
        k = frozenset((a, b))
        if k not in self.rtt:
            self.rtt[k] = self.rng.uniform(0.005, 0.08)
        return self.rtt[k]

    def send(self, m: SimMachine, dst: str, data: bytes) -> tuple[SimMachine, str] | None:
        """`m`'s WireGuard sends `data` to `dst`: who gets it, from what source."""
        src = m.addr if m.router is None else m.router.out(m.addr, dst)
        return self._arrive(src, dst, data, hops=0)

    def _arrive(self, src: str, dst: str, data: bytes, hops: int) -> tuple[SimMachine, str] | None:
        host, port = split(dst)
        relay = self._relay_ports.get((host, port))
        if relay is not None and hops == 0:
            r, pair, side, other_port = relay

            def hosts_of(key: bytes) -> list[str]:
                return [r.traversal.wg_hosts.get(key, "")]

            shost, sport = split(src)
            to = pair.datagram(side, (shost, sport), data, hosts_of, self.wall)  # type: ignore[arg-type]
            if to is None:
                return None
            return self._arrive(f"{host}:{other_port}", f"{to[0]}:{to[1]}", data, hops=1)
        if host in self._hosts:
            return (self._hosts[host], src) if port == WG_PORT else None
        if host in self._routers:
            router, m = self._routers[host]
            return (m, src) if router.inbound(src, port) is not None else None
        return None

    def _handshake(self, m: SimMachine, n: SimMachine, dst: str) -> None:
        got = self.send(m, dst, INIT)
        if got is None or got[0] is not n:
            return
        n.endpoint[m.key] = got[1]  # WireGuard roams to the source of what it hears
        back = self.send(n, got[1], RESP)
        if back is None or back[0] is not m:
            return
        m.endpoint[n.key] = back[1]
        for x, y in ((m, n), (n, m)):
            x.handshake[y.key] = self.wall
            x.rx[y.key] = x.rx.get(y.key, 0) + 148

    # ---- one tick --------------------------------------------------------------------

    def device(self, m: SimMachine) -> Device:
        peers, status = {}, {}
        for n in self.machines.values():
            if n is m:
                continue
            peers[n.wg_key] = PeerConfig(n.wg_key, m.endpoint.get(n.key))
            status[n.wg_key] = PeerStatus(m.handshake.get(n.key), m.rx.get(n.key, 0), 0)
        return Device(None, WG_PORT, peers, status)

    def _round(self, m: SimMachine) -> None:
        t = m.traversal
        # as a relay: where each side's relayed packets come from (the shell's job)
        t.relay_sources = {}
        for r, pair, side, _ in self._relay_ports.values():
            if r is m and side in pair.learnt:
                key = pair.a if side == "a" else pair.b
                t.relay_sources[key] = "{}:{}".format(*pair.learnt[side][0])
        cands = collect(
            self.doc,
            self_key=m.key,
            records=self.endpoint_records,
            opened_inventory={},
            lan_seen={},
            onions={},
            reflexive=t.admitted(self.wall),
            relayed=t.relayed,
        )
        m.candidates = cands
        own_pref = ["lan", "public", "tor"] if m.public else ["lan", "tor"]
        for n in self.machines.values():
            if n is m:
                continue
            pref = nat.effective_preference(own_pref if n.public else ["lan", "tor"])
            m.selector.set_candidates(n.key, cands.get(n.key, []), pref, n.public, self.wall)
            m.selector.choose(n.key, self.wall)
        wg_to_node = {x.wg_key: x.key for x in self.machines.values()}
        out = t.round(self.device(m), wg_to_node, self.doc, m.selector, cands, self.wall, self.wall)
        for pair in out.close_pairs:
            for k in [k for k, v in self._relay_ports.items() if v[0] is m and v[1].a == pair[0]]:
                if self._relay_ports[k][1].b == pair[1]:
                    del self._relay_ports[k]
        limiter = self._limiters.setdefault(m.name, RelayLimiter(self.relay_config))
        for pair in out.open_pairs:
            pa, pb = next(self._relay_next), next(self._relay_next)
            state = RelayPair(pair[0], pair[1], self.relay_config, limiter=limiter)
            ip = m.addr.rpartition(":")[0]
            self._relay_ports[(ip, pa)] = (m, state, "a", pb)
            self._relay_ports[(ip, pb)] = (m, state, "b", pa)
            t.bind(pair, pa, pb)
        if out.body is not None:
            t.published(out.body, self.wall)
            m.record = SignedRecord.create(
                m.ident, nat.NAT_KIND, "", next(self._versions), out.body
            )
            self.records_sent += 1
            for n in self.machines.values():  # gossip: instant, to everyone
                if n is not m:
                    n.traversal.on_record(m.record, self.wall)

    def _wg_endpoint(self, m: SimMachine, key: bytes) -> str | None:
        """The endpoint the plan gives WireGuard for a peer (None: keep the learnt one)."""
        cur = m.selector.current(key)
        if cur is None:
            return None
        if cur.kind in ("lan", "public"):
            # peerplan._working: a failing path, or an unproven one while a
            # session is live, does not replace the address WireGuard learnt
            sel = m.selector
            live = self.wall - m.handshake.get(key, -1e9) < 180
            if not sel.healthy(key, cur) or (live and sel.rtt(key, cur) is None):
                return None
            return f"{cur.address.rpartition(':')[0]}:{cur.port_wg or WG_PORT}"
        return cur.address

    def tick(self) -> None:
        order = list(self.machines.values())
        self.rng.shuffle(order)
        for m in order:
            self._round(m)
        for m in order:
            for n in self.machines.values():
                if n is not m:
                    ep = self._wg_endpoint(m, n.key)
                    if ep is not None:
                        m.endpoint[n.key] = ep
        for m in order:
            peers = [n for n in self.machines.values() if n is not m]
            self.rng.shuffle(peers)
            for n in peers:
                ep = m.endpoint.get(n.key)
                if ep is not None:
                    self._handshake(m, n, ep)
        # a direct path is judged by WireGuard's handshakes (mesh service)
        for m in order:
            for n in self.machines.values():
                cur = None if n is m else m.selector.current(n.key)
                if cur is None or cur.kind not in ("lan", "public"):
                    continue
                hs = m.handshake.get(n.key)
                ep = m.endpoint.get(n.key) or ""
                since = self._chosen_at.get((m.name, n.key))
                if since is None or since[0] != cur.path_id:
                    since = self._chosen_at[(m.name, n.key)] = (cur.path_id, self.wall)
                if (
                    hs is not None
                    and self.wall - hs < 5
                    and ep.rpartition(":")[0] == cur.address.rpartition(":")[0]
                ):
                    rtt = self._rtt(m.name, n.name)
                    m.selector.report_success(n.key, cur, rtt, self.wall)
                elif self.wall - since[1] >= 3:
                    # no answer there: the probes (probe.ProbeConfig) fail a dead
                    # path in about 1-3 s
                    m.selector.report_failure(n.key, cur, self.wall)
                    del self._chosen_at[(m.name, n.key)]
        self.wall += 1.0

    def run(self, seconds: int) -> None:
        for _ in range(seconds):
            self.tick()

    # ---- views -----------------------------------------------------------------------

    def path(self, a: str, b: str) -> tuple[str, str] | None:
        """(kind, relay name or "") of the path a's WireGuard uses to b: the
        candidate at its endpoint (a failing LAN path the selector retries
        now and then does not move it), None when none."""
        m, key = self.machines[a], self.machines[b].key
        ep = m.endpoint.get(key)
        for c in m.candidates.get(key, []):
            addr = c.address
            if c.kind in ("lan", "public"):
                addr = f"{addr.rpartition(':')[0]}:{c.port_wg or WG_PORT}"
            if ep is not None and addr == ep:
                return (c.kind, c.via)
        return None

    def works(self, a: str, b: str, within: float = 3.0) -> bool:
        """WireGuard between a and b had a handshake in the last seconds."""
        hs = self.machines[a].handshake.get(self.machines[b].key)
        return hs is not None and self.wall - hs <= within
