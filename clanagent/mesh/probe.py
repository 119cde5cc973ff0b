"""Path probes: is this path to that machine alive right now, and how fast?

Owns: the probe datagram (an authenticated ping/pong over UDP to a peer's
candidate address, outside the tunnel, so every path can be tested without
switching WireGuard to it) and a sans-IO tracker of outstanding probes that
turns replies and timeouts into path successes and failures.  Like
Tailscale's disco pings.  Must never: answer a probe that does not
authenticate (a spoofed pong could steer us onto a bad path), or hold
unbounded state for peers that never answer.

Datagram: MAGIC + sender node key (32) + nonce (24) + Box(sender box key ->
receiver box key) of pack([kind, probe id, sent at]).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import nacl.exceptions
import nacl.public

from ..wire import Limits, WireError, pack, unpack

__all__ = ["MAGIC", "PING", "PONG", "encode", "decode", "Probe", "ProbeTracker"]

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
) -> bytes:
    box = nacl.public.Box(my_box, nacl.public.PublicKey(peer_box))
    nonce = os.urandom(24)
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


@dataclass
class Probe:
    node_key: bytes
    address: str
    sent_at: float


class ProbeTracker:
    """Outstanding probes by id; replies and timeouts become verdicts."""

    def __init__(
        self, timeout: float = 2.0, max_outstanding: int = 4096, misses_to_fail: int = 3
    ) -> None:
        self.timeout = timeout
        self.max_outstanding = max_outstanding
        # The path in use fails after this many misses in a row (one lost
        # probe is not a dead path); an alternative fails on its first miss.
        self.misses_to_fail = misses_to_fail
        self._misses: dict[tuple[bytes, str], int] = {}
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self._out: dict[int, Probe] = {}

    def sent(self, node_key: bytes, address: str, now: float) -> int:
        if len(self._out) >= self.max_outstanding:
            oldest = min(self._out, key=lambda i: self._out[i].sent_at)
            del self._out[oldest]
        self._next_id = (self._next_id + 1) % (1 << 62)
        self._out[self._next_id] = Probe(node_key, address, now)
        return self._next_id

    def answered(self, probe_id: int, sender: bytes, now: float) -> tuple[Probe, float] | None:
        """The probe a pong answers and its RTT; None for unknown or forged ids."""
        probe = self._out.get(probe_id)
        if probe is None or probe.node_key != sender:
            return None
        del self._out[probe_id]
        self._misses.pop((probe.node_key, probe.address), None)
        return probe, max(0.0, now - probe.sent_at)

    def expired(self, now: float) -> list[Probe]:
        dead = [i for i, p in self._out.items() if now - p.sent_at > self.timeout]
        return [self._out.pop(i) for i in dead]

    def failures(self, now: float, is_current: Callable[[bytes, str], bool]) -> list[Probe]:
        """Expired probes that mean a failed path, by the miss rule above."""
        failed = []
        for p in self.expired(now):
            key = (p.node_key, p.address)
            misses = self._misses.get(key, 0) + 1
            if not is_current(p.node_key, p.address) or misses >= self.misses_to_fail:
                self._misses.pop(key, None)
                failed.append(p)
            else:
                self._misses[key] = misses
        return failed

    def __len__(self) -> int:
        return len(self._out)
