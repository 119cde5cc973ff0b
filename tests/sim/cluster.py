"""N gossip nodes on one simulated network, with the helpers scenarios need.

Owns: building the nodes (addresses "n0".."n{N-1}", one identity each, an
in-memory store each, a per-node `random.Random` derived from the seed),
joining them through seed nodes, crash / restart / partition / loss
controls, and the measurements a scenario or the benchmark asks for
(convergence, who holds a record and since when, detection times, false
positives, bandwidth, real time, peak RSS).

Must never: look inside a node beyond its public API, or take a decision
from the wall clock; real time is only measured, never used.
"""

from __future__ import annotations

import hashlib
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import nacl.public
import nacl.signing

from clanagent.gossip.config import GossipConfig
from clanagent.identity import Identity, clamp_curve25519
from clanagent.store import Store
from tests.sim.driver import Driver
from tests.sim.network import Latency, Network

__all__ = ["Cluster", "NodeFactory", "default_node_factory", "peak_rss_mb", "seeded_identity"]

NodeFactory = Callable[..., Any]


def default_node_factory() -> NodeFactory:
    """The real `GossipNode` class (imported late: the harness runs without it)."""
    from clanagent.gossip.node import GossipNode

    return GossipNode


def seeded_identity(seed: int, i: int) -> Identity:
    """A node identity that is a function of (seed, i): node ids, and so every
    member-list order and random choice over them, repeat from run to run."""

    def key(label: str) -> bytes:
        return hashlib.blake2b(f"sim-{seed}-{i}-{label}".encode(), digest_size=32).digest()

    return Identity(
        signing_key=nacl.signing.SigningKey(key("sign")),
        box_key=nacl.public.PrivateKey(key("box")),
        wg_private=clamp_curve25519(key("wg")),
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class Cluster:
    """A simulated clan; see the module docstring.  Time is `cluster.now` (virtual s)."""

    def __init__(
        self,
        n: int,
        config: GossipConfig | None = None,
        *,
        seed: int = 0,
        latency: Latency | None = None,
        loss: float = 0.0,
        mtu: int | None = None,
        n_seeds: int = 1,
        join_spread: float = 0.0,
        clan: bytes = b"sim-clan",
        node_factory: NodeFactory | None = None,
        record_alive: bool = True,
        identities: Sequence[Identity] | None = None,
    ) -> None:
        """Build and join `n` nodes.

        Node 0 .. n_seeds-1 are the seeds; every other node joins through all
        of them at a time uniform in [0, join_spread) (0: all at once).  Call
        `wait_converged()` before measuring anything.
        """
        if n < 1:
            raise ValueError("n must be >= 1")
        self.config = config if config is not None else GossipConfig.lan()
        self.seed = seed
        self.clan = clan
        self.network = Network(seed=seed, latency=latency, loss=loss, mtu=mtu)
        self.driver = Driver(self.network, record_alive=record_alive)
        self.factory = node_factory if node_factory is not None else default_node_factory()
        self._rng = random.Random(f"cluster-{seed}")
        self.addrs = [f"n{i}" for i in range(n)]
        self.identities = (
            list(identities)
            if identities is not None
            else [seeded_identity(seed, i) for i in range(n)]
        )
        if len(self.identities) < n:
            raise ValueError("need one identity per node")
        self.stores: dict[str, Store] = {}
        self.seeds = self.addrs[: max(1, min(n_seeds, n))]
        self.restarts: dict[str, int] = {}
        # record_id -> virtual time it was published
        self.published_at: dict[bytes, float] = {}
        # record_id -> address of the node that published it
        self.published_by: dict[bytes, str] = {}
        self._wall_start = time.perf_counter()
        for i in range(n):
            self.driver.add_node(self._make_node(i))
        # Joins are driven as events at their own times: the seeds first.
        order = list(range(n))
        join_at = [0.0 if a in self.seeds else self._rng.random() * join_spread for a in self.addrs]
        order.sort(key=lambda i: join_at[i])
        for i in order:
            self.driver.run_until(join_at[i])
            self._join(i)

    # -- building -------------------------------------------------------------

    def _make_node(self, i: int) -> Any:
        addr = self.addrs[i]
        store = Store.open(None)
        self.stores[addr] = store
        gen = self.restarts.get(addr, 0)
        return self.factory(
            self.identities[i],
            self.config,
            addr=addr,
            clan=self.clan,
            store=store,
            rng=random.Random(f"{self.seed}-{addr}-{gen}"),
            now=self.driver.now,
            name=addr,
        )

    def _join(self, i: int) -> None:
        addr = self.addrs[i]
        seeds = [s for s in self.seeds if s != addr and self.driver.is_up(s)]
        self.driver.call(addr, lambda node: node.join(self.driver.now, seeds))

    # -- access -----------------------------------------------------------------

    @property
    def n(self) -> int:
        return len(self.addrs)

    @property
    def now(self) -> float:
        return self.driver.now

    @property
    def log(self) -> Any:
        return self.driver.log

    def node(self, i: int | str) -> Any:
        return self.driver.nodes[self._addr(i)]

    def node_id(self, i: int | str) -> str:
        return self.node(i).node_id

    def live(self) -> list[str]:
        """Addresses of the running nodes."""
        return self.driver.live_addrs()

    def _addr(self, i: int | str) -> str:
        return i if isinstance(i, str) else self.addrs[i]

    # -- time -------------------------------------------------------------------

    def run_for(self, dt: float) -> None:
        self.driver.run_for(dt)

    def run_until(self, t: float) -> None:
        self.driver.run_until(t)

    def run_until_true(
        self, pred: Callable[[], bool], timeout: float, check_every: float = 0.1
    ) -> bool:
        return self.driver.run_until_true(pred, timeout, check_every)

    # -- convergence --------------------------------------------------------------

    def converged(self) -> bool:
        """Every live node sees every live node (itself aside) alive."""
        live = self.live()
        ids = [self.driver.nodes[a].node_id for a in live]
        for a in live:
            state = self.driver.nodes[a].member_state
            me = self.driver.nodes[a].node_id
            for nid in ids:
                if nid != me and state(nid) != "alive":
                    return False
        return True

    def wait_converged(self, timeout: float = 60.0, check_every: float = 0.5) -> bool:
        return self.run_until_true(self.converged, timeout, check_every)

    # -- records ----------------------------------------------------------------

    def publish(self, i: int | str, kind: str, key: str, body: Any) -> Any:
        """Publish a record on node i now; returns the SignedRecord."""
        addr = self._addr(i)
        now = self.driver.now
        rec = self.driver.call(addr, lambda node: node.publish(now, kind, key, body))
        self.published_at[rec.record_id] = now
        self.published_by[rec.record_id] = addr
        return rec

    def holds(self, addr: str, record: Any) -> bool:
        held = self.stores[addr].get(record.origin, record.kind, record.key)
        return held is not None and held.version >= record.version

    def holders(self, record: Any) -> list[str]:
        """Live addresses whose store holds `record` (or a newer version of it)."""
        return [a for a in self.live() if self.holds(a, record)]

    def all_hold(self, records: Iterable[Any]) -> bool:
        records = list(records)
        return all(self.holds(a, r) for a in self.live() for r in records)

    def spread_times(self, record: Any) -> list[float]:
        """Sorted seconds from publication until each live node accepted `record`.

        A node counts only once the record arrived (its node reported it
        accepted); only the publisher, whose node may report nothing for its
        own record, counts from the publication itself."""
        t0 = self.published_at[record.record_id]
        seen = self.log.holders_at(record.record_id)
        publisher = self.published_by.get(record.record_id)
        times = []
        for a in self.live():
            t = seen.get(a)
            if t is None and a == publisher and self.holds(a, record):
                t = t0
            if t is not None:
                times.append(max(0.0, t - t0))
        times.sort()
        return times

    def time_to_fraction(self, record: Any, fraction: float) -> float | None:
        """Seconds until `fraction` of the live nodes held `record`, None if not yet."""
        times = self.spread_times(record)
        need = max(1, math.ceil(fraction * len(self.live()) - 1e-9))
        return times[need - 1] if len(times) >= need else None

    # -- faults -------------------------------------------------------------------

    def crash(self, i: int | str) -> float:
        """Stop node i now (no goodbye); returns the virtual time of the crash."""
        self.driver.crash(self._addr(i))
        return self.driver.now

    def restart(self, i: int | str) -> Any:
        """A new node with the same identity and a fresh in-memory store rejoins."""
        addr = self._addr(i)
        idx = self.addrs.index(addr)
        self.restarts[addr] = self.restarts.get(addr, 0) + 1
        node = self._make_node(idx)
        self.driver.add_node(node)
        self._join(idx)
        return node

    def leave(self, i: int | str) -> None:
        addr = self._addr(i)
        self.driver.call(addr, lambda node: node.leave(self.driver.now))

    def partition(self, groups: Iterable[Iterable[int | str]]) -> None:
        self.network.partition([[self._addr(i) for i in g] for g in groups])

    def heal(self) -> None:
        self.network.heal()

    def set_loss(self, p: float) -> None:
        self.network.set_loss(p)

    # -- measurements ---------------------------------------------------------------

    def detection_time(self, i: int | str, crashed_at: float, state: str = "dead") -> float | None:
        """Seconds from `crashed_at` until every live node reported node i in `state`."""
        nid = self.node_id(i)
        observers = [a for a in self.live() if a != self._addr(i)]
        t = self.log.all_marked_at(nid, state, observers, since=crashed_at)
        return None if t is None else t - crashed_at

    def false_positives(self, since: float = -math.inf) -> list[tuple[float, str, str]]:
        """(t, observer, subject) of "dead" verdicts on nodes that were running."""
        return [fp for fp in self.log.false_positives if fp[0] >= since]

    def suspicions(self, since: float = -math.inf) -> int:
        """Distinct suspicions (subject, incarnation) of nodes that never crashed.

        One suspicion is reported by every observer it reaches; this counts it once.
        """
        episodes = set()
        for nid, events in self.log.by_subject.items():
            if nid in self.driver.ever_crashed:
                continue
            episodes.update((nid, ev[3]) for ev in events if ev[2] == "suspect" and ev[0] >= since)
        return len(episodes)

    def suspect_events(self, since: float = -math.inf) -> int:
        """ "suspect" reports (one per observer) about nodes that never crashed."""
        count = 0
        for nid, events in self.log.by_subject.items():
            if nid in self.driver.ever_crashed:
                continue
            count += sum(1 for ev in events if ev[2] == "suspect" and ev[0] >= since)
        return count

    def traffic_snapshot(self) -> dict[str, int]:
        """addr -> bytes sent so far (as the network counted them)."""
        return {a: c.bytes_sent for a, c in self.network.counters.items()}

    def bandwidth(self, window: float) -> dict[str, float]:
        """Run `window` virtual seconds; bytes sent per live node per second over it."""
        before = self.traffic_snapshot()
        t0 = self.now
        self.run_for(window)
        dt = self.now - t0
        live = self.live()
        rates = sorted((self.network.counters[a].bytes_sent - before.get(a, 0)) / dt for a in live)
        return {
            "mean": sum(rates) / len(rates),
            "p50": rates[len(rates) // 2],
            "max": rates[-1],
        }

    def real_seconds(self) -> float:
        """Wall-clock seconds since this cluster was built."""
        return time.perf_counter() - self._wall_start

    @staticmethod
    def peak_rss_mb() -> float:
        return peak_rss_mb()
