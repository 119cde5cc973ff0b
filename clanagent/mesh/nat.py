"""NAT traversal: reflexive endpoints observed by members, and hole punching.

Owns: the `nat` record (one per machine, soft) and the sans-IO decisions
behind it --

* *observing* (`observations`): a member with a live WireGuard session to a
  peer sees where the peer's packets come from (WireGuard's `endpoint`);
  when that is none of the addresses the peer advertises, it is the peer's
  NAT mapping, and the member reports it in its `nat` record, sealed to
  that peer alone (like STUN, but the reflector is a clan member and the
  answer is signed);
* *gathering* (`ReflexiveBook`): the observed machine collects what members
  report about it, drops what no observer confirmed within `REFLEXIVE_TTL`
  and publishes the rest, sealed to every member, as its `reflexive`
  addresses; when two observers see one host with different ports the NAT
  maps per destination (symmetric), punching cannot work and nothing is
  published;
* *punching* (`PunchPlanner`): two machines that both have reflexive
  addresses and no working direct path agree on a moment through gossip
  (the machine with the lower node key asks, in its `nat` record; the other
  joins when the request reaches it) and from then on, for `PUNCH_WINDOW`
  seconds, each one's WireGuard sends to the other's reflexive address, so
  both NATs open a mapping and the handshake gets through.  A punch that
  fails is retried with a doubling backoff; one that worked stays until the
  path fails.

Model, learned not copied: Tailscale's disco (CallMeMaybe relayed through
DERP makes both sides ping at once) and Nebula's lighthouse "punchy"
notifications.  Unlike those, the reflector and the rendezvous are any
member, and WireGuard itself is the probe: wireguard-go owns its socket, so
only WireGuard's own packets carry the NAT mapping that matters.

Must never: publish an address in the clear (observations are sealed to the
observed machine, reflexive addresses to the members), trust an observation
that does not open with our box key, schedule a punch far in the past or
future (a replayed or forged request), hold state for a peer without bound,
read a clock or do I/O (`now` is wall-clock seconds, since the two sides of
a punch share only that).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import nacl.exceptions
import nacl.public

from ..wire import Record, WireError, record_type

__all__ = [
    "NAT_KIND",
    "NatBody",
    "NatPunch",
    "NatRelayAsk",
    "NatRelayGrant",
    "NatSeen",
    "PunchConfig",
    "PunchPlanner",
    "ReflexiveBook",
    "effective_preference",
    "nat_body",
    "observations",
    "open_seen",
    "parse_nat_body",
    "seal_seen",
]

NAT_KIND = "nat"
NODE_KEY_LEN = 32
# Bounds of one record (each a list a peer controls).
MAX_SEEN = 256  # peers one machine reports on
MAX_PUNCH = 64  # punch requests in flight
MAX_ASKS = 64  # relays we ask for
MAX_GRANTS = 256  # pairs one relay serves
MAX_SEALED_ADDR = 160  # one sealed "host:port" (48 B of sealed box + the text)
MAX_REFLEXIVE = 8  # our own reflexive addresses
MAX_REFLEXIVE_SEALED = 1024 + 1000 * 148  # as limits.MAX_SEALED: sealed to every member
# WireGuard rekeys a live session every 2 minutes: an older handshake is no
# evidence that the peer is still behind that address.
HANDSHAKE_FRESH = 180.0
# An observation not confirmed (the observer's record refreshed) for this long
# is dropped: 2.5 of the record's refresh intervals.
REFLEXIVE_TTL = 300.0
REFRESH = 120.0  # the nat record's refresh (records.py)
TTL = 600.0  # the nat record's soft TTL (records.py)

PUBLIC_LIKE = ("public", "reflexive", "relay")


# ---------------------------------------------------------------- the record


@dataclass(frozen=True, slots=True)
class NatSeen(Record):
    """Where we see `node`'s WireGuard packets come from, sealed to `node`."""

    node: bytes
    addr: bytes

    def __post_init__(self) -> None:
        if len(self.node) != NODE_KEY_LEN:
            raise WireError("body.seen.node: expected a 32-byte node key")
        if not 0 < len(self.addr) <= MAX_SEALED_ADDR:
            raise WireError(f"body.seen.addr: expected 1..{MAX_SEALED_ADDR} sealed bytes")


@dataclass(frozen=True, slots=True)
class NatPunch(Record):
    """We ask `peer` to punch with us from `at` (wall clock, ms); `id` names the round."""

    peer: bytes
    at: int
    id: int

    def __post_init__(self) -> None:
        if len(self.peer) != NODE_KEY_LEN:
            raise WireError("body.punch.peer: expected a 32-byte node key")
        if not 0 <= self.at < 2**53 or not 0 <= self.id < 2**53:
            raise WireError("body.punch: at and id must be 0..2**53")


@dataclass(frozen=True, slots=True)
class NatRelayAsk(Record):
    """We want to reach `peer` through member `via`."""

    peer: bytes
    via: bytes

    def __post_init__(self) -> None:
        if len(self.peer) != NODE_KEY_LEN or len(self.via) != NODE_KEY_LEN:
            raise WireError("body.relay_ask: expected 32-byte node keys")
        if self.peer == self.via:
            raise WireError("body.relay_ask: a peer cannot relay to itself")


@dataclass(frozen=True, slots=True)
class NatRelayGrant(Record):
    """As a relay: `a` sends to our port `pa`, `b` to `pb`; we forward between them."""

    a: bytes
    b: bytes
    pa: int
    pb: int

    def __post_init__(self) -> None:
        if len(self.a) != NODE_KEY_LEN or len(self.b) != NODE_KEY_LEN:
            raise WireError("body.relays: expected 32-byte node keys")
        if not self.a < self.b:
            raise WireError("body.relays: a must sort before b")
        for p in (self.pa, self.pb):
            if not 0 < p < 65536:
                raise WireError("body.relays: ports must be 1..65535")
        if self.pa == self.pb:
            raise WireError("body.relays: one port per side")


@record_type
@dataclass(frozen=True, slots=True)
class NatBody(Record):
    """A machine's `nat` record (key ""): what it sees of others, its own
    reflexive addresses (sealed to the members), its punch requests, the
    relays it asks for and, as a relay, the pairs it serves."""

    KIND: ClassVar[str] = NAT_KIND
    seen: list[NatSeen]
    reflexive: bytes
    punch: list[NatPunch]
    relay_ask: list[NatRelayAsk]
    relays: list[NatRelayGrant]

    def __post_init__(self) -> None:
        for name, items, cap in (
            ("seen", self.seen, MAX_SEEN),
            ("punch", self.punch, MAX_PUNCH),
            ("relay_ask", self.relay_ask, MAX_ASKS),
            ("relays", self.relays, MAX_GRANTS),
        ):
            if len(items) > cap:
                raise WireError(f"body.{name}: more than {cap} entries")
        if len(self.reflexive) > MAX_REFLEXIVE_SEALED:
            raise WireError("body.reflexive: too large")
        for name, keys in (
            ("seen", [s.node for s in self.seen]),
            ("punch", [p.peer for p in self.punch]),
            ("relay_ask", [a.peer for a in self.relay_ask]),
            ("relays", [(g.a, g.b) for g in self.relays]),
        ):
            if len(set(keys)) != len(keys):
                raise WireError(f"body.{name}: duplicate entries")
        ports = [p for g in self.relays for p in (g.pa, g.pb)]
        if len(set(ports)) != len(ports):
            raise WireError("body.relays: a port serves one side of one pair")


def nat_body(
    *,
    seen: Iterable[tuple[bytes, bytes]] = (),
    reflexive: bytes = b"",
    punch: Iterable[tuple[bytes, int, int]] = (),
    relay_ask: Iterable[tuple[bytes, bytes]] = (),
    relays: Iterable[tuple[bytes, bytes, int, int]] = (),
) -> dict[str, Any]:
    """The wire body of our own `nat` record (sorted, so equal state is an equal body)."""
    return NatBody(
        seen=[NatSeen(n, a) for n, a in sorted(seen)],
        reflexive=reflexive,
        punch=[NatPunch(p, at, i) for p, at, i in sorted(punch)],
        relay_ask=[NatRelayAsk(p, v) for p, v in sorted(relay_ask)],
        relays=[NatRelayGrant(a, b, pa, pb) for a, b, pa, pb in sorted(relays)],
    ).to_wire()


def parse_nat_body(body: Any) -> NatBody:
    """A peer's `nat` body, checked; WireError when malformed."""
    return NatBody.from_wire(body, path="body")


def nat_semantics(origin: bytes, body: NatBody, members: frozenset[bytes] | None) -> str | None:
    """Why a `nat` body from `origin` is refused (None: fine).  `members`: the
    inventory's node keys, None before an inventory is known."""
    named: list[bytes] = [s.node for s in body.seen]
    named += [p.peer for p in body.punch]
    named += [k for a in body.relay_ask for k in (a.peer, a.via)]
    named += [k for g in body.relays for k in (g.a, g.b)]
    if origin in named:
        return "names its own machine as a peer"
    if members is not None and any(k not in members for k in named):
        return "names a machine that is not a member"
    return None


# ---------------------------------------------------------------- sealing one address


MAX_SEEN_ADDRS = 2  # one observer: its WireGuard's view, and its relay port's


def seal_seen(addrs: str | Iterable[str], box_key: bytes) -> bytes:
    """The addresses one observer sees a machine at (its WireGuard session's
    source, and, from a relay, the source of that machine's relayed packets),
    sealed to that machine's X25519 key (only it can read them)."""
    text = addrs if isinstance(addrs, str) else " ".join(addrs)
    return nacl.public.SealedBox(nacl.public.PublicKey(box_key)).encrypt(text.encode())


def open_seen(sealed: bytes, box_private: nacl.public.PrivateKey) -> list[str] | None:
    """The addresses in an observation sealed to us; None when it is not for
    us or is not one or two plausible `host:port`s."""
    try:
        text = nacl.public.SealedBox(box_private).decrypt(sealed).decode()
    except (nacl.exceptions.CryptoError, UnicodeDecodeError, ValueError):
        return None
    addrs = text.split(" ")
    if not 0 < len(addrs) <= MAX_SEEN_ADDRS or any(_hostport(a) is None for a in addrs):
        return None
    return addrs


def _hostport(addr: str) -> tuple[str, int] | None:
    """(ip, port) of "ip:port" / "[v6]:port", None when it is not one."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or len(addr) > 64:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    p = int(port)
    if not 0 < p < 65536 or ip.is_unspecified or ip.is_multicast:
        return None
    return str(ip), p


# ---------------------------------------------------------------- observing


def observations(
    peers: Iterable[tuple[bytes, str | None, float | None]],
    advertised: Mapping[bytes, Iterable[str]],
    wall: float,
) -> dict[bytes, str]:
    """What we report seeing: node key -> the endpoint WireGuard has for it.

    `peers`: (node key, WireGuard endpoint, last handshake in epoch s) of each
    peer; `advertised`: node key -> the WireGuard addresses ("host:port") we
    already know for it (its LAN and public addresses with its WireGuard
    port, and any relay address we send it through).  Only peers with a
    fresh handshake count, and only an endpoint that is none of those: that
    is the peer's NAT mapping (a LAN neighbour is seen at its own address).
    Loopback is never reported.  At most `MAX_SEEN`, lowest keys first.
    """
    out: dict[bytes, str] = {}
    for key, endpoint, handshake in sorted(peers, key=lambda p: p[0]):
        if endpoint is None or handshake is None or wall - handshake >= HANDSHAKE_FRESH:
            continue
        hp = _hostport(endpoint)
        if hp is None or ipaddress.ip_address(hp[0]).is_loopback:
            continue
        known = {_hostport(a) for a in advertised.get(key, ())}
        if hp in known:
            continue
        out[key] = endpoint
        if len(out) >= MAX_SEEN:
            break
    return out


# ---------------------------------------------------------------- gathering


class ReflexiveBook:
    """Our own reflexive addresses, from what observers report.

    Each observer's latest record replaces what it said before (an address
    it no longer reports is gone at once); an observer whose record was not
    refreshed for `ttl` seconds counts no more.
    """

    def __init__(self, ttl: float = REFLEXIVE_TTL, cap: int = 64) -> None:
        self.ttl = ttl
        self.cap = cap  # observers remembered (a bound on memory; the oldest goes)
        self._by_observer: dict[bytes, tuple[tuple[str, ...], float]] = {}

    def update(self, observer: bytes, addr: str | Iterable[str] | None, now: float) -> None:
        """`observer`'s record arrived: it sees us at `addr` (None: not at all).
        The first address is its WireGuard's view; a second one, from a relay,
        is where our packets to its relay port come from."""
        addrs = () if addr is None else ((addr,) if isinstance(addr, str) else tuple(addr))
        addrs = tuple(a for a in addrs[:MAX_SEEN_ADDRS] if _hostport(a) is not None)
        if not addrs:
            self._by_observer.pop(observer, None)
            return
        self._by_observer[observer] = (addrs, now)
        if len(self._by_observer) > self.cap:
            oldest = min(self._by_observer, key=lambda o: self._by_observer[o][1])
            del self._by_observer[oldest]

    def forget(self, observer: bytes) -> None:
        self._by_observer.pop(observer, None)

    def _live(self, now: float) -> dict[bytes, tuple[str, ...]]:
        return {o: a for o, (a, t) in self._by_observer.items() if now - t < self.ttl}

    def mapping_varies(self, now: float) -> bool:
        """Do observers see one host of ours behind different ports (a NAT that
        maps per destination, "symmetric")?  One relay seeing our WireGuard
        socket at two ports (its WireGuard's and its relay port's) is enough."""
        ports: dict[str, set[int]] = {}
        for addrs in self._live(now).values():
            for addr in addrs:
                hp = _hostport(addr)
                assert hp is not None
                ports.setdefault(hp[0], set()).add(hp[1])
        return any(len(p) > 1 for p in ports.values())

    def addresses(self, now: float) -> list[str]:
        """What to publish: the addresses observers' WireGuard sees us at (most
        observers first, then by address), none when the mapping varies."""
        if self.mapping_varies(now):
            return []
        count: dict[str, int] = {}
        for addrs in self._live(now).values():
            count[addrs[0]] = count.get(addrs[0], 0) + 1
        return sorted(count, key=lambda a: (-count[a], a))[:MAX_REFLEXIVE]

    def next_deadline(self) -> float | None:
        """When an observation expires next (None: none held)."""
        times = [t + self.ttl for _, t in self._by_observer.values()]
        return min(times) if times else None


# ---------------------------------------------------------------- preference


def effective_preference(preference: Iterable[str]) -> list[str]:
    """The inventory's preference with the NAT kinds in their place.

    A reflexive address is a direct path over the public internet: it comes
    right after "public" and only where "public" is allowed.  A relay path
    crosses the public internet twice and a third machine: below every
    direct kind and above Tor, again only where "public" is allowed (so a
    `no-public` machine, whose preference never has it, gets neither).
    """
    kinds = [k for k in preference if k not in ("reflexive", "relay")]
    if "public" not in kinds:
        return kinds
    out: list[str] = []
    for k in kinds:
        if k == "tor" and "relay" not in out:
            out.append("relay")
        out.append(k)
        if k == "public":
            out.append("reflexive")
    if "relay" not in out:
        out.append("relay")
    return out


# ---------------------------------------------------------------- punching


@dataclass(frozen=True)
class PunchConfig:
    """Timing of punch rounds (seconds of wall clock).

    `lead`: how far ahead the asker sets the start, enough for its record to
    reach the peer through gossip.  `window`: how long both sides aim
    WireGuard at each other's reflexive address; WireGuard retries a
    handshake every 5 s, so a 12 s window gives each side at least two
    tries while the other's mapping is open.  A failed round is retried
    after `backoff_base` doubling to `backoff_cap`.  A request is joined
    only when its start is within [now - window, now + max_ahead].
    """

    lead: float = 3.0
    window: float = 12.0
    backoff_base: float = 30.0
    backoff_cap: float = 900.0
    max_ahead: float = 60.0

    def __post_init__(self) -> None:
        if not (0 < self.lead <= self.max_ahead and self.window > 0):
            raise ValueError("need 0 < lead <= max_ahead and window > 0")
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise ValueError("need 0 < backoff_base <= backoff_cap")


@dataclass
class _Punch:
    start: float | None = None  # the current or next window
    id: int = 0
    asked: bool = False  # we asked (publish it while the window lasts)
    attempts: int = 0  # failed rounds in a row
    next_try: float = 0.0  # no new request of ours before
    established: str | None = None  # the reflexive address that worked
    joined: set[int] | None = None  # ids of the peer's requests we took part in


class PunchPlanner:
    """When to punch with whom; sans-IO, on the wall clock.

    Each round the shell calls `consider(peer, ...)` for every peer, passes
    the peer's punch requests addressed to us to `requested`, hands the
    selector only `admitted(peer, now)` of the peer's reflexive addresses,
    and reports each window's outcome with `succeeded` / `failed` (and a
    punched path that died later with `lost`).  `requests(now)` are ours to
    publish in the `nat` record.
    """

    def __init__(self, self_key: bytes, config: PunchConfig | None = None) -> None:
        self.self_key = self_key
        self.config = config if config is not None else PunchConfig()
        self._peers: dict[bytes, _Punch] = {}
        self._next_id = 1

    def _state(self, peer: bytes) -> _Punch:
        return self._peers.setdefault(peer, _Punch())

    def forget(self, peer: bytes) -> None:
        self._peers.pop(peer, None)

    def retain(self, peers: Iterable[bytes]) -> None:
        """Forget every peer not in `peers` (they left the clan)."""
        keep = set(peers)
        for k in [k for k in self._peers if k not in keep]:
            del self._peers[k]

    # ---- inputs -------------------------------------------------------

    def consider(
        self, peer: bytes, *, ours: bool, theirs: bool, direct_ok: bool, now: float
    ) -> None:
        """Ask for a punch when it is our turn to ask and one is worth trying.

        `ours` / `theirs`: we / the peer have reflexive addresses to punch
        with; `direct_ok`: a LAN or public path to the peer works now (no
        punch needed).  The machine with the lower node key asks; the other
        waits for its request (one request per pair, no crossing rounds).
        """
        st = self._state(peer)
        if direct_ok or st.established is not None or not (ours and theirs):
            return
        if not self.self_key < peer:
            return
        # st.start set: a window is pending, open, or over and not judged yet
        if st.start is not None or now < st.next_try:
            return
        st.start = now + self.config.lead
        st.id = self._next_id
        self._next_id += 1
        st.asked = True

    def requested(self, peer: bytes, at_ms: int, punch_id: int, now: float) -> bool:
        """`peer` asks us to punch from `at_ms`; True when we join (a new
        round whose start is neither stale nor too far ahead)."""
        cfg = self.config
        at = at_ms / 1000.0
        if not now - cfg.window <= at <= now + cfg.max_ahead:
            return False
        st = self._state(peer)
        if st.joined is None:
            st.joined = set()
        if punch_id in st.joined:
            return False
        if len(st.joined) > 32:  # bounded: old ids can only be stale by now
            st.joined.clear()
        st.joined.add(punch_id)
        st.start = at
        st.asked = False
        st.established = None
        return True

    def succeeded(self, peer: bytes, address: str, now: float) -> None:
        """WireGuard completed a handshake with `peer` at its reflexive `address`."""
        st = self._state(peer)
        st.established = address
        st.attempts = 0
        st.start = None
        st.asked = False

    def failed(self, peer: bytes, now: float) -> None:
        """A window ended without a handshake: back off before the next round."""
        st = self._state(peer)
        st.start = None
        st.asked = False
        st.established = None
        cfg = self.config
        delay = min(cfg.backoff_cap, cfg.backoff_base * 2.0 ** min(st.attempts, 30))
        st.attempts += 1
        st.next_try = now + delay

    def lost(self, peer: bytes, now: float) -> None:
        """A punched path stopped working: punch again soon (mappings change
        when a router reboots), but no sooner than the first backoff step."""
        st = self._state(peer)
        if st.established is None:
            return
        st.established = None
        st.next_try = now + self.config.backoff_base

    # ---- outputs ------------------------------------------------------

    def _window_pending(self, st: _Punch, now: float) -> bool:
        return st.start is not None and now < st.start + self.config.window

    def window(self, peer: bytes, now: float) -> tuple[float, float] | None:
        """The current or next window (start, end) with `peer`, if any."""
        st = self._peers.get(peer)
        if st is None or not self._window_pending(st, now):
            return None
        assert st.start is not None
        return st.start, st.start + self.config.window

    def ended(self, now: float) -> list[bytes]:
        """Peers whose window is over with no verdict yet: the shell judges them
        (`succeeded` or `failed`)."""
        out = []
        for peer, st in sorted(self._peers.items()):
            if st.start is not None and now >= st.start + self.config.window:
                out.append(peer)
        return out

    def established(self, peer: bytes) -> str | None:
        st = self._peers.get(peer)
        return None if st is None else st.established

    def admitted(self, peer: bytes, addresses: Iterable[str], now: float) -> list[str]:
        """Which of `peer`'s reflexive `addresses` the selector may use now:
        all of them while a window is open, the one that worked after a
        success, none otherwise (aimed at alone, WireGuard's packets only
        open our side and are dropped at theirs)."""
        st = self._peers.get(peer)
        addrs = list(addresses)
        if st is None:
            return []
        if st.established is not None:
            return [a for a in addrs if a == st.established]
        if st.start is not None and st.start <= now < st.start + self.config.window:
            return addrs
        return []

    def requests(self, now: float) -> list[tuple[bytes, int, int]]:
        """Our punch requests to publish: (peer, start in ms, id), while they last."""
        out = []
        for peer, st in sorted(self._peers.items()):
            if st.asked and self._window_pending(st, now):
                assert st.start is not None
                out.append((peer, int(st.start * 1000), st.id))
        return out[:MAX_PUNCH]

    def explain(self, peer: bytes, now: float) -> str:
        """One line for `clanctl path`: where punching stands with `peer`."""
        st = self._peers.get(peer)
        if st is None:
            return "no punch tried"
        if st.established is not None:
            return f"punched: direct to {st.established}"
        if self._window_pending(st, now):
            assert st.start is not None
            if now < st.start:
                return f"punch in {st.start - now:.1f} s"
            return f"punching ({st.start + self.config.window - now:.1f} s left)"
        if st.attempts:
            wait = max(0.0, st.next_try - now)
            return f"punch failed {st.attempts}x, next try in {wait:.0f} s"
        return "no punch tried" if st.next_try == 0.0 else "waiting to punch"

    def next_deadline(self) -> float | None:
        """When something may change: a window opens or closes, a retry is due."""
        times: list[float] = []
        for st in self._peers.values():
            if st.start is not None:
                times += [st.start, st.start + self.config.window]
            elif st.established is None and st.next_try > 0:
                times.append(st.next_try)
        return min(times) if times else None
