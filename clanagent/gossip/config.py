"""Timing and fan-out settings of SWIM membership (named LAN / WAN / local configs).

Owns: the knobs of failure detection and dissemination, their validation,
and the two formulas that scale with cluster size (`retransmit_limit`,
`suspicion_timeout`), computed exactly as memberlist's `util.go` does so the
behaviour of a 1000-node clan matches what memberlist users expect.

Must never: read the clock, the environment or a file; a config is a value.
All durations are float seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

__all__ = ["GossipConfig", "RecordLimits", "push_pull_scale"]

_INT_FIELDS = (
    "indirect_checks",
    "retransmit_mult",
    "suspicion_mult",
    "suspicion_max_timeout_mult",
    "suspicion_quorum",
    "suspicion_witnesses",
    "awareness_max_multiplier",
    "gossip_nodes",
    "packet_size",
)

# Below this many members the push/pull interval is not stretched (memberlist
# `pushPullScaleThreshold`): full-state syncs are cheap in small clans.
_PUSH_PULL_SCALE_THRESHOLD = 32


@dataclass(frozen=True, slots=True)
class GossipConfig:
    """Membership settings; build one with `lan()`, `wan()` or `local()`.

    Field meanings follow memberlist's `Config` of the same names.
    """

    # Time between probes of one member each, and how long to wait for a
    # direct ack before asking `indirect_checks` peers to probe for us.  The
    # timeout should be about the 99th percentile RTT of the network.
    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    indirect_checks: int = 3
    # A gossiped update is sent retransmit_mult * ceil(log10(n + 1)) times.
    retransmit_mult: int = 4
    # Suspect for suspicion_mult * max(1, log10(n)) * probe_interval when
    # enough peers confirm; up to suspicion_max_timeout_mult times that when
    # nobody does (Lifeguard).
    suspicion_mult: int = 4
    suspicion_max_timeout_mult: int = 6
    # Ours, after Rapid's "alerts from several observers": once
    # `suspicion_quorum` members besides the first have confirmed a suspicion
    # (each failed to reach the member directly and through helpers), it ends
    # `suspicion_quorum_timeout` after it began, if that is sooner than the
    # Lifeguard timer (0 turns the rule off).  To gather those confirmations
    # fast, about `suspicion_witnesses` members that hear of a suspicion probe
    # the suspect themselves at once, and tell it, so a live one refutes.
    suspicion_quorum: int = 3
    suspicion_quorum_timeout: float = 2.0
    suspicion_witnesses: int = 8
    # Lifeguard: the probe interval stretches up to this factor while we
    # believe we are the slow one.
    awareness_max_multiplier: int = 8
    # Gossip of queued updates to `gossip_nodes` random members every
    # `gossip_interval` (0 disables); recently dead members keep getting it
    # for `gossip_to_the_dead_time` so they have a chance to refute.
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_the_dead_time: float = 30.0
    # Full state exchange with one random member (0 disables).
    push_pull_interval: float = 30.0
    # After this long dead, a member id may come back from another address
    # (0 means never: a different address is a conflict).
    dead_node_reclaim_time: float = 0.0
    # Timeout of one stream exchange (push/pull) for the shell around us.
    stream_timeout: float = 10.0
    # Bytes the composer may put in one datagram of piggybacked gossip.
    packet_size: int = 1400

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _INT_FIELDS:
                if not isinstance(value, int) or isinstance(value, bool):
                    raise TypeError(f"{f.name} must be an int, not {type(value).__name__}")
            else:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise TypeError(f"{f.name} must be a number, not {type(value).__name__}")
                if not math.isfinite(value):
                    raise ValueError(f"{f.name} must be finite")
                if value < 0:
                    raise ValueError(f"{f.name} must be >= 0")
        if self.probe_interval <= 0:
            raise ValueError("probe_interval must be > 0")
        # The indirect phase lives in the gap between the two; without a gap
        # every missed ack would go straight to suspicion.
        if not 0 < self.probe_timeout < self.probe_interval:
            raise ValueError("probe_timeout must be > 0 and < probe_interval")
        if self.stream_timeout <= 0:
            raise ValueError("stream_timeout must be > 0")
        if self.indirect_checks < 0:
            raise ValueError("indirect_checks must be >= 0")
        if self.gossip_nodes < 0:
            raise ValueError("gossip_nodes must be >= 0")
        for name in (
            "retransmit_mult",
            "suspicion_mult",
            "suspicion_max_timeout_mult",
            "awareness_max_multiplier",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("suspicion_quorum", "suspicion_witnesses"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.packet_size < 512:
            raise ValueError("packet_size must be >= 512")

    # -- named configs ---------------------------------------------------

    @classmethod
    def lan(cls) -> GossipConfig:
        """memberlist `DefaultLANConfig`: conservative, for one LAN."""
        return cls()

    @classmethod
    def wan(cls) -> GossipConfig:
        """memberlist `DefaultWANConfig`: slower probes, longer patience."""
        return replace(
            cls(),
            stream_timeout=30.0,
            suspicion_mult=6,
            suspicion_quorum_timeout=10.0,
            push_pull_interval=60.0,
            probe_timeout=3.0,
            probe_interval=5.0,
            gossip_nodes=4,
            gossip_interval=0.5,
            gossip_to_the_dead_time=60.0,
        )

    @classmethod
    def local(cls) -> GossipConfig:
        """memberlist `DefaultLocalConfig`: fast, for loopback tests."""
        return replace(
            cls(),
            stream_timeout=1.0,
            indirect_checks=1,
            retransmit_mult=2,
            suspicion_mult=3,
            push_pull_interval=15.0,
            probe_timeout=0.2,
            probe_interval=1.0,
            gossip_interval=0.1,
            gossip_to_the_dead_time=15.0,
        )

    # -- size-scaled values --------------------------------------------

    def retransmit_limit(self, n: int) -> int:
        """How many times to send one gossiped update in a clan of `n`."""
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def suspicion_timeout(self, n: int) -> float:
        """The nominal (minimum) suspicion timeout for a clan of `n`, seconds.

        memberlist does this in integer nanoseconds with the node scale
        truncated to thousandths; we do the same so values match it exactly.
        """
        node_scale = max(1.0, math.log10(max(1.0, float(n))))
        interval_ns = round(self.probe_interval * 1e9)
        timeout_ns = self.suspicion_mult * int(node_scale * 1000) * interval_ns // 1000
        return timeout_ns / 1e9

    def suspicion_max_timeout(self, n: int) -> float:
        """Upper bound on the suspicion timeout when nobody confirms."""
        return self.suspicion_max_timeout_mult * self.suspicion_timeout(n)


def push_pull_scale(interval: float, n: int) -> float:
    """Stretch the push/pull interval with log2 of the clan size above 32."""
    if n <= _PUSH_PULL_SCALE_THRESHOLD:
        return interval
    multiplier = math.ceil(math.log2(n) - math.log2(_PUSH_PULL_SCALE_THRESHOLD)) + 1.0
    return multiplier * interval


# Each push/pull deadline is the scaled interval times a factor drawn from
# 1 +- PUSH_PULL_JITTER: the mean (and so the bytes) stay those of the scaled
# interval, and members started at one instant drift out of step within a
# few intervals (memberlist staggers only the first one, so a clan started
# at once exchanges full state in one burst per interval for ever).
PUSH_PULL_JITTER = 0.25


def next_push_pull(interval: float, n: int, draw: float) -> float:
    """Seconds to the next push/pull of a clan of `n`; `draw` uniform in [0, 1)."""
    return push_pull_scale(interval, n) * (1.0 - PUSH_PULL_JITTER + 2 * PUSH_PULL_JITTER * draw)


@dataclass(frozen=True, slots=True)
class RecordLimits:
    """Quotas of the record store, per origin and in total.

    Sized from what one real machine publishes -- its node and endpoint
    records, one status and one log tail per VM, its service exports and
    secrets, an admin's inventory: tens to a few hundred records, most under
    1 KiB, a few up to the 1 MiB frame limit -- with more than 10x room:
    4096 records and 8 MiB per origin.  The totals hold a clan of ~50 such
    machines at their full per-origin quota (200,000 records, 256 MiB), far
    beyond what real clans reach, while bounding what a flood can cost.
    The store's own origin is checked against the per-origin limits only, so
    other origins filling the totals can never stop an agent publishing.
    """

    max_records_per_origin: int = 4096
    max_bytes_per_origin: int = 8 * 1024 * 1024
    max_records: int = 200_000
    max_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RecordLimits.{f.name} must be a positive int")
