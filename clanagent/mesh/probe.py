"""Path probes: is this path to that machine alive right now, and how fast?

Owns: the probe datagram (an authenticated ping/pong over UDP to a peer's
candidate address, outside the tunnel, so every path can be tested without
switching WireGuard to it) and a sans-IO tracker of outstanding probes that
schedules the probes of the paths in use, turns replies and timeouts into
path verdicts (a first miss makes the path in use suspect and probed
faster, Lifeguard-style; enough misses in a row fail it) and weighs
WireGuard's own counters as evidence of life.  Like Tailscale's disco
pings.  Must never: answer a probe that does not authenticate (a spoofed
pong could steer us onto a bad path), hold unbounded state for peers that
never answer, read a clock or do I/O in the tracker.

Datagram: MAGIC + sender node key (32) + nonce (24) + Box(sender box key ->
receiver box key) of pack([kind, probe id, sent at]).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import nacl.exceptions
import nacl.public

from ..wire import Limits, WireError, pack, unpack

__all__ = [
    "MAGIC",
    "PING",
    "PONG",
    "encode",
    "decode",
    "Probe",
    "ProbeConfig",
    "ProbeTracker",
    "WgSample",
    "wg_says_alive",
]

MAGIC = b"clanprb1"
PING = 1
PONG = 2
_LIMITS = Limits(max_frame=256, max_depth=2, max_str=16, max_bin=64, max_array=4, max_map=1)
MAX_DATAGRAM = 512


def encode(
    kind: int,
    probe_id: int,
    sent_at: float,
    my_key: bytes,
    my_box: nacl.public.PrivateKey,
    peer_box: bytes,
    *,
    rng: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """One probe datagram; `rng` gives the 24-byte nonce (a seam for the
    test vectors, which need fixed bytes)."""
    box = nacl.public.Box(my_box, nacl.public.PublicKey(peer_box))
    nonce = rng(24)
    sealed = box.encrypt(pack([kind, probe_id, sent_at]), nonce).ciphertext
    return MAGIC + my_key + nonce + sealed


def decode(
    data: bytes, my_box: nacl.public.PrivateKey, box_key_of: dict[bytes, bytes]
) -> tuple[bytes, int, int, float]:
    """(sender node key, kind, probe id, sent at) or WireError."""
    if len(data) > MAX_DATAGRAM or len(data) < len(MAGIC) + 32 + 24 + 16:
        raise WireError("probe: bad size")
    if not data.startswith(MAGIC):
        raise WireError("probe: bad magic")
    off = len(MAGIC)
    sender = data[off : off + 32]
    nonce = data[off + 32 : off + 56]
    peer_box = box_key_of.get(sender)
    if peer_box is None:
        raise WireError("probe: sender is not a member")
    try:
        plain = nacl.public.Box(my_box, nacl.public.PublicKey(peer_box)).decrypt(
            data[off + 56 :], nonce
        )
    except (nacl.exceptions.CryptoError, ValueError):
        raise WireError("probe: does not authenticate") from None
    value = unpack(plain, _LIMITS)
    if (
        type(value) is not list
        or len(value) != 3
        or value[0] not in (PING, PONG)
        or type(value[1]) is not int
        or not isinstance(value[2], (int, float))
        or isinstance(value[2], bool)
    ):
        raise WireError("probe: malformed body")
    return sender, value[0], value[1], float(value[2])


@dataclass(frozen=True)
class ProbeConfig:
    """When the path in use is probed, and when it counts as dead.

    The path in use is probed every `interval` while it answers.  A probe
    that gets no pong within its timeout is a miss; after a first miss the
    path is *suspect* and probed every `suspect_interval` (memberlist's
    Lifeguard idea: look harder at what may be failing instead of waiting
    for the next round), without waiting for the previous probe to time out.
    It fails after `misses_to_fail` misses in a row, unless WireGuard itself
    saw the peer over that path since the suspicion began (see
    `wg_says_alive`).  Any answer, even a late one, ends the suspicion.

    A probe's timeout is `rtt_mult` times the path's smoothed RTT (or the
    shell's hint until the tracker measured one), kept between `timeout_min`
    and `timeout_max`; a path without any RTT yet gets `timeout_max`.  A
    slower path still works: its late pongs end each suspicion.  An alternative path
    (not in use) fails on its first miss: nothing depends on it.

    Dead path in use, cut at a random moment: failed after about
    U + 2 * timeout + (misses_to_fail - 2) * suspect_interval, U uniform in
    [0, interval): 1.1 + U s on a LAN with the defaults (1.6 s mean).
    False failure of a path that loses a fraction q of its probes (i.i.d.):
    about (60 / interval) * q ** misses_to_fail per minute, 6e-7 at q = 0.1
    and 1e-4 at q = 0.19 (10 % loss each way).
    """

    interval: float = 1.0
    suspect_interval: float = 0.1
    timeout_min: float = 0.25
    timeout_max: float = 1.0
    rtt_mult: float = 4.0
    misses_to_fail: int = 8
    # A pong this long after its probe was sent still counts as an answer.
    late_grace: float = 3.0

    def __post_init__(self) -> None:
        if not 0 < self.suspect_interval <= self.interval:
            raise ValueError("need 0 < suspect_interval <= interval")
        if not 0 < self.timeout_min <= self.timeout_max <= self.late_grace:
            raise ValueError("need 0 < timeout_min <= timeout_max <= late_grace")
        if not self.rtt_mult > 0 or self.misses_to_fail < 1:
            raise ValueError("need rtt_mult > 0 and misses_to_fail >= 1")

    def timeout(self, srtt: float | None) -> float:
        if srtt is None:
            return self.timeout_max
        return min(self.timeout_max, max(self.timeout_min, self.rtt_mult * srtt))


@dataclass
class Probe:
    node_key: bytes
    address: str
    sent_at: float
    deadline: float = float("inf")  # a miss when no pong by then
    missed: bool = False  # its verdict is out; kept only to take a late pong


@dataclass(frozen=True)
class WgSample:
    """What WireGuard reports for one peer: where it last heard from it (or
    where we told it to send), bytes received, last handshake (epoch s)."""

    endpoint: str | None
    rx_bytes: int
    last_handshake: float | None


def _host(address: str) -> str:
    host = address.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def wg_says_alive(baseline: WgSample, sample: WgSample, address: str) -> bool:
    """Did WireGuard hear from the peer over `address`'s host since `baseline`?

    Evidence of life for a path whose probes go unanswered: received bytes
    grew, or a newer handshake completed, while WireGuard's endpoint for the
    peer was that host both times (WireGuard moves the endpoint to wherever
    the peer's packets come from, so traffic over another path does not
    count).  Probes use the gossip port and WireGuard its own, so only hosts
    are compared.
    """
    host = _host(address)
    if baseline.endpoint is None or sample.endpoint is None:
        return False
    if _host(baseline.endpoint) != host or _host(sample.endpoint) != host:
        return False
    if sample.rx_bytes > baseline.rx_bytes:
        return True
    return (sample.last_handshake or 0.0) > (baseline.last_handshake or 0.0)


@dataclass
class _Watch:
    """A path in use, as the tracker sees it."""

    next_at: float = -math.inf  # the next probe is due then
    misses: int = 0
    baseline: WgSample | None = None  # WireGuard's view when the suspicion began


Verdict = Literal["suspect", "miss", "fail"]


class ProbeTracker:
    """Outstanding probes by id; replies and timeouts become verdicts.

    Sans-IO, driven by the shell: each round it asks `due(now, in_use)`
    which paths in use to probe, reports `sent`, feeds pongs to `answered`,
    collects `verdicts(now, is_current)` and sleeps until `next_deadline()`.
    """

    def __init__(self, config: ProbeConfig | None = None, max_outstanding: int = 4096) -> None:
        self.config = config if config is not None else ProbeConfig()
        self.max_outstanding = max_outstanding
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._out: dict[int, Probe] = {}
        self._watch: dict[tuple[bytes, str], _Watch] = {}
        self._srtt: dict[tuple[bytes, str], float] = {}

    # ---- the paths in use -----------------------------------------------

    def due(self, now: float, in_use: Iterable[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
        """The paths in use to probe now (each then not again before its next
        slot: `interval`, or `suspect_interval` while it is suspect); forgets
        the paths no longer in use."""
        keys = set(in_use)
        for key in [k for k in self._watch if k not in keys]:
            del self._watch[key]
        live = keys | {(p.node_key, p.address) for p in self._out.values()}
        for key in [k for k in self._srtt if k not in live]:
            del self._srtt[key]
        cfg = self.config
        out = []
        for key in sorted(keys):
            w = self._watch.setdefault(key, _Watch())
            if now >= w.next_at:
                # Offered once per slot, sent or not (an unsendable probe is no miss).
                w.next_at = now + (cfg.suspect_interval if w.misses else cfg.interval)
                out.append(key)
        return out

    def misses(self, node_key: bytes, address: str) -> int:
        w = self._watch.get((node_key, address))
        return 0 if w is None else w.misses

    def timeout(self, node_key: bytes, address: str) -> float:
        return self.config.timeout(self._srtt.get((node_key, address)))

    # ---- probes -----------------------------------------------------------

    def sent(self, node_key: bytes, address: str, now: float, rtt_hint: float | None = None) -> int:
        """A probe went out; `rtt_hint` (seconds, from elsewhere) sets its
        timeout while the tracker has measured no RTT of its own."""
        if len(self._out) >= self.max_outstanding:
            oldest = min(self._out, key=lambda i: self._out[i].sent_at)
            del self._out[oldest]
        self._next_id = (self._next_id + 1) % (1 << 62)
        key = (node_key, address)
        srtt = self._srtt.get(key, rtt_hint)
        self._out[self._next_id] = Probe(node_key, address, now, now + self.config.timeout(srtt))
        return self._next_id

    def answered(self, probe_id: int, sender: bytes, now: float) -> tuple[Probe, float] | None:
        """The probe a pong answers and its RTT; None for unknown or forged ids.

        A late pong (after its probe counted as a miss) still counts: the
        path works, and its suspicion ends."""
        probe = self._out.get(probe_id)
        if probe is None or probe.node_key != sender:
            return None
        del self._out[probe_id]
        rtt = max(0.0, now - probe.sent_at)
        key = (probe.node_key, probe.address)
        old = self._srtt.get(key)
        self._srtt[key] = rtt if old is None else 0.875 * old + 0.125 * rtt
        self._alive(key, now)
        return probe, rtt

    def _alive(self, key: tuple[bytes, str], now: float) -> None:
        w = self._watch.get(key)
        if w is not None and w.misses:
            w.misses = 0
            w.baseline = None
            w.next_at = min(w.next_at, now + self.config.interval)

    def verdicts(
        self, now: float, is_current: Callable[[bytes, str], bool]
    ) -> list[tuple[Probe, Verdict]]:
        """Probes that timed out by `now`, each with what it means.

        "fail": an alternative's first miss, or the last of `misses_to_fail`
        misses in a row of the path in use; "suspect": the first miss of the
        path in use (probe it faster now; take WireGuard's baseline);
        "miss": the misses in between.  A failed path's other outstanding
        probes give no further verdicts (a late pong still counts).
        """
        out: list[tuple[Probe, Verdict]] = []
        for pid in sorted(self._out, key=lambda i: self._out[i].deadline):
            p = self._out.get(pid)
            if p is None:
                continue
            if p.missed:
                if now - p.sent_at > self.config.late_grace:
                    del self._out[pid]
                continue
            if now < p.deadline:
                continue
            p.missed = True
            key = (p.node_key, p.address)
            w = self._watch.get(key)
            if w is None or not is_current(*key):
                out.append((p, "fail"))
                self._silence(key)
                continue
            w.misses += 1
            if w.misses >= self.config.misses_to_fail:
                out.append((p, "fail"))
                self._silence(key)
                continue
            if w.misses == 1:
                w.next_at = min(w.next_at, now)  # probe again at once
                out.append((p, "suspect"))
            else:
                out.append((p, "miss"))
        return out

    def _silence(self, key: tuple[bytes, str]) -> None:
        for p in self._out.values():
            if (p.node_key, p.address) == key:
                p.missed = True
        w = self._watch.get(key)
        if w is not None:
            w.misses = 0  # the baseline stays for `wg_vetoes`

    # ---- WireGuard's evidence ----------------------------------------------

    def wg_baseline(self, node_key: bytes, address: str, sample: WgSample | None) -> None:
        """WireGuard's view of the peer when the path became suspect."""
        w = self._watch.get((node_key, address))
        if w is not None:
            w.baseline = sample

    def wg_vetoes(self, node_key: bytes, address: str, sample: WgSample | None) -> bool:
        """Before a "fail" verdict of the path in use is acted on: does
        WireGuard say the path is alive after all (`wg_says_alive` against
        the baseline taken at "suspect")?  Then the failure is dropped and
        the path is watched as healthy again.  Without both samples the
        probes' verdict stands."""
        w = self._watch.get((node_key, address))
        if w is None:
            return False
        baseline, w.baseline = w.baseline, None
        if baseline is None or sample is None:
            return False
        return wg_says_alive(baseline, sample, address)

    # ---- scheduling -----------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When `due` or `verdicts` may next have something (None: nothing pending)."""
        times = [w.next_at for w in self._watch.values()]
        times += [p.deadline for p in self._out.values() if not p.missed]
        times += [p.sent_at + self.config.late_grace for p in self._out.values() if p.missed]
        return min(times) if times else None

    def __len__(self) -> int:
        return len(self._out)
