"""Cluster scenarios as plain functions: build, disturb, measure, return numbers.

Owns: the scripts of the standard gossip scenarios (a record spreads, a
crash is detected, loss causes no false deaths, a partition heals with
nothing lost, a restarted node rejoins above its old incarnation) and the
numbers each produces.  `test_scenarios.py` asserts on them; the benchmark
reuses them at larger N.

Must never: assert (callers decide what is good enough), or use the wall
clock for anything but reporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clanagent.gossip.config import GossipConfig
from tests.sim.cluster import Cluster, NodeFactory
from tests.sim.network import Latency

__all__ = [
    "ScenarioResult",
    "crash_is_detected",
    "no_false_deaths_under_loss",
    "partition_then_heal",
    "record_converges",
    "restart_rejoins",
]


@dataclass
class ScenarioResult:
    """What a scenario measured; `ok` says whether its end condition was reached."""

    name: str
    n: int
    ok: bool
    values: dict[str, Any] = field(default_factory=dict)
    real_s: float = 0.0

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def _cluster(n: int, seed: int, loss: float, factory: NodeFactory | None, **kw: Any) -> Cluster:
    return Cluster(
        n,
        kw.pop("config", None) or GossipConfig.lan(),
        seed=seed,
        latency=kw.pop("latency", None) or Latency.lan(),
        loss=loss,
        node_factory=factory,
        **kw,
    )


def _converge(c: Cluster, timeout: float = 60.0) -> float | None:
    """Seconds of virtual time until converged, None if it never was."""
    t0 = c.now
    return c.now - t0 if c.wait_converged(timeout, check_every=0.25) else None


def record_converges(
    n: int = 50,
    *,
    seed: int = 1,
    loss: float = 0.0,
    timeout: float = 30.0,
    factory: NodeFactory | None = None,
) -> ScenarioResult:
    """One node publishes a record; how long until 50 / 90 / 99 / 100 % of nodes hold it."""
    c = _cluster(n, seed, 0.0, factory)
    join_s = _converge(c)
    c.set_loss(loss)
    rec = c.publish(n // 3, "test", "greeting", {"text": "hello clan"})
    c.run_until_true(lambda: len(c.holders(rec)) == n, timeout=timeout, check_every=0.05)
    return ScenarioResult(
        "record_converges",
        n,
        ok=len(c.holders(rec)) == n,
        values={
            "join_s": join_s,
            "loss": loss,
            "holders": len(c.holders(rec)),
            "t50_s": c.time_to_fraction(rec, 0.5),
            "t90_s": c.time_to_fraction(rec, 0.9),
            "t99_s": c.time_to_fraction(rec, 0.99),
            "t100_s": c.time_to_fraction(rec, 1.0),
        },
        real_s=c.real_seconds(),
    )


def crash_is_detected(
    n: int = 50, *, seed: int = 2, factory: NodeFactory | None = None
) -> ScenarioResult:
    """A node stops without a word; how long until every other node marks it dead."""
    c = _cluster(n, seed, 0.0, factory)
    join_s = _converge(c)
    c.run_for(5.0)  # past the join burst: steady state
    victim = n - 1
    crashed_at = c.crash(victim)
    c.run_until_true(
        lambda: c.detection_time(victim, crashed_at) is not None, timeout=60.0, check_every=0.25
    )
    detect_s = c.detection_time(victim, crashed_at)
    first_suspect = c.log.first_times(c.node_id(victim), "suspect", since=crashed_at)
    return ScenarioResult(
        "crash_is_detected",
        n,
        ok=detect_s is not None,
        values={
            "join_s": join_s,
            "detect_s": detect_s,
            "first_suspect_s": min(first_suspect.values()) - crashed_at if first_suspect else None,
            "false_positives": len(c.false_positives()),
            "suspicion_timeout_s": c.config.suspicion_timeout(n),
        },
        real_s=c.real_seconds(),
    )


def no_false_deaths_under_loss(
    n: int = 50,
    *,
    loss: float = 0.10,
    duration: float = 60.0,
    seed: int = 3,
    factory: NodeFactory | None = None,
) -> ScenarioResult:
    """Every node stays up while `loss` of all datagrams vanish for `duration` s."""
    c = _cluster(n, seed, 0.0, factory)
    join_s = _converge(c)
    start = c.now
    c.set_loss(loss)
    c.run_for(duration)
    c.set_loss(0.0)
    fps = c.false_positives(since=start)
    # Suspicions still open when the loss stops must be refuted, not confirmed.
    reconverged_s = _converge(c, timeout=30.0)
    return ScenarioResult(
        "no_false_deaths_under_loss",
        n,
        ok=not fps,
        values={
            "join_s": join_s,
            "loss": loss,
            "false_positives": len(fps),
            "falsely_dead_nodes": len({fp[2] for fp in fps}),
            "suspicions": c.suspicions(since=start),
            "suspect_events": c.suspect_events(since=start),
            "reconverged_s": reconverged_s,
            "false_positives_after": len(c.false_positives(since=start)),
        },
        real_s=c.real_seconds(),
    )


def partition_then_heal(
    n: int = 50,
    *,
    split_s: float = 30.0,
    heal_timeout: float = 180.0,
    writes_per_side: int = 5,
    seed: int = 4,
    factory: NodeFactory | None = None,
) -> ScenarioResult:
    """Split 50/50 for `split_s`, write on both sides, heal: does everyone get everything?"""
    c = _cluster(n, seed, 0.0, factory)
    join_s = _converge(c)
    left = list(range(n // 2))
    right = list(range(n // 2, n))
    c.partition([left, right])
    split_start = c.now
    records = []
    for j in range(writes_per_side):
        records.append(c.publish(left[j % len(left)], "test", f"left-{j}", {"j": j}))
        records.append(c.publish(right[j % len(right)], "test", f"right-{j}", {"j": j}))
        c.run_for(0.5)
    left_recs = records[0::2]
    right_recs = records[1::2]

    def own_side_ok() -> bool:
        # Inside each side the records spread; across the cut none may.
        return all(c.holds(c.addrs[i], r) for i in left for r in left_recs) and all(
            c.holds(c.addrs[i], r) for i in right for r in right_recs
        )

    split_end = split_start + split_s
    c.run_until_true(own_side_ok, max(0.0, split_end - c.now), check_every=0.1)
    own_side_s = c.now - split_start if own_side_ok() else None
    c.run_until(split_end)
    leaked = sum(c.holds(c.addrs[i], r) for i in left for r in right_recs) + sum(
        c.holds(c.addrs[i], r) for i in right for r in left_recs
    )
    other_side_dead = c.node(0).member_state(c.node_id(n - 1))
    c.heal()
    healed_at = c.now
    got_all = c.run_until_true(lambda: c.all_hold(records), heal_timeout, check_every=0.5)
    records_s = c.now - healed_at if got_all else None
    members_ok = c.wait_converged(heal_timeout, check_every=0.5)
    return ScenarioResult(
        "partition_then_heal",
        n,
        ok=got_all and members_ok,
        values={
            "join_s": join_s,
            "own_side_ok": own_side_s is not None,
            "own_side_s": own_side_s,
            "leaked_across_cut": leaked,
            "view_of_other_side_during_split": other_side_dead,
            "records_after_heal_s": records_s,
            "members_after_heal_s": c.now - healed_at if members_ok else None,
            "missing": sum(not c.holds(a, r) for a in c.live() for r in records),
        },
        real_s=c.real_seconds(),
    )


def restart_rejoins(
    n: int = 50, *, seed: int = 5, factory: NodeFactory | None = None
) -> ScenarioResult:
    """Crash a node, let the clan declare it dead, restart it with the same identity."""
    c = _cluster(n, seed, 0.0, factory)
    join_s = _converge(c)
    victim = n // 2
    before = c.publish(0, "test", "before-crash", {"x": 1})
    c.run_for(5.0)
    old_incarnation = c.node(victim).incarnation
    crashed_at = c.crash(victim)
    declared = c.run_until_true(
        lambda: c.detection_time(victim, crashed_at) is not None, timeout=60.0, check_every=0.25
    )
    node = c.restart(victim)
    restarted_at = c.now
    vid = c.node_id(victim)

    def everyone_sees_it_alive() -> bool:
        for a in c.live():
            if a == c.addrs[victim]:
                continue
            if c.driver.nodes[a].member_state(vid) != "alive":
                return False
        return True

    rejoined = c.run_until_true(everyone_sees_it_alive, timeout=60.0, check_every=0.25)
    rejoin_s = c.now - restarted_at if rejoined else None
    converged = c.wait_converged(30.0)
    incs = {
        m["incarnation"]
        for a in c.live()
        if a != c.addrs[victim]
        for m in c.driver.nodes[a].members()
        if m["node_id"] == vid
    }
    return ScenarioResult(
        "restart_rejoins",
        n,
        ok=declared and rejoined and converged,
        values={
            "join_s": join_s,
            "declared_dead": declared,
            "old_incarnation": old_incarnation,
            "new_incarnation": node.incarnation,
            "incarnations_seen": sorted(incs),
            "rejoin_s": rejoin_s,
            "converged": converged,
            "has_old_record": c.holds(c.addrs[victim], before),
        },
        real_s=c.real_seconds(),
    )
