"""The mesh service's NAT bookkeeping (mesh/traversal.py), three machines on a
fake WireGuard device: a public member p observes a and b behind NATs; a and b
learn their mappings from p's sealed observations, punch on a shared clock,
and the window is judged from WireGuard's counters."""

from __future__ import annotations

import random
from itertools import count

from clanagent.identity import Identity
from clanagent.mesh import nat
from clanagent.mesh.candidates import collect
from clanagent.mesh.nat import effective_preference
from clanagent.mesh.paths import PathSelector
from clanagent.mesh.traversal import Traversal
from clanagent.mesh.wireguard import Device, PeerConfig, PeerStatus
from clanagent.wire import SignedRecord

T0 = 1_800_000_000.0
WAN = {"a": "198.51.100.1:51820", "b": "198.51.100.2:51820"}
_versions = count(1)


def clan():
    ids = {n: Identity.generate() for n in ("a", "b", "p")}
    doc = {"machines": {}}
    for i, (n, ident) in enumerate(sorted(ids.items())):
        doc["machines"][n] = {
            "node_key": ident.public_key,
            "box_key": ident.box_public,
            "wg_key": bytes([i + 1]) * 32,
            "tags": ["relay"] if n == "p" else [],
            "public": True,
            "endpoints": [],
        }
    return ids, doc


class Machine:
    def __init__(self, name, ids, doc):
        self.name, self.ids, self.doc = name, ids, doc
        self.key = ids[name].public_key
        self.t = Traversal(self.key, ids[name].box_key, nat.PunchConfig(lead=2.0, window=10.0))
        self.sel = PathSelector(True, random.Random(0))
        self.endpoint: dict[str, str | None] = {}
        self.rx: dict[str, int] = {}
        self.handshake: dict[str, float | None] = {}
        self.record: SignedRecord | None = None
        self.records: dict = {}  # endpoints records (parsed bodies) by node key
        self.onions: dict = {}  # node key -> onion host:port

    def wg(self, name):
        return self.doc["machines"][name]["wg_key"]

    def device(self) -> Device:
        peers, status = {}, {}
        for n in self.doc["machines"]:
            if n == self.name:
                continue
            peers[self.wg(n)] = PeerConfig(self.wg(n), self.endpoint.get(n))
            status[self.wg(n)] = PeerStatus(self.handshake.get(n), self.rx.get(n, 0), 0)
        return Device(None, 51820, peers, status)

    def round(self, wall: float):
        wg_to_node = {m["wg_key"]: m["node_key"] for m in self.doc["machines"].values()}
        cands = collect(
            self.doc,
            self_key=self.key,
            records=self.records,
            opened_inventory={},
            lan_seen={},
            onions=self.onions,
            reflexive=self.t.admitted(wall),
            relayed=self.t.relayed,
        )
        for n, m in self.doc["machines"].items():
            if n != self.name:
                pref = effective_preference(["lan", "public", "tor"])
                self.sel.set_candidates(m["node_key"], cands[m["node_key"]], pref, True, wall)
                self.sel.choose(m["node_key"], wall)
        out = self.t.round(self.device(), wg_to_node, self.doc, self.sel, cands, wall, wall)
        if out.body is not None:
            self.t.published(out.body, wall)
            self.record = SignedRecord.create(
                self.ids[self.name], "nat", "", next(_versions), out.body
            )
        return out


def deliver(frm: Machine, to: list[Machine], wall: float) -> None:
    for m in to:
        m.t.on_record(frm.record, wall)


def test_mappings_are_learnt_from_sealed_observations_and_punched():
    ids, doc = clan()
    a, b, p = (Machine(n, ids, doc) for n in ("a", "b", "p"))
    # p's WireGuard hears a and b at their routers
    for n in ("a", "b"):
        p.endpoint[n], p.handshake[n] = WAN[n], T0
    out = p.round(T0)
    assert out.body is not None and len(out.body["seen"]) == 2
    # the record names no address in the clear
    assert b"198.51.100" not in repr(out.body).encode()
    # an unchanged state is an unchanged body: nothing to republish
    assert p.round(T0 + 1).body is None
    deliver(p, [a, b], T0 + 1)
    assert a.t.book.addresses(T0 + 1) == [WAN["a"]]
    assert b.t.book.addresses(T0 + 1) == [WAN["b"]]
    a.round(T0 + 1), b.round(T0 + 1)
    deliver(a, [b], T0 + 1)
    deliver(b, [a], T0 + 1)
    assert a.t.peer_reflexive[b.key] == [WAN["b"]]
    # the lower key asks; its next record carries the request
    lo, hi = (a, b) if a.key < b.key else (b, a)
    lo.round(T0 + 2)
    deliver(lo, [hi], T0 + 2)
    [(peer, at_ms, _)] = lo.t.planner.requests(T0 + 2)
    assert peer == hi.key and hi.t.planner.window(lo.key, T0 + 2) == (
        at_ms / 1000,
        at_ms / 1000 + 10,
    )
    start = at_ms / 1000
    # inside the window both aim WireGuard at the other's mapping, and hear it
    assert lo.t.admitted(start)[hi.key] == [WAN[hi.name]]
    rx = 0
    verdict = None
    for i in range(5):
        wall = start + i
        for m, other in ((lo, hi), (hi, lo)):
            m.endpoint[other.name] = WAN[other.name]
            m.rx[other.name] = rx
            m.handshake[other.name] = wall
            out = m.round(wall)
            if m is lo:
                assert hi.key in out.triggers or lo.t.planner.established(hi.key)
        rx += 148
        if lo.t.planner.established(hi.key):
            verdict = i
            break
    assert verdict is not None and verdict <= 3
    assert lo.t.planner.established(hi.key) == WAN[hi.name]
    assert lo.t.explain(hi.key, start + 5)["punch"] == f"punched: direct to {WAN[hi.name]}"


def test_a_window_whose_endpoint_roams_away_fails_and_backs_off():
    ids, doc = clan()
    a, b, p = (Machine(n, ids, doc) for n in ("a", "b", "p"))
    for n in ("a", "b"):
        p.endpoint[n], p.handshake[n] = WAN[n], T0
    p.round(T0)
    deliver(p, [a, b], T0)
    a.round(T0), b.round(T0)
    deliver(a, [b], T0)
    deliver(b, [a], T0)
    lo, hi = (a, b) if a.key < b.key else (b, a)
    lo.round(T0 + 1)
    start = lo.t.planner.window(hi.key, T0 + 1)[0]
    relay = "192.0.2.10:40001"
    for i in range(12):
        wall = start + i
        # packets keep arriving, but through a relay: WireGuard roams there
        lo.endpoint[hi.name] = relay if i % 2 else WAN[hi.name]
        lo.rx[hi.name] = 100 * i
        lo.handshake[hi.name] = wall
        lo.round(wall)
    assert lo.t.planner.established(hi.key) is None
    assert lo.t.stats["punch_failed"] == 1
    assert "punch failed 1x" in lo.t.explain(hi.key, start + 12)["punch"]


def test_a_relay_tells_a_machine_its_nat_maps_per_destination():
    ids, doc = clan()
    a, b, p = (Machine(n, ids, doc) for n in ("a", "b", "p"))
    p.endpoint["b"], p.handshake["b"] = "198.51.100.2:51918", T0
    # b's packets to p's relay port come from another port of its router
    p.t.relay_sources = {b.key: "198.51.100.2:40777", a.key: WAN["a"]}
    p.endpoint["a"], p.handshake["a"] = WAN["a"], T0
    p.round(T0)
    deliver(p, [a, b], T0)
    assert b.t.book.mapping_varies(T0) and b.t.book.addresses(T0) == []
    # a's NAT keeps one mapping: the relay's view agrees with WireGuard's
    assert a.t.book.addresses(T0) == [WAN["a"]]
    # so b publishes no reflexive address, and nobody asks b to punch
    out = b.round(T0)
    if out.body is not None:  # b may ask for a relay; it names no address
        deliver(b, [a], T0)
    assert a.t.peer_reflexive.get(b.key, []) == []


def test_an_unchanged_body_is_refreshed_unpushed_and_an_empty_one_never_goes_out():
    """The nat record is soft (TTL 600 s): an unchanged body goes out again
    within its refresh (only to renew the TTL: not pushed), so a stable
    reflexive address never expires at the peers; a machine with nothing to
    say publishes nothing at all (a LAN-only clan pays nothing for NAT)."""
    from clanagent.mesh.nat import REFRESH, TTL

    ids, doc = clan()
    a, b, p = (Machine(n, ids, doc) for n in ("a", "b", "p"))
    lonely = Machine("a", ids, doc)  # nothing observed, nothing asked
    for t in (T0, T0 + REFRESH, T0 + 3 * REFRESH, T0 + TTL):
        assert lonely.round(t).body is None
    for n in ("a", "b"):
        p.endpoint[n], p.handshake[n] = WAN[n], T0
    first = p.round(T0)
    assert first.body is not None and not first.refresh_only
    sent = [T0]
    t = T0
    while t < T0 + 2 * TTL:
        t += 10.0
        for n in ("a", "b"):
            p.handshake[n] = t  # the sessions stay fresh: the body stays the same
        out = p.round(t)
        if out.body is not None:
            assert out.refresh_only and out.body == first.body
            sent.append(t)
    gaps = [y - x for x, y in zip(sent, sent[1:], strict=False)]
    assert gaps and all(0.9 * REFRESH - 10 <= g <= REFRESH + 10 for g in gaps), gaps
    assert max(gaps) < TTL / 2


ONION = "a" * 56 + ".onion:7946"


def test_when_the_relay_stops_the_path_falls_back_to_tor_or_to_none():
    """The relay member goes away (its own path fails, as the mesh service
    reports when WireGuard stops hearing it): the relay path is dropped and
    the selector falls back to Tor where the peer has an onion, else it
    reports no path.  (The namespace test covers the "no path" case with
    real agents; a private Tor network inside the namespaces would not fit
    its time budget.)"""
    ids, doc = clan()
    for with_tor in (True, False):
        a, b, p = (Machine(n, ids, doc) for n in ("a", "b", "p"))
        a.records = {p.key: {"lan": [], "public": ["192.0.2.10:7946"], "wg_port": 51820}}
        if with_tor:
            a.onions = {b.key: ONION}
        # p reached directly, alive in its WireGuard: a asks p for b
        a.endpoint["p"], a.handshake["p"] = "192.0.2.10:51820", T0
        a.round(T0)
        cand = next(c for c in a.sel._peers[p.key].paths.values()).candidate
        a.sel.report_success(p.key, cand, 0.01, T0)
        a.round(T0 + 1)
        asks = nat.parse_nat_body(a.t._published).relay_ask
        assert (b.key, p.key) in [(x.peer, x.via) for x in asks]
        # p grants the pair (its record names a's port)
        lo, hi = sorted((a.key, b.key))
        body = nat.nat_body(relays=[(lo, hi, 40001, 40002)])
        a.t.on_record(SignedRecord.create(ids["p"], "nat", "", next(_versions), body), T0 + 1)
        a.round(T0 + 2)
        a.round(T0 + 2)
        chosen = a.sel.current(b.key)
        assert chosen is not None and (chosen.kind, chosen.via) == ("relay", "p")
        # p stops: its path fails, the relay path goes, and with it the detour
        a.sel.report_failure(p.key, cand, T0 + 40)
        out = a.round(T0 + 41)
        assert out.relayed_changed and a.t.relayed == {}
        a.round(T0 + 42)
        chosen = a.sel.current(b.key)
        if with_tor:
            assert chosen is not None and chosen.kind == "tor", chosen
            shown = a.sel.explain(b.key, T0 + 42)
            assert [r["kind"] for r in shown["paths"] if r["chosen"]] == ["tor"], shown
        else:
            assert chosen is None
            assert a.sel.explain(b.key, T0 + 42)["chosen"] is None
