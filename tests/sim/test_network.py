"""Tests of the simulator itself: the network model, the driver and the cluster helpers.

The driver and cluster are exercised with the fake nodes of
`tests/sim/fakenode.py`, so a bug in the harness cannot hide behind (or be
blamed on) the real gossip node.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest

from tests.sim.cluster import Cluster
from tests.sim.driver import Driver, SimulationError
from tests.sim.fakenode import ChatterNode, FakeNode, SendTo
from tests.sim.network import Latency, Network


def _net(**kw) -> Network:
    net = Network(**kw)
    for a in ("a", "b", "c", "d"):
        net.register(a)
    return net


# -- network ----------------------------------------------------------------------


def test_fixed_latency_is_exact_and_counted() -> None:
    net = _net(latency=Latency.fixed(0.005))
    assert net.send(1.0, "a", "b", 100) == pytest.approx(1.005)
    assert net.accept("a", "b", 100)
    assert net.counters["a"].bytes_sent == 100
    assert net.counters["a"].msgs_sent == 1
    assert net.counters["b"].bytes_received == 100
    assert net.counters["b"].msgs_received == 1
    assert net.totals()["bytes_sent"] == 100


def test_latency_has_per_node_spread_and_jitter() -> None:
    lat = Latency(base=0.001, node_spread=0.004, jitter=0.001, sigma=0.5)
    net = _net(seed=3, latency=lat)
    ab = [net.send(0.0, "a", "b", 1) for _ in range(2000)]
    cd = [net.send(0.0, "c", "d", 1) for _ in range(2000)]
    for delays in (ab, cd):
        assert min(delays) >= lat.base
        assert statistics.pstdev(delays) > 0  # jitter
    # Fixed per-link parts differ between links; jitter alone cannot explain it.
    fixed_ab = lat.base + net._access["a"] + net._access["b"]
    fixed_cd = lat.base + net._access["c"] + net._access["d"]
    assert fixed_ab != fixed_cd
    med_ab = statistics.median(ab) - fixed_ab
    assert med_ab == pytest.approx(lat.jitter, rel=0.1)  # lognormal median


def test_latency_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        Latency(base=-1.0)
    with pytest.raises(ValueError):
        Latency(jitter=math.nan)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_loss_rate_is_roughly_as_set(p: float) -> None:
    net = _net(seed=7, loss=p)
    n = 20000
    lost = sum(net.send(0.0, "a", "b", 10) is None for _ in range(n))
    # 4 standard deviations of a binomial: fails only if the rate is wrong.
    tol = 4 * math.sqrt(p * (1 - p) / n) + 1e-9
    assert abs(lost / n - p) <= tol
    assert net.counters["a"].msgs_dropped == lost


def test_fragmented_datagrams_are_lost_more_often() -> None:
    net = _net(seed=2, loss=0.1, mtu=1000)
    n = 20000
    small = sum(net.send(0.0, "a", "b", 1000) is None for _ in range(n)) / n
    big = sum(net.send(0.0, "a", "b", 4500) is None for _ in range(n)) / n  # 5 fragments
    assert abs(small - 0.1) < 0.01
    assert abs(big - (1 - 0.9**5)) < 0.015
    with pytest.raises(ValueError):
        Network(mtu=0)


def test_link_loss_overrides_global_loss() -> None:
    net = _net(seed=1, loss=0.0)
    net.set_link_loss("a", "b", 1.0)
    assert all(net.send(0.0, "a", "b", 1) is None for _ in range(100))
    assert all(net.send(0.0, "b", "a", 1) is None for _ in range(100))
    assert all(net.send(0.0, "a", "c", 1) is not None for _ in range(100))
    net.set_link_loss("c", "d", 1.0, symmetric=False)
    assert net.send(0.0, "d", "c", 1) is not None
    net.clear_link_loss()
    assert net.send(0.0, "a", "b", 1) is not None
    with pytest.raises(ValueError):
        net.set_loss(1.5)


def test_same_seed_same_run() -> None:
    def run(seed: int) -> list[float | None]:
        net = _net(seed=seed, loss=0.3)
        return [net.send(float(i), "a", "c", 5) for i in range(200)]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_partition_drops_across_groups_and_in_flight() -> None:
    net = _net(latency=Latency.fixed(0.01))
    net.partition([["a", "b"], ["c"]])
    assert net.send(0.0, "a", "b", 1) is not None
    assert net.send(0.0, "a", "c", 1) is None
    assert net.send(0.0, "c", "a", 1) is None
    # "d" is in no group: cut off from everyone.
    assert net.send(0.0, "d", "a", 1) is None
    assert net.send(0.0, "a", "d", 1) is None
    net.heal()
    assert net.send(0.0, "a", "c", 1) is not None
    # Sent before the cut, arriving after it: lost.
    net.partition([["a"], ["c"]])
    assert not net.accept("a", "c", 1)
    net.heal()
    assert net.accept("a", "c", 1)
    with pytest.raises(ValueError):
        net.partition([["a"], ["a", "b"]])


def test_crash_drops_inbound_until_restart() -> None:
    net = _net()
    net.crash("b")
    assert not net.is_up("b")
    assert not net.accept("a", "b", 1)
    assert net.counters["b"].msgs_received == 0
    net.restart("b")
    assert net.accept("a", "b", 1)


def test_unknown_destination_is_dropped() -> None:
    net = _net()
    assert net.send(0.0, "a", "nowhere", 3) is None


# -- driver -------------------------------------------------------------------------


class _Recorder:
    """A node that logs its calls and follows a scripted deadline list."""

    def __init__(self, addr: str, deadlines: list[float], peer: str | None = None) -> None:
        self.addr = addr
        self.node_id = "id-" + addr
        self.deadlines = deadlines
        self.peer = peer
        self.ticks: list[float] = []
        self.got: list[tuple[float, str, bytes]] = []

    def next_deadline(self) -> float:
        return self.deadlines[0] if self.deadlines else math.inf

    def tick(self, now: float) -> list[SendTo]:
        self.ticks.append(now)
        while self.deadlines and self.deadlines[0] <= now:
            self.deadlines.pop(0)
        return [SendTo(None, self.peer, b"hi")] if self.peer else []

    def receive(self, now: float, from_addr: str, data: bytes) -> list[SendTo]:
        self.got.append((now, from_addr, data))
        return []


def test_driver_ticks_at_deadlines_and_delivers_with_latency() -> None:
    d = Driver(Network(latency=Latency.fixed(0.25)))
    a = _Recorder("a", [1.0, 2.0, 3.5], peer="b")
    b = _Recorder("b", [])
    d.add_node(a)
    d.add_node(b)
    d.run_until(10.0)
    assert a.ticks == [1.0, 2.0, 3.5]
    assert [(t, src) for t, src, _ in b.got] == [(1.25, "a"), (2.25, "a"), (3.75, "a")]
    assert d.now == 10.0
    assert d.stats == {
        "deliveries": 3,
        "ticks": 3,
        "sends": 3,
        "stuck_timers": 0,
        "past_deadlines": 0,
    }


def test_driver_skips_stale_deadlines() -> None:
    d = Driver(Network())
    a = _Recorder("a", [5.0])
    d.add_node(a)
    # The node's deadline moves later after a call: the old heap entry is stale.
    d.call("a", lambda node: (node.deadlines.__setitem__(0, 7.0), [])[1])
    d.run_until(6.0)
    assert a.ticks == []
    d.run_until(8.0)
    assert a.ticks == [7.0]


def test_driver_does_not_tick_or_deliver_to_crashed_node() -> None:
    d = Driver(Network(latency=Latency.fixed(0.1)))
    a = _Recorder("a", [1.0, 2.0], peer="b")
    b = _Recorder("b", [1.5, 2.5])
    d.add_node(a)
    d.add_node(b)
    d.crash("b")
    d.run_until(5.0)
    assert b.ticks == [] and b.got == []
    assert a.ticks == [1.0, 2.0]
    with pytest.raises(SimulationError):
        d.call("b", lambda node: [])


def test_driver_counts_a_node_that_never_advances() -> None:
    class Stuck(_Recorder):
        def next_deadline(self) -> float:
            return 1.0

    d = Driver(Network())
    d.add_node(Stuck("a", []))
    d.run_until(1.0 + 5e-6)
    assert d.stats["stuck_timers"] >= 1  # rescheduled, not an endless loop


def test_a_deadline_in_the_past_means_now_not_earlier() -> None:
    d = Driver(Network())
    a = _Recorder("a", [])
    d.add_node(a)
    d.run_until(5.0)
    # The node now asks for a tick at 2.0, which is already past.
    d.call("a", lambda node: (node.deadlines.append(2.0), [])[1])
    d.run_until(6.0)
    assert a.ticks == [5.0]
    assert d.stats["past_deadlines"] == 1


def test_run_until_true_stops_early_or_times_out() -> None:
    d = Driver(Network())
    d.add_node(_Recorder("a", [3.0]))
    node = d.nodes["a"]
    assert d.run_until_true(lambda: bool(node.ticks), timeout=10.0, check_every=0.5)
    assert d.now == pytest.approx(3.0)
    assert not d.run_until_true(lambda: False, timeout=2.0, check_every=0.5)
    assert d.now == pytest.approx(5.0)


def test_driver_rejects_unknown_actions() -> None:
    class Odd:
        pass

    d = Driver(Network())
    d.add_node(_Recorder("a", []))
    with pytest.raises(SimulationError):
        d.call("a", lambda node: [Odd()])


def test_driver_is_deterministic_for_a_seed() -> None:
    def run() -> list[int]:
        d = Driver(Network(seed=5, loss=0.2))
        nodes = [ChatterNode(f"n{i}", 20, random.Random(i)) for i in range(20)]
        for node in nodes:
            d.add_node(node)
        d.run_for(10.0)
        return [node.received for node in nodes]

    assert run() == run()


# -- cluster with the fake node ---------------------------------------------------------


def test_cluster_helpers_with_fake_node() -> None:
    c = Cluster(20, seed=1, node_factory=FakeNode)
    assert c.wait_converged(30.0)
    rec = c.publish(3, "test", "k", {"v": 1})
    assert c.run_until_true(lambda: len(c.holders(rec)) == 20, timeout=20.0)
    times = c.spread_times(rec)
    assert len(times) == 20 and times[0] == 0.0
    assert c.time_to_fraction(rec, 0.5) <= c.time_to_fraction(rec, 1.0)
    crashed_at = c.crash(7)
    assert "n7" not in c.live()
    assert c.run_until_true(lambda: c.detection_time(7, crashed_at) is not None, timeout=60.0)
    assert 0 < c.detection_time(7, crashed_at) < 60.0
    assert c.false_positives() == []  # no loss: the fake has no reason to kill anyone
    bw = c.bandwidth(5.0)
    assert 0 < bw["p50"] <= bw["max"]


def test_cluster_partition_blocks_records_with_fake_node() -> None:
    c = Cluster(10, seed=2, node_factory=FakeNode)
    assert c.wait_converged(30.0)
    c.partition([range(5), range(5, 10)])
    rec = c.publish(0, "test", "k", {"v": 1})
    c.run_for(5.0)
    assert set(c.holders(rec)) <= {f"n{i}" for i in range(5)}
    assert len(c.holders(rec)) == 5


def test_cluster_records_false_positive_of_a_live_node() -> None:
    c = Cluster(6, seed=3, node_factory=FakeNode)
    assert c.wait_converged(30.0)
    # Cut one live node off completely: the fake (no refutation across a cut)
    # declares it dead, and the harness must count that as a false positive.
    c.partition([["n0", "n1", "n2", "n3", "n4"], ["n5"]])
    c.run_for(30.0)
    subjects = {fp[2] for fp in c.false_positives()}
    assert c.node_id(5) in subjects


def _fingerprint(c: Cluster) -> list:
    return sorted(
        (nid, ev[0], ev[1], ev[2], ev[3]) for nid, evs in c.log.by_subject.items() for ev in evs
    )


def test_cluster_run_is_a_function_of_its_seed() -> None:
    def run(seed: int) -> tuple[list, dict]:
        c = Cluster(12, seed=seed, node_factory=FakeNode, loss=0.1)
        c.run_for(20.0)
        return _fingerprint(c), c.network.totals()

    assert run(4) == run(4)
    assert run(4) != run(5)


def test_seeded_identities_repeat_and_differ() -> None:
    from tests.sim.cluster import seeded_identity

    assert seeded_identity(1, 0).node_id == seeded_identity(1, 0).node_id
    assert len({seeded_identity(s, i).node_id for s in range(3) for i in range(3)}) == 9
