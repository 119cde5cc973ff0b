"""NAT traversal for the mesh service: the cores of `nat.py` fed from records
and the WireGuard device, one reconcile round at a time.

Owns: what peers' `nat` records told us (our own reflexive addresses through
a `ReflexiveBook`, their reflexive addresses, punch requests addressed to
us), the `PunchPlanner`, the body of our own `nat` record (sealing cached, so
an unchanged state is an unchanged body and is not republished), and the
judging of punch windows from WireGuard's own counters: a window succeeded
when, at two samples in a row, WireGuard's endpoint for the peer is its
reflexive address and bytes from it keep arriving (a packet from anywhere
else would have moved the endpoint: WireGuard roams to the source of every
authenticated packet).

Must never: do I/O or read a clock (the service gives `now`, monotonic for
the path selector, and `wall`, epoch seconds, which two machines share for
a punch), trust an address a peer did not seal to us, or keep state for
machines that left the inventory.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nacl.public

from .._log import kv
from ..inventory.sealing import SealError, open_endpoints, recipients_of, seal_endpoints
from ..wire import SignedRecord, WireError
from . import nat
from .paths import Candidate, PathSelector
from .relay import Pair, RelayGrants, RelayPolicy, choose_relays
from .wireguard import Device, normalize_endpoint

EMPTY_BODY = nat.nat_body()  # nothing observed, asked or granted

__all__ = ["Traversal", "RoundResult"]

log = logging.getLogger("clanagent.mesh.nat")

# The RTT reported for a punched path before anything measured it (probes do
# not run over reflexive paths: wireguard-go owns that socket).
PUNCHED_RTT = 0.05


def _norm(addr: str | None) -> str | None:
    if addr is None:
        return None
    try:
        return normalize_endpoint(addr)
    except Exception:
        return None


@dataclass
class RoundResult:
    """What the shell must do after a round."""

    body: dict[str, Any] | None = None  # our nat record, when it changed or is due
    refresh_only: bool = False  # unchanged: only renews the TTL (anti-entropy carries it)
    triggers: list[bytes] = field(default_factory=list)  # peers to send tunnel traffic to
    open_pairs: list[Pair] = field(default_factory=list)  # as a relay: bind two ports each
    close_pairs: list[Pair] = field(default_factory=list)
    relayed_changed: bool = False  # relay paths changed: plan again


@dataclass
class _Watch:
    """A window being judged: the last sample of the peer's WireGuard counters."""

    rx: int
    endpoint: str | None
    good: int = 0  # samples in a row that looked punched


class Traversal:
    def __init__(
        self,
        self_key: bytes,
        box_private: nacl.public.PrivateKey,
        config: nat.PunchConfig | None = None,
    ) -> None:
        self.self_key = self_key
        self._box = box_private
        self.book = nat.ReflexiveBook()
        self.planner = nat.PunchPlanner(self_key, config)
        self.peer_reflexive: dict[bytes, list[str]] = {}
        self._watch: dict[bytes, _Watch] = {}
        self._seal_cache: dict[tuple[bytes, str], bytes] = {}
        self._refl_sealed: tuple[tuple[tuple[str, ...], frozenset], bytes] | None = None
        self._published: dict[str, Any] | None = None
        self._refresh_due = 0.0  # wall clock: when an unchanged body goes out again
        self._rng = random.Random()
        self.stats = {"punch_rounds": 0, "punched": 0, "punch_failed": 0, "observed": 0}
        # relaying: asks naming us as the relay (origin -> peers), grants naming
        # us (relay -> [(peer, our port)]), the pairs we serve and their ports
        self.asks_for_me: dict[bytes, list[bytes]] = {}
        # the relays each peer asks for to reach us (both ends must use one relay)
        self.peer_asks: dict[bytes, list[bytes]] = {}
        self.offers: dict[bytes, list[tuple[bytes, int]]] = {}
        self.grants = RelayGrants()
        self.bound: dict[Pair, tuple[int, int]] = {}
        self.relayed: dict[bytes, list[tuple[str, str]]] = {}
        self.relay_choice: dict[bytes, list[Any]] = {}  # peer -> RelayOptions (explain)
        self.wg_hosts: dict[bytes, str] = {}  # node key -> host our WireGuard sees it at
        # as a relay: node key -> "host:port" its relayed packets come from (the shell sets it)
        self.relay_sources: dict[bytes, str] = {}

    # ---- records ------------------------------------------------------------

    def on_record(self, rec: SignedRecord, wall: float) -> None:
        """A `nat` record of a peer arrived (our own ones are ignored)."""
        if rec.origin == self.self_key:
            return
        try:
            body = nat.parse_nat_body(rec.body)
        except WireError as exc:
            log.debug("bad nat record", extra=kv(reason=exc.reason))
            return
        mine = next((s for s in body.seen if s.node == self.self_key), None)
        addrs = None if mine is None else nat.open_seen(mine.addr, self._box)
        self.book.update(rec.origin, addrs, wall)
        refl: list[str] = []
        if body.reflexive:
            try:
                opened = open_endpoints(body.reflexive, self.self_key, self._box)
            except SealError:
                opened = None
            refl = [a for a in (opened or []) if nat._hostport(a) is not None]
        self.peer_reflexive[rec.origin] = refl[: nat.MAX_REFLEXIVE]
        self.asks_for_me[rec.origin] = [a.peer for a in body.relay_ask if a.via == self.self_key]
        self.peer_asks[rec.origin] = [a.via for a in body.relay_ask if a.peer == self.self_key]
        offers = []
        for g in body.relays:
            if g.a == self.self_key:
                offers.append((g.b, g.pa))
            elif g.b == self.self_key:
                offers.append((g.a, g.pb))
        self.offers[rec.origin] = offers
        for p in body.punch:
            if p.peer == self.self_key and self.planner.requested(rec.origin, p.at, p.id, wall):
                self.stats["punch_rounds"] += 1
                log.info("punch requested", extra=kv(peer=rec.origin.hex()[:12], at=p.at / 1000))

    def retain(self, keys: Iterable[bytes]) -> None:
        keep = set(keys)
        for d in (self.peer_reflexive, self._watch, self.asks_for_me, self.offers, self.peer_asks):
            for k in [k for k in d if k not in keep]:
                del d[k]
        for o in list(self.book._by_observer):
            if o not in keep:
                self.book.forget(o)
        self.planner.retain(keep)

    # ---- for the plan ---------------------------------------------------------

    def admitted(self, wall: float) -> dict[bytes, list[str]]:
        """Peers' reflexive addresses the selector may use now."""
        out = {}
        for key, addrs in self.peer_reflexive.items():
            ok = self.planner.admitted(key, addrs, wall)
            if ok:
                out[key] = ok
        return out

    def behind_nat(self, wall: float) -> bool:
        return bool(self.book._live(wall))

    # ---- the round --------------------------------------------------------------

    def round(
        self,
        device: Device,
        wg_to_node: Mapping[bytes, bytes],
        doc: Mapping[str, Any],
        selector: PathSelector,
        candidates: Mapping[bytes, list[Candidate]],
        now: float,
        wall: float,
    ) -> RoundResult:
        out = RoundResult()
        members = {m["node_key"]: m for m in doc["machines"].values()}
        self.retain(members)
        node_to_wg = {v: k for k, v in wg_to_node.items()}
        # 1. what we see of others
        peers, advertised = [], {}
        for wg_key, peer in device.peers.items():
            key = wg_to_node.get(wg_key)
            if key is None:
                continue
            st = device.status.get(wg_key)
            peers.append((key, _norm(peer.endpoint), None if st is None else st.last_handshake))
            adv = set()
            for c in candidates.get(key, []):
                if c.kind in ("lan", "public") and c.port_wg:
                    adv.add(f"{c.address.rpartition(':')[0]}:{c.port_wg}")
                elif c.kind == "relay":
                    adv.add(c.address)
            advertised[key] = adv
        seen = nat.observations(peers, advertised, wall)
        self.stats["observed"] = len(seen)
        sealed_seen = []
        used: set[tuple[bytes, str]] = set()
        for key, addr in seen.items():
            box = members[key].get("box_key")
            if box is None:
                continue
            # as a relay: the machine's relayed packets come from another port
            # of the same host -- its NAT maps per destination; tell it
            extra = self.relay_sources.get(key)
            same_host = extra is not None and extra.rpartition(":")[0] == addr.rpartition(":")[0]
            text = f"{addr} {extra}" if same_host and extra != addr else addr
            ck = (key, text)
            used.add(ck)
            if ck not in self._seal_cache:
                self._seal_cache[ck] = nat.seal_seen(text, box)
            sealed_seen.append((key, self._seal_cache[ck]))
        for ck in [ck for ck in self._seal_cache if ck not in used]:
            del self._seal_cache[ck]
        # 2. punching
        ours = self.book.addresses(wall)
        for key in members:
            if key == self.self_key:
                continue
            cur = selector.current(key)
            direct_ok = (
                cur is not None and cur.kind in ("lan", "public") and selector.healthy(key, cur)
            )
            self.planner.consider(
                key,
                ours=bool(ours),
                theirs=bool(self.peer_reflexive.get(key)),
                direct_ok=direct_ok,
                now=wall,
            )
            self._judge(key, device, node_to_wg.get(key), selector, candidates, now, wall, out)
        # 3. relaying
        asks = self._relay_round(device, wg_to_node, doc, selector, now, wall, out)
        # 4. our record
        body = nat.nat_body(
            seen=sealed_seen,
            reflexive=self._sealed_reflexive(ours, doc),
            punch=self.planner.requests(wall),
            relay_ask=asks,
            relays=[
                (a, b, *self.bound[(a, b)]) for a, b in self.grants.pairs if (a, b) in self.bound
            ],
        )
        if body != self._published and not (self._published is None and body == EMPTY_BODY):
            out.body = body  # changed (a machine with nothing to say says nothing)
        elif (
            self._published is not None
            and self._published != EMPTY_BODY
            and wall >= self._refresh_due
        ):
            # unchanged, but soft: renew it before its TTL runs out
            out.body, out.refresh_only = body, True
        return out

    def _relay_round(
        self,
        device: Device,
        wg_to_node: Mapping[bytes, bytes],
        doc: Mapping[str, Any],
        selector: PathSelector,
        now: float,
        wall: float,
        out: RoundResult,
    ) -> list[tuple[bytes, bytes]]:
        """Our relay asks, the relay paths we may use, and (as a relay) the pairs to serve."""
        names = {m["node_key"]: name for name, m in doc["machines"].items()}
        keys = {v: k for k, v in names.items()}
        me = names.get(self.self_key)
        policy = RelayPolicy.from_doc(doc)
        # where our WireGuard hears each machine (the relay's proof of a side)
        self.wg_hosts = {}
        alive: set[bytes] = set()
        for wg_key, peer in device.peers.items():
            key = wg_to_node.get(wg_key)
            st = device.status.get(wg_key)
            ep = _norm(peer.endpoint)
            if key is None or ep is None:
                continue
            self.wg_hosts[key] = ep.rpartition(":")[0].strip("[]")
            if (
                st is not None
                and st.last_handshake
                and wall - st.last_handshake < nat.HANDSHAKE_FRESH
            ):
                alive.add(key)
        # the paths we have to each machine that a relay must be reached over
        reach: dict[str, tuple[str, float | None] | None] = {}
        for key, name in names.items():
            cur = selector.current(key) if key != self.self_key else None
            ok = cur is not None and cur.kind in ("lan", "public") and selector.healthy(key, cur)
            reach[name] = (cur.kind, selector.rtt(key, cur)) if ok else None
        asks: list[tuple[bytes, bytes]] = []
        relayed: dict[bytes, list[tuple[str, str]]] = {}
        self.relay_choice = {}
        for key, name in names.items():
            if key == self.self_key or me is None:
                continue
            cur = selector.current(key)
            direct_ok = (
                cur is not None
                and cur.kind in ("lan", "public", "reflexive")
                and selector.healthy(key, cur)
            )
            # no path of ours, yet WireGuard has a live session at the address
            # the peer's packets come from (we are the public member a NATed
            # machine keeps its mapping open to): that path works, no relay
            doubtful = cur is None or (
                cur.kind in ("lan", "public")
                and not (selector.healthy(key, cur) and selector.rtt(key, cur) is not None)
            )
            learnt_ok = doubtful and key in alive
            opts = choose_relays(policy, me, name, reach)
            self.relay_choice[key] = opts
            usable = [o for o in opts if o.usable]
            if not usable:
                continue
            # Both ends must use one relay (each side's packets reach the other
            # only through the ports of the relay both send to): the lower node
            # key picks the fastest it reaches, the other follows when it
            # reaches that relay too.
            pick = usable[0]
            if key < self.self_key:
                theirs = {names.get(v) for v in self.peer_asks.get(key, [])}
                pick = next((o for o in usable if o.relay in theirs), pick)
            if not (direct_ok or learnt_ok):
                asks.append((key, keys[pick.relay]))
            # the relay path granted to us there, when we reach the relay directly now
            rkey = keys[pick.relay]
            rcur = selector.current(rkey)
            for peer, port in self.offers.get(rkey, []):
                if peer == key and rcur is not None:
                    host = rcur.address.rpartition(":")[0]
                    relayed.setdefault(key, []).append((f"{host}:{port}", pick.relay))
        if relayed != self.relayed:
            self.relayed = relayed
            out.relayed_changed = True
        # as a relay
        if me is not None and me in policy.relays:
            want = [(o, p) for o, peers in self.asks_for_me.items() for p in peers]

            def allowed(a: bytes, b: bytes) -> bool:
                return a in names and b in names and policy.why_not(me, names[a], names[b]) is None

            opened, closed = self.grants.update(want, alive.__contains__, allowed, wall)
        else:
            opened, closed = [], list(self.grants.pairs)
            self.grants = RelayGrants(self.grants.config)
        out.open_pairs, out.close_pairs = opened, closed
        for p in closed:
            self.bound.pop(p, None)
        return asks[: nat.MAX_ASKS]

    def bind(self, pair: Pair, pa: int, pb: int) -> None:
        """The shell bound the pair's two ports."""
        self.bound[pair] = (pa, pb)

    def published(self, body: dict[str, Any], wall: float) -> None:
        self._published = body
        self._refresh_due = wall + nat.REFRESH * (1 - 0.1 * self._rng.random())

    def _sealed_reflexive(self, addrs: list[str], doc: Mapping[str, Any]) -> bytes:
        if not addrs:
            return b""
        recipients = recipients_of(doc)
        ck = (tuple(addrs), frozenset(recipients.items()))
        if self._refl_sealed is None or self._refl_sealed[0] != ck:
            self._refl_sealed = (ck, seal_endpoints(addrs, recipients))
        return self._refl_sealed[1]

    def _judge(
        self,
        key: bytes,
        device: Device,
        wg_key: bytes | None,
        selector: PathSelector,
        candidates: Mapping[bytes, list[Candidate]],
        now: float,
        wall: float,
        out: RoundResult,
    ) -> None:
        planner = self.planner
        refl = {_norm(a) for a in self.peer_reflexive.get(key, [])}
        peer = device.peers.get(wg_key) if wg_key is not None else None
        st = device.status.get(wg_key) if wg_key is not None else None
        endpoint = _norm(peer.endpoint) if peer is not None else None
        rx = st.rx_bytes if st is not None else 0
        cands = {c.address: c for c in candidates.get(key, []) if c.kind == "reflexive"}
        established = planner.established(key)
        if established is not None:
            fresh = st is not None and st.last_handshake and wall - st.last_handshake < 180
            cand = cands.get(established)
            if not fresh or (cand is not None and not selector.healthy(key, cand)):
                log.info("punched path lost", extra=kv(peer=key.hex()[:12]))
                planner.lost(key, wall)
            return
        win = planner.window(key, wall)
        if win is not None and win[0] <= wall:
            out.triggers.append(key)
            w = self._watch.get(key)
            punched = endpoint in refl and w is not None and rx > w.rx and w.endpoint == endpoint
            if w is None:
                self._watch[key] = _Watch(rx, endpoint)
            else:
                w.good = w.good + 1 if punched else 0
                w.rx, w.endpoint = rx, endpoint
                if w.good >= 2 and endpoint is not None:
                    planner.succeeded(key, endpoint, wall)
                    del self._watch[key]
                    self.stats["punched"] += 1
                    log.info("punched", extra=kv(peer=key.hex()[:12], endpoint=endpoint))
                    cand = cands.get(endpoint)
                    if cand is not None:
                        selector.report_success(key, cand, PUNCHED_RTT, now)
            return
        if key in planner.ended(wall):
            self._watch.pop(key, None)
            planner.failed(key, wall)
            self.stats["punch_failed"] += 1
            log.info("punch failed", extra=kv(peer=key.hex()[:12]))
            for cand in cands.values():
                selector.report_failure(key, cand, now)

    def next_deadline(self, wall: float) -> float | None:
        """Seconds from `wall` until the next round is due for NAT reasons."""
        times = [t for t in (self.planner.next_deadline(), self.book.next_deadline()) if t]
        if any(self.planner.window(k, wall) for k in self.peer_reflexive):
            times.append(wall + 1.0)  # sample the counters every second in a window
        return None if not times else max(0.0, min(times) - wall)

    def explain(self, key: bytes, wall: float) -> dict[str, Any]:
        return {
            "punch": self.planner.explain(key, wall),
            "reflexive": list(self.peer_reflexive.get(key, [])),
            "relays": [
                {"relay": o.relay, "usable": o.usable, "reason": o.reason}
                for o in self.relay_choice.get(key, [])
            ],
        }

    def own(self, wall: float) -> dict[str, Any]:
        return {
            "relaying": len(self.bound),
            "reflexive": self.book.addresses(wall),
            "mapping_varies": self.book.mapping_varies(wall),
            **self.stats,
        }
