"""Path selection: which of a peer's addresses we use, and when we try again.

Owns: the `Candidate` type (one way to reach one peer machine, produced by
discovery), and `PathSelector`, a sans-IO state machine that keeps, per
peer, the candidates we may use, their measured round-trip time and failure
history, the current choice, and when a failed path may be tried again.
The shell feeds it candidates and probe results (with `now`) and asks it
what to use, what to probe and a path's RTT (the probes' timeout before
they measured one); it never sends a packet itself.

Model: Tailscale's magicsock (every candidate endpoint is probed; the best
one wins, a better one must beat the current by a margin before we switch,
and the better paths are re-probed periodically so we move back when they
recover) and memberlist's view of a failing member (back off, do not forget).

Policy, in the order it applies:
1. A path kind the inventory does not list for this peer is never used, and
   "public" is never used when either side forbids public networks; such
   candidates are kept out (and explained), never scored.
2. Ranking: the inventory's preference index of the kind, then the RTT
   (EWMA, unmeasured last), then the recent-failure score, then the address
   (so ties are broken the same way every time).
3. Each failure puts the path into exponential backoff with jitter
   (`PathConfig.backoff_base` doubling up to `backoff_cap`); it is not usable
   until `next_try_at`.  A success ends the backoff at once.  The exponent is
   the larger of the consecutive failures and the *recent* failures (a count
   that halves every `failure_half_life`), so a path that flaps
   (fail/recover/fail) backs off longer each time instead of thrashing.
4. The current choice is sticky: we leave a healthy current path only for a
   healthy path of a more preferred kind (always, as soon as it is healthy
   again) or of the same kind with an RTT `switch_rtt_gain` (30%) better.
   A path that failed and whose backoff expired is usable but not healthy:
   we re-probe it (`probes_due`) and move to it once a probe succeeds --
   unless there is nothing healthy, in which case it is the best we have.

Must never: choose, rank as usable or offer for probing a forbidden path
(rule 1), read a clock, do I/O, or raise on a stale report (a probe result
may arrive after the candidates changed; it is ignored).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

__all__ = [
    "PathKind",
    "PATH_KINDS",
    "Candidate",
    "PathError",
    "PathConfig",
    "RankedPath",
    "PathSelector",
]

# "reflexive": a peer's NAT mapping, seen by members and punched (mesh/nat.py);
# "relay": through a member that forwards WireGuard's packets (mesh/relay.py).
PathKind = Literal["lan", "public", "reflexive", "relay", "tor"]
PATH_KINDS: tuple[PathKind, ...] = get_args(PathKind)

NODE_KEY_LEN = 32
MAX_ADDRESS_LEN = 300
# Kinds that cross the public internet: forbidden where either side is no-public.
PUBLIC_KINDS = frozenset({"public", "reflexive", "relay"})


class PathError(ValueError):
    """We misused the path selector (bad candidate, unknown kind, bad RTT).

    Always local: candidates are built by our own discovery code, which has
    already checked what peers sent (see `candidates.parse_endpoints_body`).
    """


@dataclass(frozen=True)
class Candidate:
    """One way to reach one peer machine."""

    node_key: bytes  # the peer machine's Ed25519 node key (32)
    kind: PathKind
    address: str  # "host:port" ("[v6]:port"); for tor "xxxxx.onion:port"
    source: str  # "mdns", "inventory", "gossip", "config", "tor"
    port_wg: int | None = None  # the peer's WireGuard listen port when known (direct paths)
    via: str = ""  # for a relay path: the relaying machine's name

    def __post_init__(self) -> None:
        if not isinstance(self.node_key, bytes) or len(self.node_key) != NODE_KEY_LEN:
            raise PathError(f"candidate node key must be {NODE_KEY_LEN} bytes")
        if self.kind not in PATH_KINDS:
            raise PathError(f"unknown path kind {self.kind!r}")
        if not isinstance(self.address, str) or not 0 < len(self.address) <= MAX_ADDRESS_LEN:
            raise PathError("candidate address must be a non-empty string")
        if self.port_wg is not None and (
            type(self.port_wg) is not int or not 0 < self.port_wg < 65536
        ):
            raise PathError("candidate WireGuard port must be 1..65535")
        if (self.kind == "relay") != bool(self.via) or len(self.via) > 255:
            raise PathError("a relay candidate (and only one) names its relay")

    @property
    def path_id(self) -> tuple[str, str]:
        """What makes two candidates the same path, whichever source found them."""
        return (self.kind, self.address)


@dataclass(frozen=True)
class PathConfig:
    """Tunables of path selection; the defaults suit LAN and WAN alike."""

    backoff_base: float = 1.0  # first retry delay after a failure, seconds
    backoff_cap: float = 60.0  # longest retry delay, seconds
    # Each delay is shortened by up to this fraction at random, so that peers
    # that lost a path at the same moment do not all retry in lockstep.
    jitter: float = 0.2
    rtt_alpha: float = 0.3  # EWMA weight of a new RTT sample
    # A same-kind path must be this much faster than the current one before
    # we move (0.3: 30% lower RTT); small RTT noise never flips the choice.
    switch_rtt_gain: float = 0.3
    # Recent failures halve every this many seconds; they lengthen the backoff
    # of a path that keeps failing right after it recovers.
    failure_half_life: float = 300.0
    # An offered probe that got no report is offered again after this long.
    probe_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.backoff_base <= self.backoff_cap:
            raise PathError("need 0 < backoff_base <= backoff_cap")
        if not 0 <= self.jitter < 1:
            raise PathError("need 0 <= jitter < 1")
        if not 0 < self.rtt_alpha <= 1:
            raise PathError("need 0 < rtt_alpha <= 1")
        if not 0 <= self.switch_rtt_gain < 1:
            raise PathError("need 0 <= switch_rtt_gain < 1")
        if not self.failure_half_life > 0 or not self.probe_timeout > 0:
            raise PathError("failure_half_life and probe_timeout must be > 0")


@dataclass(frozen=True)
class RankedPath:
    """One candidate as `rank` sees it.

    `score` is the sort key (preference index, RTT in seconds or inf, recent
    failures): lower is better.  Excluded candidates (forbidden kind) come
    last with an infinite score, `usable` False and their reason.
    """

    candidate: Candidate
    score: tuple[float, float, float]
    reason: str
    usable: bool
    next_try_at: float | None
    excluded: bool = False


@dataclass
class _Path:
    """What we know about one allowed path (mutable, private)."""

    candidate: Candidate
    sources: list[str]
    rtt: float | None = None  # EWMA, seconds
    failures: int = 0  # consecutive, since the last success
    recent: float = 0.0  # decaying failure count, as of `recent_at`
    recent_at: float = 0.0
    next_try_at: float | None = None  # set while backing off after a failure
    probe_until: float | None = None  # offered as a probe; do not offer again before

    def recent_failures(self, now: float, half_life: float) -> float:
        if self.recent == 0.0:
            return 0.0
        # max(): a `now` older than the last update (clock mix-up) never grows it.
        value = self.recent * 0.5 ** (max(0.0, now - self.recent_at) / half_life)
        # Below 0.01 it is history: let RTT and address decide ties again.
        return value if value >= 0.01 else 0.0

    def usable(self, now: float) -> bool:
        return self.next_try_at is None or now >= self.next_try_at

    @property
    def healthy(self) -> bool:
        return self.failures == 0


@dataclass
class _Peer:
    preference: list[PathKind]
    paths: dict[tuple[str, str], _Path]
    excluded: list[tuple[Candidate, str]]
    peer_allows_public: bool
    current: tuple[str, str] | None = None
    index: dict[str, int] = field(default_factory=dict)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class PathSelector:
    """Per-peer path choice with preference, RTT, backoff and hysteresis.

    Sans-IO: every method takes `now` (seconds on any monotonic clock) and
    returns data; randomness (backoff jitter) comes from the `rng` given, so
    a seeded rng makes a run reproducible.
    """

    def __init__(
        self, self_allows_public: bool, rng: random.Random, config: PathConfig | None = None
    ) -> None:
        self.self_allows_public = self_allows_public
        self.config = config if config is not None else PathConfig()
        self._rng = rng
        self._peers: dict[bytes, _Peer] = {}
        # The latest `now` we were given: lets `next_deadline` (which takes no
        # `now`) tell a deadline still pending from one already acted on.
        self._now = -math.inf

    # ---- inputs -------------------------------------------------------

    def set_candidates(
        self,
        node_key: bytes,
        candidates: Iterable[Candidate],
        preference: Sequence[PathKind],
        peer_allows_public: bool,
        now: float,
    ) -> None:
        """Replace the peer's candidates (from every source) and policy.

        Candidates are deduplicated by (kind, address): the first one seen is
        kept, a WireGuard port learnt from a later source fills in a missing
        one, and every source is remembered for `explain`.  What we measured
        about a path that stays is kept; a path that disappears is forgotten.
        """
        self._tick(now)
        index: dict[str, int] = {}
        for kind in preference:
            if kind not in PATH_KINDS:
                raise PathError(f"unknown path kind {kind!r} in preference")
            index.setdefault(kind, len(index))
        old = self._peers.get(node_key)
        deduped: dict[tuple[str, str], tuple[Candidate, list[str]]] = {}
        for cand in candidates:
            if cand.node_key != node_key:
                raise PathError("candidate belongs to another machine")
            seen = deduped.get(cand.path_id)
            if seen is None:
                deduped[cand.path_id] = (cand, [cand.source])
                continue
            first, sources = seen
            if cand.source not in sources:
                sources.append(cand.source)
            if first.port_wg is None and cand.port_wg is not None:
                deduped[cand.path_id] = (replace(first, port_wg=cand.port_wg), sources)
        paths: dict[tuple[str, str], _Path] = {}
        excluded: list[tuple[Candidate, str]] = []
        for pid, (cand, sources) in deduped.items():
            why = self._forbidden(cand.kind, index, peer_allows_public)
            if why is not None:
                excluded.append((cand, why))
                continue
            prev = old.paths.get(pid) if old is not None else None
            if prev is not None:
                prev.candidate, prev.sources = cand, sources
                paths[pid] = prev
            else:
                paths[pid] = _Path(cand, sources, recent_at=now)
        peer = _Peer(
            preference=list(index),  # type: ignore[arg-type]
            paths=paths,
            excluded=excluded,
            peer_allows_public=peer_allows_public,
            current=old.current if old is not None else None,
            index=index,
        )
        self._peers[node_key] = peer
        peer.current = self._pick(peer, now)

    def forget(self, node_key: bytes) -> None:
        """Drop everything about a peer that left the clan."""
        self._peers.pop(node_key, None)

    def report_success(self, node_key: bytes, candidate: Candidate, rtt: float, now: float) -> None:
        """A probe or traffic over `candidate` got through in `rtt` seconds.

        Ends its backoff, feeds the RTT into its EWMA, and re-chooses (which
        moves back to a more preferred path that just recovered).
        """
        if not isinstance(rtt, int | float) or not math.isfinite(rtt) or rtt < 0:
            raise PathError("rtt must be a finite number of seconds >= 0")
        self._tick(now)
        peer, path = self._lookup(node_key, candidate)
        if peer is None or path is None:
            return  # stale: the path is gone or forbidden now
        a = self.config.rtt_alpha
        path.rtt = rtt if path.rtt is None else (1 - a) * path.rtt + a * rtt
        path.failures = 0
        path.next_try_at = None
        path.probe_until = None
        peer.current = self._pick(peer, now)

    def report_failure(self, node_key: bytes, candidate: Candidate, now: float) -> None:
        """`candidate` did not work (probe timed out, handshake failed).

        Starts or lengthens its backoff; if it was the current path, the next
        best usable one becomes current.
        """
        self._tick(now)
        peer, path = self._lookup(node_key, candidate)
        if peer is None or path is None:
            return
        cfg = self.config
        path.recent = path.recent_failures(now, cfg.failure_half_life) + 1.0
        path.recent_at = max(now, path.recent_at)
        path.failures += 1
        # round half up: a flap score of 2.9 after some decay still counts as 3.
        exponent = max(path.failures, math.floor(path.recent + 0.5)) - 1
        delay = (
            cfg.backoff_cap
            if exponent >= 64
            else min(cfg.backoff_cap, cfg.backoff_base * 2.0**exponent)
        )
        delay *= 1.0 - cfg.jitter * self._rng.random()
        path.next_try_at = now + delay
        path.probe_until = None
        peer.current = self._pick(peer, now)

    # ---- outputs ------------------------------------------------------

    def rank(self, node_key: bytes, now: float) -> list[RankedPath]:
        """The peer's candidates, best first; excluded ones last, with reasons."""
        self._tick(now)
        peer = self._peers.get(node_key)
        if peer is None:
            return []
        return [self._ranked(peer, p, now) for p in self._order(peer, now)] + [
            RankedPath(c, (math.inf, math.inf, math.inf), why, False, None, excluded=True)
            for c, why in peer.excluded
        ]

    def choose(self, node_key: bytes, now: float) -> Candidate | None:
        """The path to use now (None when nothing is usable); updates `current`."""
        self._tick(now)
        peer = self._peers.get(node_key)
        if peer is None:
            return None
        peer.current = self._pick(peer, now)
        return peer.paths[peer.current].candidate if peer.current is not None else None

    def current(self, node_key: bytes) -> Candidate | None:
        """The path chosen last (by `choose`, a report or `set_candidates`)."""
        peer = self._peers.get(node_key)
        if peer is None or peer.current is None:
            return None
        return peer.paths[peer.current].candidate

    def healthy(self, node_key: bytes, candidate: Candidate) -> bool:
        """Is `candidate` known and working (no failure since its last success)?"""
        _, path = self._lookup(node_key, candidate)
        return path is not None and path.healthy

    def rtt(self, node_key: bytes, candidate: Candidate) -> float | None:
        """The path's RTT estimate (EWMA, seconds); None when unmeasured or unknown."""
        _, path = self._lookup(node_key, candidate)
        return None if path is None else path.rtt

    def probes_due(self, now: float) -> list[tuple[bytes, Candidate]]:
        """Failed paths ranked above the current one whose backoff expired.

        The shell probes each and reports the result; so that it is not asked
        twice, a path offered here is not offered again for `probe_timeout`.
        With no current path, every failed path whose backoff expired is due.
        """
        self._tick(now)
        out: list[tuple[bytes, Candidate]] = []
        for node_key in sorted(self._peers):
            peer = self._peers[node_key]
            for path in self._above_current(peer, now):
                if path.healthy or not path.usable(now):
                    continue
                if path.probe_until is not None and now < path.probe_until:
                    continue
                path.probe_until = now + self.config.probe_timeout
                out.append((node_key, path.candidate))
        return out

    def next_deadline(self) -> float | None:
        """When `probes_due` (or `choose`) may next have something new, or None.

        A time in the past means "now": a probe is due and was not offered yet.
        """
        best: float | None = None
        for peer in self._peers.values():
            for path in self._above_current(peer, self._now):
                if path.healthy:
                    continue
                t = max(
                    path.next_try_at if path.next_try_at is not None else -math.inf,
                    path.probe_until if path.probe_until is not None else -math.inf,
                )
                if best is None or t < best:
                    best = t
        return best

    def explain(self, node_key: bytes, now: float) -> dict[str, Any]:
        """For `clanctl path MACHINE`: the chosen path and every alternative, with reasons.

        Read-only: it shows what `choose` would answer now without changing
        the current choice.  Plain types only (str, int, float, bool, None,
        lists, dicts), ready for the control socket.
        """
        peer = self._peers.get(node_key)
        out: dict[str, Any] = {
            "peer": node_key.hex(),
            "known": peer is not None,
            "self_allows_public": self.self_allows_public,
        }
        if peer is None:
            out.update(chosen=None, reason="no candidates known for this machine", paths=[])
            return out
        chosen_id = self._pick(peer, now)
        rows = []
        for rp in self.rank(node_key, now):
            cand = rp.candidate
            path = peer.paths.get(cand.path_id) if not rp.excluded else None
            rows.append(
                {
                    "kind": cand.kind,
                    "address": cand.address,
                    "via": cand.via or None,
                    "sources": list(path.sources) if path else [cand.source],
                    "port_wg": cand.port_wg,
                    "chosen": cand.path_id == chosen_id and not rp.excluded,
                    "usable": rp.usable,
                    "reason": rp.reason,
                    "rtt_ms": round(path.rtt * 1000, 3) if path and path.rtt is not None else None,
                    "failures": path.failures if path else 0,
                    "retry_in": (
                        round(max(0.0, path.next_try_at - now), 3)
                        if path and path.next_try_at is not None
                        else None
                    ),
                }
            )
        out.update(
            peer_allows_public=peer.peer_allows_public,
            preference=list(peer.preference),
            chosen=next(
                (
                    {"kind": r["kind"], "address": r["address"]}
                    | ({"via": r["via"]} if r["via"] else {})
                    for r in rows
                    if r["chosen"]
                ),
                None,
            ),
            reason=self._why_chosen(peer, chosen_id, now),
            paths=rows,
        )
        return out

    # ---- internals ----------------------------------------------------

    def _tick(self, now: float) -> None:
        if now > self._now:
            self._now = now

    def _forbidden(self, kind: str, index: dict[str, int], peer_allows_public: bool) -> str | None:
        if kind in PUBLIC_KINDS:
            if not self.self_allows_public and not peer_allows_public:
                return f"{kind} paths are forbidden for this machine and the peer (no-public)"
            if not self.self_allows_public:
                return f"{kind} paths are forbidden for this machine (no-public)"
            if not peer_allows_public:
                return f"{kind} paths are forbidden for the peer (no-public)"
        if kind not in index:
            return f"{kind} not in this peer's preference"
        return None

    def _lookup(self, node_key: bytes, candidate: Candidate) -> tuple[_Peer | None, _Path | None]:
        peer = self._peers.get(node_key)
        if peer is None or candidate.node_key != node_key:
            return peer, None
        return peer, peer.paths.get(candidate.path_id)

    def _score(self, peer: _Peer, path: _Path, now: float) -> tuple[float, float, float]:
        return (
            float(peer.index[path.candidate.kind]),
            path.rtt if path.rtt is not None else math.inf,
            path.recent_failures(now, self.config.failure_half_life),
        )

    def _order(self, peer: _Peer, now: float) -> list[_Path]:
        return sorted(
            peer.paths.values(), key=lambda p: (self._score(peer, p, now), p.candidate.address)
        )

    def _above_current(self, peer: _Peer, now: float) -> list[_Path]:
        order = self._order(peer, now)
        if peer.current is None:
            return order
        out = []
        for path in order:
            if path.candidate.path_id == peer.current:
                break
            out.append(path)
        return out

    def _pick(self, peer: _Peer, now: float) -> tuple[str, str] | None:
        """The hysteresis rule (module docstring, rule 4), as a pure function of state."""
        order = self._order(peer, now)
        cur = peer.paths.get(peer.current) if peer.current is not None else None
        if cur is not None and cur.healthy and cur.usable(now):
            for path in order:
                if path is cur:
                    return cur.candidate.path_id
                if not (path.healthy and path.usable(now)):
                    continue
                if peer.index[path.candidate.kind] < peer.index[cur.candidate.kind]:
                    return path.candidate.path_id
                gain = self.config.switch_rtt_gain
                if (
                    path.rtt is not None
                    and cur.rtt is not None
                    and path.rtt <= cur.rtt * (1 - gain)
                ):
                    return path.candidate.path_id
            return cur.candidate.path_id  # not reached: cur is in order
        healthy = [p for p in order if p.healthy and p.usable(now)]
        if healthy:
            return healthy[0].candidate.path_id
        if cur is not None and cur.usable(now):
            return cur.candidate.path_id  # failing paths only: do not churn between them
        retry = [p for p in order if p.usable(now)]
        return retry[0].candidate.path_id if retry else None

    def _ranked(self, peer: _Peer, path: _Path, now: float) -> RankedPath:
        score = self._score(peer, path, now)
        kind = path.candidate.kind
        if not path.usable(now):
            assert path.next_try_at is not None
            reason = (
                f"backing off after {_plural(path.failures, 'failure')}, "
                f"retry in {path.next_try_at - now:.1f} s"
            )
            return RankedPath(path.candidate, score, reason, False, path.next_try_at)
        if not path.healthy:
            reason = f"retry due after {_plural(path.failures, 'failure')}: probing before use"
        else:
            label = "preferred" if peer.index[kind] == 0 else "fallback"
            rtt = f"rtt {_ms(path.rtt)}" if path.rtt is not None else "rtt not measured yet"
            what = f"relay via {path.candidate.via}" if kind == "relay" else kind
            reason = f"{label}: {what}, {rtt}"
            recent = score[2]
            if recent >= 0.5:
                reason += f", {recent:.1f} recent failures"
        return RankedPath(path.candidate, score, reason, True, path.next_try_at)

    def _why_chosen(self, peer: _Peer, chosen: tuple[str, str] | None, now: float) -> str:
        if chosen is None:
            if not peer.paths:
                return "no allowed candidates" + (" (all excluded)" if peer.excluded else "")
            return "every path is backing off"
        path = peer.paths[chosen]
        best = self._order(peer, now)[0]
        if not path.healthy:
            return "no healthy path: retrying a failed one"
        if path is best:
            return "best ranked path"
        if peer.index[best.candidate.kind] < peer.index[path.candidate.kind]:
            return f"{best.candidate.kind} is preferred but not working now; using {path.candidate.kind}"
        gain = round(self.config.switch_rtt_gain * 100)
        return f"kept current path (a same-kind path must be {gain}% faster to switch)"
