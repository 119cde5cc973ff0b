"""Relaying WireGuard through a clan member, when no direct path works.

Owns, all sans-IO:

* the relay policy (`RelayPolicy`): which machines may relay and for whom,
  read from the inventory's tags -- a machine tagged `relay` offers to relay
  (opt-in, as Nebula's `am_relay`), a machine tagged `no-relay` is never
  relayed for, and `no-public` is honoured (a relay path crosses the public
  internet, so neither end nor the relay may be `no-public`);
* the client's choice (`choose_relays`): the allowed relays we reach over a
  working direct path, fastest first, with the reason for every one left
  out;
* the relay's grants (`RelayGrants`): the pairs it serves, one UDP port per
  side, granted while at least one side asks and the relay sees both ends
  alive in its own WireGuard, bounded in number;
* the forwarding decision (`RelayPair`): a datagram on one side's port is
  forwarded to the other side's learnt address if it is shaped like a
  WireGuard message and within the rate limit.  A side's address is learnt
  from the first WireGuard-shaped datagram whose source host is one the
  relay's own (authenticated) WireGuard session sees that machine at, so a
  stranger who finds the port cannot take a side over;
* the relay-wide limit (`RelayLimiter`): one token bucket across all of a
  relay's pairs, so 64 pairs cannot take 64 times the per-pair rate.

The relay never decrypts anything: it moves WireGuard's own encrypted
packets between two sockets; the peers' tunnel is end to end.

Must never: forward to an address not learnt as above, forward a datagram
that is not WireGuard-shaped, exceed the rate limit, serve a pair the
policy forbids, read a clock or do I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "RELAY_TAG",
    "NO_RELAY_TAG",
    "RelayConfig",
    "RelayGrants",
    "RelayLimiter",
    "RelayOption",
    "RelayPair",
    "RelayPolicy",
    "choose_relays",
    "wireguard_shaped",
]

RELAY_TAG = "relay"
NO_RELAY_TAG = "no-relay"
NO_PUBLIC_TAG = "no-public"

# WireGuard message types and their sizes (the protocol's fixed framing):
# initiation 148, response 92, cookie reply 64, transport data >= 32 (16-byte
# header, 16-byte tag, the payload).  The payload is padded to a multiple of
# 16 only up to the interface's MTU: a full-MTU packet (1420 bytes inside,
# 1452 on the wire) is not a multiple of 16, so the size is not checked.
_WG_SIZES = {1: 148, 2: 92, 3: 64}


def wireguard_shaped(data: bytes) -> bool:
    """Is `data` framed like a WireGuard message (type, three zero bytes, size)?"""
    if len(data) < 32 or data[1:4] != b"\x00\x00\x00":
        return False
    kind = data[0]
    if kind in _WG_SIZES:
        return len(data) == _WG_SIZES[kind]
    return kind == 4 and len(data) <= 65535


# ---------------------------------------------------------------- policy


@dataclass(frozen=True)
class RelayPolicy:
    """Who may relay for whom, from the inventory document's machines."""

    relays: frozenset[str]  # machines that offer to relay
    refused: dict[str, str]  # machine -> why it is never relayed for

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> RelayPolicy:
        relays: set[str] = set()
        refused: dict[str, str] = {}
        for name, m in doc.get("machines", {}).items():
            tags = set(m.get("tags", ()))
            public = bool(m.get("public", NO_PUBLIC_TAG not in tags))
            if RELAY_TAG in tags and public:
                relays.add(name)
            if NO_RELAY_TAG in tags:
                refused[name] = f"{name} is tagged {NO_RELAY_TAG}"
            elif not public:
                refused[name] = f"{name} is no-public"
        return cls(frozenset(relays), refused)

    def why_not(self, relay: str, a: str, b: str) -> str | None:
        """Why `relay` may not carry traffic between `a` and `b` (None: it may)."""
        if relay in (a, b):
            return "an end of the path"
        if relay not in self.relays:
            return f"{relay} does not relay (no {RELAY_TAG!r} tag, or no-public)"
        for end in (a, b):
            if end in self.refused:
                return self.refused[end]
        return None


# ---------------------------------------------------------------- the client's choice


@dataclass(frozen=True)
class RelayOption:
    """One member considered as our relay to a peer."""

    relay: str
    usable: bool
    reason: str
    rtt: float | None = None


def choose_relays(
    policy: RelayPolicy,
    self_name: str,
    peer_name: str,
    reach: Mapping[str, tuple[str, float | None] | None],
) -> list[RelayOption]:
    """Every relay candidate for reaching `peer_name`, usable ones first
    (by RTT, unmeasured last, then name), each with its reason.

    `reach`: machine -> (kind, rtt) of our current path to it when that
    path works, None when it does not.  A relay must be reached over a
    direct path (lan or public): relaying through a relayed or Tor path
    would stack one detour on another (Nebula's rule: no relay to a relay).
    """
    out: list[RelayOption] = []
    for relay in sorted(policy.relays):
        why = policy.why_not(relay, self_name, peer_name)
        if why is not None:
            if relay not in (self_name, peer_name):
                out.append(RelayOption(relay, False, why))
            continue
        path = reach.get(relay)
        if path is None:
            out.append(RelayOption(relay, False, f"no working path to {relay}"))
            continue
        kind, rtt = path
        if kind not in ("lan", "public"):
            out.append(RelayOption(relay, False, f"{relay} is reached over {kind}, not directly"))
            continue
        rtt_text = "rtt not measured" if rtt is None else f"rtt {rtt * 1000:.1f} ms"
        out.append(RelayOption(relay, True, f"relay via {relay} ({kind}, {rtt_text})", rtt))

    def order(o: RelayOption) -> tuple[bool, float, str]:
        return (not o.usable, o.rtt if o.rtt is not None else float("inf"), o.relay)

    return sorted(out, key=order)


# ---------------------------------------------------------------- the relay's grants


@dataclass(frozen=True)
class RelayConfig:
    """Limits of one relay."""

    max_pairs: int = 64
    # A pair nobody asks for any more is kept this long (an ask lost in a
    # record update does not cut a live path).
    linger: float = 60.0
    # Forwarding limit per pair, both directions together: a token bucket.
    rate_bytes: float = 4 * 1024 * 1024  # bytes per second
    burst_bytes: float = 1024 * 1024
    rate_packets: float = 4000.0
    burst_packets: float = 1000.0
    # A learnt address not heard from for this long must be learnt again.
    address_idle: float = 180.0
    # Forwarding limit across all pairs together (the relay's own uplink is
    # shared by every pair it serves); bursts of a quarter second.
    total_rate_bytes: float = 16 * 1024 * 1024
    total_rate_packets: float = 16000.0

    @classmethod
    def scaled(cls, pair_mibps: float, total_mibps: float, total_pps: float) -> RelayConfig:
        """The per-pair limit at `pair_mibps` (packets and bursts in proportion
        to the defaults: 4 MiB/s, 4000 packets/s, bursts of 1 MiB and 1000),
        the relay-wide one at `total_mibps` and `total_pps`."""
        d = cls()
        f = pair_mibps * 1024 * 1024 / d.rate_bytes
        return cls(
            rate_bytes=d.rate_bytes * f,
            burst_bytes=d.burst_bytes * f,
            rate_packets=d.rate_packets * f,
            burst_packets=d.burst_packets * f,
            total_rate_bytes=total_mibps * 1024 * 1024,
            total_rate_packets=total_pps,
        )

    def __post_init__(self) -> None:
        if self.max_pairs < 1 or self.linger < 0 or self.address_idle <= 0:
            raise ValueError("need max_pairs >= 1, linger >= 0, address_idle > 0")
        rates = (self.rate_bytes, self.burst_bytes, self.rate_packets, self.burst_packets)
        if min(*rates, self.total_rate_bytes, self.total_rate_packets) <= 0:
            raise ValueError("rates and bursts must be > 0")


Pair = tuple[bytes, bytes]  # node keys, sorted


def pair_of(x: bytes, y: bytes) -> Pair:
    return (x, y) if x < y else (y, x)


@dataclass
class _Grant:
    last_asked: float


class RelayGrants:
    """The pairs this relay serves.

    `update(asks, alive, allowed, now)` with every member's current asks
    addressed to us returns (new pairs to open, pairs to close); the shell
    binds two UDP ports per new pair and publishes the grants.
    """

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.config = config if config is not None else RelayConfig()
        self._grants: dict[Pair, _Grant] = {}

    @property
    def pairs(self) -> list[Pair]:
        return sorted(self._grants)

    def update(
        self,
        asks: Iterable[tuple[bytes, bytes]],
        alive: Callable[[bytes], bool],
        allowed: Callable[[bytes, bytes], bool],
        now: float,
    ) -> tuple[list[Pair], list[Pair]]:
        """`asks`: (asker, peer) for every ask naming us as the relay;
        `alive(key)`: our WireGuard has a fresh handshake with that machine;
        `allowed(a, b)`: the policy lets us relay between them."""
        opened: list[Pair] = []
        evicted: list[Pair] = []
        asks = sorted(asks)
        asked = {pair_of(a, p) for a, p in asks if a != p}
        wanted: set[Pair] = set()
        for asker, peer in asks:
            if asker == peer:
                continue
            pair = pair_of(asker, peer)
            if pair in wanted or not allowed(*pair):
                continue
            wanted.add(pair)
            g = self._grants.get(pair)
            if g is not None:
                g.last_asked = now
                continue
            if not (alive(asker) and alive(peer)):
                continue
            if len(self._grants) >= self.config.max_pairs:
                # full: a pair nobody asks for any more (lingering) makes room,
                # the longest unasked first; pairs still asked for are kept
                idle = [p for p in self._grants if p not in asked]
                if not idle:
                    continue
                old = min(idle, key=lambda p: (self._grants[p].last_asked, p))
                del self._grants[old]
                evicted.append(old)
            self._grants[pair] = _Grant(now)
            opened.append(pair)
        closed = evicted + [
            p
            for p, g in sorted(self._grants.items())
            if (p not in wanted and now - g.last_asked > self.config.linger) or not allowed(*p)
        ]
        for p in closed:
            self._grants.pop(p, None)
        return opened, closed

    def next_deadline(self) -> float | None:
        times = [g.last_asked + self.config.linger for g in self._grants.values()]
        return min(times) if times else None


# ---------------------------------------------------------------- forwarding


Side = Literal["a", "b"]
Addr = tuple[str, int]


def _host(addr: str) -> str:
    host = addr.rpartition(":")[0] if ":" in addr else addr
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


@dataclass
class _Bucket:
    rate: float
    burst: float
    level: float = 0.0
    at: float = 0.0

    def take(self, amount: float, now: float) -> bool:
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if amount > self.level:
            return False
        self.level -= amount
        return True


class RelayLimiter:
    """The relay-wide token buckets every pair also draws from.

    A datagram is forwarded only when its pair's buckets and these all
    hold enough (the pair's are checked first, so a pair over its own
    limit takes nothing from the others' share)."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        cfg = config if config is not None else RelayConfig()
        self.config = cfg
        bb, bp = cfg.total_rate_bytes / 4, cfg.total_rate_packets / 4
        self._bytes = _Bucket(cfg.total_rate_bytes, bb, bb)
        self._packets = _Bucket(cfg.total_rate_packets, bp, bp)
        self._started = False
        self.refused = 0

    def take(self, size: int, now: float) -> bool:
        if not self._started:
            self._bytes.at = self._packets.at = now
            self._started = True
        if self._packets.take(1, now) and self._bytes.take(size, now):
            return True
        self.refused += 1
        return False


@dataclass
class RelayPair:
    """Forwarding state of one granted pair (side a = the lower node key)."""

    a: bytes
    b: bytes
    config: RelayConfig = field(default_factory=RelayConfig)
    learnt: dict[str, tuple[Addr, float]] = field(default_factory=dict)
    # Shared by every pair of one relay (None: only the per-pair limit).
    limiter: RelayLimiter | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "forwarded": 0,
            "bytes": 0,
            "not_wireguard": 0,
            "stranger": 0,
            "no_peer_yet": 0,
            "rate_limited": 0,
            "relay_limited": 0,
        }
    )

    def __post_init__(self) -> None:
        cfg = self.config
        self._bytes = _Bucket(cfg.rate_bytes, cfg.burst_bytes, cfg.burst_bytes)
        self._packets = _Bucket(cfg.rate_packets, cfg.burst_packets, cfg.burst_packets)
        self._started = False

    def datagram(
        self,
        side: Side,
        src: Addr,
        data: bytes,
        hosts_of: Callable[[bytes], Iterable[str]],
        now: float,
    ) -> Addr | None:
        """A datagram arrived on `side`'s port from `src`: where to send it
        (the other side's learnt address), or None to drop it.

        `hosts_of(node key)`: the hosts our own WireGuard session sees that
        machine at (its authenticated endpoint), the only sources a side is
        learnt from."""
        if not self._started:
            self._bytes.at = self._packets.at = now
            self._started = True
        if not wireguard_shaped(data):
            self.stats["not_wireguard"] += 1
            return None
        key = self.a if side == "a" else self.b
        known = self.learnt.get(side)
        if known is None or known[0] != src:
            allowed = {_host(h) for h in hosts_of(key)}
            if _host(src[0]) not in allowed:
                self.stats["stranger"] += 1
                return None
        self.learnt[side] = (src, now)
        other = self.learnt.get("b" if side == "a" else "a")
        if other is None or now - other[1] > self.config.address_idle:
            self.stats["no_peer_yet"] += 1
            return None
        if not (self._packets.take(1, now) and self._bytes.take(len(data), now)):
            self.stats["rate_limited"] += 1
            return None
        if self.limiter is not None and not self.limiter.take(len(data), now):
            self.stats["relay_limited"] += 1
            return None
        self.stats["forwarded"] += 1
        self.stats["bytes"] += len(data)
        return other[0]
