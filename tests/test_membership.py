"""SWIM membership core: config, message codecs, and small clusters driven by
an in-test discrete-event router (fixed latency, optional loss and blocked
paths) on a fake clock.  The router also plays the node composer's part of
disseminating queued broadcasts on gossip ticks."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import FrozenInstanceError, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.gossip.config import GossipConfig, next_push_pull, push_pull_scale
from clanagent.gossip.events import (
    MAX_INCARNATION,
    MESSAGE_CLASSES,
    Ack,
    Alive,
    Dead,
    IndirectPing,
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberState,
    MemberSuspect,
    Nack,
    NodeStateEntry,
    Ping,
    PushPull,
    Send,
    Suspect,
)
from clanagent.gossip.membership import MAX_WITNESS_PROBES, Membership
from clanagent.wire import WireError, pack, unpack

LATENCY = 0.005


def addr_of(node_id: str) -> str:
    return f"{node_id}.test:7946"


class SimNode:
    def __init__(self, cluster: Cluster, node_id: str, now: float, incarnation: int = 1):
        self.id = node_id
        self.addr = addr_of(node_id)
        self.queue: dict[str, list] = {}  # key -> [message, transmits left]
        self.events: list[tuple[float, object]] = []
        self.running = True
        self.cluster = cluster
        self.m = Membership(
            cluster.config,
            node_id,
            self.addr,
            random.Random(f"{cluster.seed}-{node_id}-{now}"),
            now,
            broadcast=self._broadcast,
            incarnation=incarnation,
        )

    def _broadcast(self, key: str, message: object) -> None:
        n = max(self.m.num_members() if hasattr(self, "m") else 1, 1)
        self.queue[key] = [message, self.cluster.config.retransmit_limit(n)]


class Cluster:
    """N memberships, a router heap and periodic gossip of queued broadcasts."""

    def __init__(self, n: int, config: GossipConfig | None = None, seed: int = 1, loss=0.0):
        self.config = config or GossipConfig.lan()
        self.seed = seed
        self.rng = random.Random(seed)
        self.loss = loss
        self.now = 0.0
        self.blocked: set[tuple[str, str]] = set()
        self.heap: list = []
        self.counter = itertools.count()
        self.sent: list[tuple[float, str, str, object]] = []
        self.nodes: dict[str, SimNode] = {}
        self.by_addr: dict[str, SimNode] = {}
        self.next_gossip = 0.0
        for i in range(n):
            self.add(f"n{i}")

    def add(self, node_id: str, incarnation: int = 1) -> SimNode:
        node = SimNode(self, node_id, self.now, incarnation)
        self.nodes[node_id] = node
        self.by_addr[node.addr] = node
        return node

    def block(self, a: str, b: str) -> None:
        self.blocked.add((addr_of(a), addr_of(b)))
        self.blocked.add((addr_of(b), addr_of(a)))

    def stop(self, node_id: str) -> None:
        self.nodes[node_id].running = False

    def route(self, src: SimNode, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.sent.append((self.now, src.id, action.addr, action.message))
                if (src.addr, action.addr) in self.blocked:
                    continue
                if self.loss and self.rng.random() < self.loss:
                    continue
                heapq.heappush(
                    self.heap,
                    (self.now + LATENCY, next(self.counter), action.addr, src.addr, action.message),
                )
            else:
                src.events.append((self.now, action))

    def join_all(self, seed_id: str = "n0") -> None:
        for node in self.nodes.values():
            if node.id != seed_id:
                self.route(node, node.m.join(self.now, [(None, addr_of(seed_id))]))

    def gossip(self) -> None:
        cfg = self.config
        for node in self.nodes.values():
            if not node.running or not node.queue:
                continue
            msgs = [entry[0] for entry in node.queue.values()]
            for key in list(node.queue):
                node.queue[key][1] -= 1
                if node.queue[key][1] <= 0:
                    del node.queue[key]
            for peer_id, peer_addr in node.m.random_members(cfg.gossip_nodes, alive_only=False):
                self.route(node, [Send(peer_id, peer_addr, msg) for msg in msgs])

    def run_until(self, t_end: float) -> None:
        for _ in range(5_000_000):
            candidates = [self.next_gossip]
            if self.heap:
                candidates.append(self.heap[0][0])
            for node in self.nodes.values():
                if node.running:
                    d = node.m.next_deadline()
                    if d is not None:
                        candidates.append(d)
            t = min(candidates)
            if t > t_end:
                self.now = t_end
                return
            self.now = max(self.now, t)
            while self.heap and self.heap[0][0] <= self.now:
                _, _, dest, src, msg = heapq.heappop(self.heap)
                node = self.by_addr.get(dest)
                if node is not None and node.running:
                    self.route(node, node.m.receive(self.now, src, msg))
            for node in list(self.nodes.values()):
                if node.running:
                    d = node.m.next_deadline()
                    if d is not None and d <= self.now:
                        self.route(node, node.m.tick(self.now))
            if self.next_gossip <= self.now:
                self.gossip()
                self.next_gossip = self.now + self.config.gossip_interval
        raise AssertionError("simulation did not advance")

    def views(self, subject: str, among=None):
        ids = among or [n for n, node in self.nodes.items() if node.running]
        return {i: self.nodes[i].m.member(subject) for i in ids}

    def first_event(self, node_id: str, cls, subject: str):
        for t, ev in self.nodes[node_id].events:
            if isinstance(ev, cls) and ev.node == subject:
                return t
        return None


def all_alive(cluster: Cluster) -> bool:
    running = [n for n in cluster.nodes.values() if n.running]
    return all(n.m.alive_count() == len(running) for n in running)


# -- config ---------------------------------------------------------------------


def test_lan_config_values():
    c = GossipConfig.lan()
    assert (c.probe_interval, c.probe_timeout, c.indirect_checks) == (1.0, 0.5, 3)
    assert (c.suspicion_mult, c.suspicion_max_timeout_mult, c.awareness_max_multiplier) == (4, 6, 8)
    assert (c.gossip_nodes, c.gossip_interval, c.retransmit_mult) == (3, 0.2, 4)
    assert (c.push_pull_interval, c.gossip_to_the_dead_time) == (30.0, 30.0)
    assert c.dead_node_reclaim_time == 0.0


def test_wan_config_values():
    c = GossipConfig.wan()
    assert (c.probe_interval, c.probe_timeout, c.suspicion_mult) == (5.0, 3.0, 6)
    assert (c.gossip_nodes, c.gossip_interval, c.push_pull_interval) == (4, 0.5, 60.0)
    assert c.gossip_to_the_dead_time == 60.0
    assert c.stream_timeout == 30.0
    assert c.indirect_checks == 3 and c.retransmit_mult == 4


def test_local_config_values():
    c = GossipConfig.local()
    assert (c.probe_interval, c.probe_timeout, c.indirect_checks) == (1.0, 0.2, 1)
    assert (c.retransmit_mult, c.suspicion_mult, c.gossip_interval) == (2, 3, 0.1)
    assert (c.push_pull_interval, c.gossip_to_the_dead_time, c.stream_timeout) == (15.0, 15.0, 1.0)


def test_config_is_frozen_and_validated():
    c = GossipConfig.lan()
    with pytest.raises(FrozenInstanceError):
        c.probe_interval = 2.0  # type: ignore[misc]
    for bad in [
        {"probe_interval": 0.0},
        {"probe_timeout": 1.0},  # not below the interval
        {"probe_timeout": -0.1},
        {"indirect_checks": -1},
        {"suspicion_mult": 0},
        {"awareness_max_multiplier": 0},
        {"gossip_interval": math.nan},
        {"push_pull_interval": math.inf},
        {"gossip_to_the_dead_time": -1.0},
    ]:
        with pytest.raises(ValueError):
            GossipConfig(**bad)
    with pytest.raises(TypeError):
        GossipConfig(indirect_checks=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        GossipConfig(gossip_nodes=True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "expected"), [(0, 0), (1, 4), (9, 4), (10, 8), (99, 8), (100, 12), (1000, 16)]
)
def test_retransmit_limit(n, expected):
    assert GossipConfig.lan().retransmit_limit(n) == expected


@pytest.mark.parametrize(
    ("mult", "n", "interval", "expected"),
    [
        (3, 0, 1.0, 3.0),
        (3, 1, 1.0, 3.0),
        (3, 10, 1.0, 3.0),
        (3, 100, 1.0, 6.0),
        (3, 1000, 1.0, 9.0),
        (4, 1000, 1.0, 12.0),
        # memberlist util_test.go: suspicionTimeout(3, n, 1s) / 3
        (3, 50, 1.0, 3 * 1.698),  # log10(50) = 1.69897 truncated to thousandths
        (3, 500, 1.0, 3 * 2.698),
        (4, 5, 0.5, 2.0),
    ],
)
def test_suspicion_timeout_like_memberlist(mult, n, interval, expected):
    c = GossipConfig(suspicion_mult=mult, probe_interval=interval, probe_timeout=interval / 2)
    assert c.suspicion_timeout(n) == pytest.approx(expected, abs=1e-9)
    assert c.suspicion_max_timeout(n) == pytest.approx(6 * expected, abs=1e-9)


def test_push_pull_scale():
    assert push_pull_scale(30.0, 32) == 30.0
    assert push_pull_scale(30.0, 33) == 60.0
    assert push_pull_scale(30.0, 64) == 60.0
    assert push_pull_scale(30.0, 65) == 90.0
    assert push_pull_scale(30.0, 1000) == 180.0


def test_next_push_pull_is_the_scaled_interval_within_a_quarter_and_keeps_its_mean():
    import random

    rng = random.Random(7)
    draws = [next_push_pull(30.0, 1000, rng.random()) for _ in range(4000)]
    assert 135.0 <= min(draws) < 140.0 and 220.0 < max(draws) <= 225.0
    assert sum(draws) / len(draws) == pytest.approx(180.0, rel=0.01)
    assert next_push_pull(30.0, 10, 0.0) == 22.5 and next_push_pull(30.0, 10, 0.5) == 30.0


# -- wire codecs ----------------------------------------------------------------

node_ids = st.text(min_size=1, max_size=40)
incs = st.integers(0, MAX_INCARNATION)
seqs = st.integers(0, 2**32 - 1)
metas = st.binary(max_size=512)

valid_messages = st.one_of(
    st.builds(Ping, seqs, node_ids, node_ids, st.none() | node_ids),
    st.builds(IndirectPing, seqs, node_ids, node_ids, node_ids, node_ids, st.booleans()),
    st.builds(Ack, seqs),
    st.builds(Nack, seqs),
    st.builds(Suspect, incs, node_ids, node_ids),
    st.builds(Alive, incs, node_ids, node_ids, metas),
    st.builds(Dead, incs, node_ids, node_ids),
    st.builds(
        PushPull,
        st.booleans(),
        st.lists(
            st.builds(
                NodeStateEntry, node_ids, node_ids, incs, st.sampled_from(MemberState), metas
            ),
            max_size=5,
        ).map(tuple),
    ),
)


@given(valid_messages)
def test_messages_round_trip_through_the_wire(msg):
    back = type(msg).from_wire(unpack(pack(msg.to_wire())))
    assert back == msg


wire_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**64), 2**65),
    st.floats(allow_nan=False),
    st.text(max_size=300),
    st.binary(max_size=600),
)
wire_values = st.recursive(
    wire_scalars,
    lambda inner: (
        st.lists(inner, max_size=7) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=400)
@given(st.sampled_from(MESSAGE_CLASSES), wire_values)
def test_from_wire_gives_message_or_wire_error(cls, value):
    try:
        msg = cls.from_wire(value)
    except WireError:
        return
    assert isinstance(msg, cls)
    assert cls.from_wire(msg.to_wire()) == msg


@settings(max_examples=400)
@given(valid_messages, st.integers(0, 5), wire_values)
def test_from_wire_rejects_single_field_corruptions(msg, index, junk):
    # near-valid input reaches the per-field checks that random values rarely do
    cls = type(msg)
    wire = msg.to_wire()
    wire[index % len(wire)] = junk
    try:
        out = cls.from_wire(wire)
    except WireError:
        return
    assert isinstance(out, cls)
    assert cls.from_wire(out.to_wire()) == out


@pytest.mark.parametrize(
    ("cls", "value"),
    [
        (Ping, [1, "a", "b"]),  # too short
        (Ping, [1, "a", "b", None, "extra"]),  # too long
        (Ping, {"seq": 1}),
        (Ping, [-1, "a", "b", None]),
        (Ping, [2**32, "a", "b", None]),
        (Ping, [True, "a", "b", None]),  # bool is not an int
        (Ping, [1, "", "b", None]),
        (Ping, [1, "a" * 257, "b", None]),
        (Ack, [1.0]),
        (Nack, ["1"]),
        (Alive, [1, "a", "h:1", "not bytes"]),
        (Alive, [1, "a", "h:1", b"x" * 513]),
        (Alive, [2**64, "a", "h:1", b""]),
        (Suspect, [1, "a", None]),
        (Dead, [1, 2, "b"]),
        (IndirectPing, [1, "t", "t:1", "r", "r:1", 1]),  # nack must be a bool
        (PushPull, [False, [["a", "h:1", 1, 4, b""]]]),  # no state 4
        (PushPull, [False, "states"]),
        (PushPull, [1, []]),
    ],
)
def test_from_wire_rejects_malformed(cls, value):
    with pytest.raises(WireError):
        cls.from_wire(value)


def test_events_are_frozen_and_validated_at_construction():
    ping = Ping(1, "a", "b")
    with pytest.raises(FrozenInstanceError):
        ping.seq = 2  # type: ignore[misc]
    with pytest.raises(ValueError):
        Alive(-1, "a", "h:1")
    with pytest.raises(ValueError):
        Suspect(1, "", "b")


# -- a single membership driven by hand ----------------------------------------


def lone(n_peers: int, config: GossipConfig | None = None, seed: int = 7) -> Membership:
    # push/pull off, so every deadline a test sees belongs to the probe cycle;
    # no witness probes (tests of those turn them on), so a Suspect received
    # starts nothing but the timer
    config = config or GossipConfig(push_pull_interval=0.0, suspicion_witnesses=0)
    m = Membership(config, "me", "me:1", random.Random(seed), now=0.0)
    for i in range(n_peers):
        m.receive(0.0, f"p{i}:1", Alive(1, f"p{i}", f"p{i}:1"))
    m.take_broadcasts()
    return m


def sends(actions, cls=None):
    return [
        a for a in actions if isinstance(a, Send) and (cls is None or isinstance(a.message, cls))
    ]


def run_to_probe(m: Membership, now: float) -> tuple[float, Send]:
    """Tick at successive deadlines until a Ping goes out."""
    for _ in range(100):
        now = m.next_deadline()
        pings = sends(m.tick(now), Ping)
        if pings:
            assert len(pings) == 1
            return now, pings[0]
    raise AssertionError("no probe")


def test_construction_announces_self_alive():
    m = Membership(GossipConfig.lan(), "me", "me:1", random.Random(1), now=0.0, meta=b"m")
    assert m.take_broadcasts() == [Alive(1, "me", "me:1", b"m")]
    assert m.alive_count() == 1 and m.num_members() == 1
    info = m.member("me")
    assert info.state is MemberState.ALIVE and info.incarnation == 1


def test_probe_order_visits_every_member_once_per_round():
    m = lone(10)
    now = 0.0
    rounds = []
    for _ in range(4):
        targets = []
        for _ in range(10):
            now, ping = run_to_probe(m, now)
            targets.append(ping.to)
            m.receive(now + 0.001, ping.addr, Ack(ping.message.seq))
        rounds.append(targets)
    for targets in rounds:
        assert sorted(targets) == sorted(f"p{i}" for i in range(10))
    # reshuffled at the end of each round: the four orders are not all equal
    assert len({tuple(r) for r in rounds}) > 1


def test_probe_interval_is_respected_and_rtt_recorded():
    m = lone(3)
    now, ping = run_to_probe(m, 0.0)
    m.receive(now + 0.002, ping.addr, Ack(ping.message.seq))
    assert m.member(ping.to).rtt == pytest.approx(0.002)
    assert m.next_deadline() == pytest.approx(now + 1.0)


def test_ping_for_someone_else_is_not_answered():
    m = lone(1)
    assert m.receive(0.1, "x:1", Ping(5, "not-me", "x")) == []
    assert m.stats["misdirected_ping"] == 1
    out = m.receive(0.1, "x:1", Ping(6, "me", "x"))
    assert out == [Send("x", "x:1", Ack(6))]
    out = m.receive(0.1, "nat:9", Ping(7, "me", "x", "x:1"))
    assert out == [Send("x", "x:1", Ack(7))]


def test_missing_nacks_raise_awareness_and_scale_the_probe():
    m = lone(3)
    now, ping = run_to_probe(m, 0.0)
    target = ping.to
    # the direct phase ends after probe_timeout, not the scaled interval
    assert m.next_deadline() == pytest.approx(now + 0.5)
    out = m.tick(now + 0.5)
    ind = sends(out, IndirectPing)
    assert len(ind) == 2  # only two peers besides the target
    assert {s.to for s in ind} == {"p0", "p1", "p2"} - {target}
    assert all(s.message.target == target and s.message.nack for s in ind)
    # one helper nacks, the other stays silent
    m.receive(now + 0.6, ind[0].addr, Nack(ping.message.seq))
    out = m.tick(now + 1.0)
    assert m.health_score() == 1  # 2 expected - 1 received
    assert any(isinstance(a, MemberSuspect) and a.node == target for a in out)
    assert m.member(target).state is MemberState.SUSPECT
    # the next probe starts in the same tick, and waits the awareness-scaled
    # interval (x2) before giving up
    (ping2,) = sends(out, Ping)
    now2 = now + 1.0
    m.tick(now2 + 0.5)
    assert m.next_deadline() == pytest.approx(now2 + 2.0)
    m.receive(now2 + 0.7, ping2.addr, Ack(ping2.message.seq))
    assert m.health_score() == 0  # success heals


def test_all_nacks_received_means_no_penalty():
    m = lone(3)
    now, ping = run_to_probe(m, 0.0)
    ind = sends(m.tick(now + 0.5), IndirectPing)
    for s in ind:
        m.receive(now + 0.6, s.addr, Nack(ping.message.seq))
    m.tick(now + 1.0)
    assert m.health_score() == 0
    assert m.member(ping.to).state is MemberState.SUSPECT


def test_failed_probe_without_helpers_counts_against_us():
    m = lone(1)
    now, ping = run_to_probe(m, 0.0)
    assert sends(m.tick(now + 0.5), IndirectPing) == []
    m.tick(now + 1.0)
    assert m.health_score() == 1


def test_probing_a_suspect_also_tells_it():
    m = lone(1)
    m.receive(0.0, "x:1", Suspect(1, "p0", "x"))
    now = 0.0
    for _ in range(10):
        now = m.next_deadline()
        out = m.tick(now)
        if sends(out, Ping):
            assert sends(out, Suspect) == [Send("p0", "p0:1", Suspect(1, "p0", "me"))]
            return
    raise AssertionError("no probe")


def test_relaying_an_indirect_probe_forwards_ack_or_sends_nack():
    m = lone(0)
    req = IndirectPing(77, "t", "t:1", "r", "r:1", True)
    (ping,) = m.receive(1.0, "r:1", req)
    assert ping.addr == "t:1" and isinstance(ping.message, Ping)
    assert ping.message.target == "t" and ping.message.source == "me"
    out = m.receive(1.01, "t:1", Ack(ping.message.seq))
    assert out == [Send("r", "r:1", Ack(77))]
    assert m.tick(5.0) == []  # nothing left to nack
    # second request: the target stays silent -> nack after probe_timeout
    (ping,) = m.receive(10.0, "r:1", req)
    assert sends(m.tick(10.49), Nack) == []
    assert m.tick(10.5) == [Send("r", "r:1", Nack(77))]
    # a late ack within the probe interval is still forwarded
    assert m.receive(10.8, "t:1", Ack(ping.message.seq)) == [Send("r", "r:1", Ack(77))]


def test_relay_without_nack_request_stays_silent():
    m = lone(0)
    m.receive(1.0, "r:1", IndirectPing(3, "t", "t:1", "r", "r:1", False))
    assert m.tick(1.6) == []


def test_suspect_about_self_is_refuted_with_higher_incarnation():
    m = lone(2)
    out = m.receive(1.0, "p0:1", Suspect(1, "me", "p0"))
    # the accuser told us itself: it also gets our refutation directly
    assert out == [Send("p0", "p0:1", Alive(2, "me", "me:1"))]
    assert m.incarnation == 2
    assert m.take_broadcasts() == [Alive(2, "me", "me:1")]
    assert m.health_score() == 1  # Lifeguard: refuting costs health
    m.receive(1.0, "p0:1", Dead(7, "me", "p0"))
    assert m.incarnation == 8
    assert m.member("me").state is MemberState.ALIVE


def test_a_relayed_suspicion_of_us_gets_no_direct_answer():
    m = lone(3)
    # p1 relays p0's accusation: gossip carries the refutation, not a reply
    assert m.receive(1.0, "p1:1", Suspect(1, "me", "p0")) == []
    assert m.receive(1.0, "p1:1", Suspect(1, "me", "p0"), from_node="p1") == []
    assert m.take_broadcasts() == [Alive(2, "me", "me:1")]
    assert m.stats["refute_direct"] == 0


def test_an_accuser_that_missed_our_refutation_is_answered_directly():
    m = lone(3)
    m.receive(1.0, "p1:1", Suspect(1, "me", "p1"), from_node="p1")
    assert m.incarnation == 2
    # later p0, which never heard the refutation, probes us with its stale
    # suspicion: it is old news to us, but p0 gets our current incarnation
    out = m.receive(5.0, "p0:1", Suspect(1, "me", "p0"), from_node="p0")
    assert out == [Send("p0", "p0:1", Alive(2, "me", "me:1"))]
    assert m.incarnation == 2  # nothing to out-bid
    # a forged "direct" accusation (sender is not the accuser) is not answered
    assert m.receive(5.0, "p1:1", Suspect(1, "me", "p0"), from_node="p1") == []
    assert m.stats["refute_direct"] == 2


def test_restarted_node_outbids_an_alive_about_itself():
    m = lone(1)
    m.receive(1.0, "p0:1", Alive(5, "me", "me:1"))
    assert m.incarnation == 6
    assert m.take_broadcasts() == [Alive(6, "me", "me:1")]
    # the same picture we hold is not refuted again
    m.receive(1.0, "p0:1", Alive(6, "me", "me:1"))
    assert m.take_broadcasts() == []


def test_unrefutable_incarnation_is_counted_not_crashed():
    m = lone(1)
    m.receive(1.0, "p0:1", Suspect(MAX_INCARNATION, "me", "p0"))
    assert m.stats["unrefutable"] == 1
    assert m.incarnation == 1


def test_alive_with_old_incarnation_or_other_address_is_ignored():
    m = lone(1)
    assert m.receive(1.0, "x", Alive(1, "p0", "p0:1")) == []
    assert m.receive(1.0, "x", Alive(2, "p0", "elsewhere:1")) == []
    assert m.stats["address_conflict"] == 1
    assert m.member("p0").addr == "p0:1"
    out = m.receive(1.0, "x", Alive(2, "p0", "p0:1", b"new-meta"))
    assert [type(a).__name__ for a in out] == ["MemberUpdated"]


def test_dead_member_can_be_reclaimed_from_a_new_address_after_reclaim_time():
    cfg = GossipConfig(dead_node_reclaim_time=10.0, push_pull_interval=0.0)
    m = lone(1, cfg)
    m.receive(1.0, "x", Dead(1, "p0", "x"))
    assert m.receive(5.0, "x", Alive(1, "p0", "new:1")) == []  # too early
    out = m.receive(12.0, "x", Alive(1, "p0", "new:1"))
    assert out == [MemberJoined("p0", "new:1", 1)]
    assert m.member("p0").addr == "new:1"


def test_leave_broadcasts_own_death_and_stops_probing():
    m = lone(2)
    m.leave(1.0)
    assert m.take_broadcasts() == [Dead(1, "me", "me")]
    assert m.member("me").state is MemberState.LEFT
    assert m.has_left
    # no refuting and no probing after a leave
    m.receive(2.0, "p0:1", Suspect(1, "me", "p0"))
    m.receive(2.0, "p0:1", Alive(3, "me", "me:1"))
    assert m.incarnation == 1
    for t in (3.0, 10.0, 100.0):
        assert sends(m.tick(t), Ping) == []


def test_random_members_is_distinct_and_respects_filters():
    m = lone(10)
    m.receive(0.0, "x", Dead(1, "p0", "x"))
    m.receive(0.0, "x", Suspect(1, "p1", "x"))
    for _ in range(50):
        got = m.random_members(3, exclude={"p2"})
        ids = [i for i, _ in got]
        assert len(ids) == 3 == len(set(ids))
        assert not {"me", "p0", "p1", "p2"} & set(ids)
    everyone = {i for i, _ in m.random_members(20, alive_only=False)}
    assert everyone == {f"p{i}" for i in range(10)}  # dead p0 is recent enough
    m.tick(31.0)  # now past gossip_to_the_dead_time
    assert "p0" not in {i for i, _ in m.random_members(20, alive_only=False)}


def test_push_pull_request_is_answered_and_merged():
    m = lone(1)
    theirs = PushPull(
        False,
        (
            NodeStateEntry("q", "q:1", 3, MemberState.ALIVE),
            NodeStateEntry("p0", "p0:1", 1, MemberState.DEAD),
            NodeStateEntry("gone", "g:1", 2, MemberState.LEFT),
        ),
    )
    out = m.receive(1.0, "q:1", theirs)
    replies = sends(out, PushPull)
    assert len(replies) == 1 and replies[0].addr == "q:1" and replies[0].message.reply
    assert {e.node for e in replies[0].message.states} == {"me", "p0"}
    assert MemberJoined("q", "q:1", 3) in out
    # a remote "dead" only makes us suspect
    assert m.member("p0").state is MemberState.SUSPECT
    assert m.member("gone") is None  # never knew it; a Left about it is ignored
    # a reply is merged but not answered
    assert sends(m.receive(1.0, "q:1", PushPull(True, ())), PushPull) == []


def test_join_sends_state_to_seeds_but_not_to_self():
    m = lone(0)
    out = m.join(0.0, [(None, "seed:1"), ("me", "me:1"), (None, "me:1")])
    assert len(out) == 1 and out[0].addr == "seed:1"
    assert isinstance(out[0].message, PushPull) and not out[0].message.reply


def test_receive_rejects_non_messages():
    m = lone(0)
    with pytest.raises(Exception, match="not a membership message"):
        m.receive(0.0, "x", "hello")  # type: ignore[arg-type]


# -- clusters ---------------------------------------------------------------------


def test_join_via_seed_makes_everyone_alive():
    c = Cluster(6)
    c.join_all()
    c.run_until(5.0)
    assert all_alive(c)
    for node in c.nodes.values():
        assert {i.node for i in node.m.members()} == set(c.nodes)
        assert all(i.state is MemberState.ALIVE for i in node.m.members())
    # joins are reported as events, once per member
    joined = [ev.node for _, ev in c.nodes["n3"].events if isinstance(ev, MemberJoined)]
    assert sorted(joined) == sorted(set(c.nodes) - {"n3"})
    c.run_until(20.0)
    # probes measured an RTT of one round trip
    rtts = [i.rtt for i in c.nodes["n1"].m.members() if i.node != "n1"]
    assert all(r == pytest.approx(2 * LATENCY) for r in rtts)
    assert not any(isinstance(ev, MemberSuspect) for n in c.nodes.values() for _, ev in n.events)


@pytest.mark.parametrize("quorum", [3, 0], ids=["quorum", "lifeguard-only"])
def test_stopped_node_is_suspected_then_declared_dead_by_all_in_time(quorum):
    c = Cluster(6, config=replace(GossipConfig.lan(), suspicion_quorum=quorum))
    cfg = c.config
    c.join_all()
    c.run_until(10.0)
    assert all_alive(c)
    stop_at = c.now
    c.stop("n5")
    n = 6
    # worst case: probed once per round by someone (2 rounds), then the
    # un-confirmed maximum suspicion timeout, plus dissemination slack
    bound = stop_at + 2 * n * cfg.probe_interval + cfg.suspicion_max_timeout(n) + 2.0
    c.run_until(bound)
    others = [i for i in c.nodes if i != "n5"]
    for i in others:
        info = c.nodes[i].m.member("n5")
        assert info is None or info.state is MemberState.DEAD, i
        t_dead = c.first_event(i, MemberDead, "n5")
        assert t_dead is not None and t_dead <= bound
        t_susp = c.first_event(i, MemberSuspect, "n5")
        if t_susp is not None:
            assert t_susp <= t_dead
        # never faster than one failed probe plus the shortest timeout: the
        # quorum's, or Lifeguard's nominal (fully confirmed) one without it
        floor = cfg.suspicion_quorum_timeout if quorum else cfg.suspicion_timeout(n)
        assert t_dead >= stop_at + cfg.probe_interval + floor
        assert c.nodes[i].m.alive_count() == n - 1
    # confirmations shortened detection below the unconfirmed maximum
    earliest = min(c.first_event(i, MemberDead, "n5") for i in others)
    assert earliest < stop_at + cfg.suspicion_max_timeout(n)
    if quorum:
        # the other members probed it themselves and confirmed: a quorum,
        # so detection is faster than Lifeguard's nominal timeout allows
        latest = max(c.first_event(i, MemberDead, "n5") for i in others)
        assert latest < stop_at + cfg.probe_interval + cfg.suspicion_timeout(n)
        assert sum(c.nodes[i].m.stats["witness_confirmed"] for i in others) >= quorum
    # nobody else was ever declared dead
    assert not any(
        isinstance(ev, MemberDead) and ev.node != "n5"
        for node in c.nodes.values()
        for _, ev in node.events
    )
    # after gossip_to_the_dead_time and a probe round, the dead member is forgotten
    c.run_until(c.now + cfg.gossip_to_the_dead_time + 2 * n * cfg.probe_interval)
    for i in others:
        assert c.nodes[i].m.member("n5") is None
        assert c.nodes[i].m.num_members() == n - 1


def test_in_a_clan_of_three_a_stopped_member_is_dead_after_the_minimum_not_the_maximum():
    # Nobody can confirm (k = 0): memberlist waits the minimum, 4 s (LAN),
    # not 6 times that; we add one final probe of our own before acting.
    c = Cluster(3)
    cfg = c.config
    c.join_all()
    c.run_until(5.0)
    assert all_alive(c)
    stop_at = c.now
    c.stop("n2")
    c.run_until(stop_at + 30.0)
    for i in ("n0", "n1"):
        t_susp = c.first_event(i, MemberSuspect, "n2")
        t_dead = c.first_event(i, MemberDead, "n2")
        assert t_dead is not None, i
        if t_susp is not None:
            assert t_dead <= t_susp + cfg.suspicion_timeout(3) + cfg.probe_interval + 0.1
    # both probe n2 within a round: 2 probe intervals, then the timer, the check
    latest = max(c.first_event(i, MemberDead, "n2") for i in ("n0", "n1"))
    assert latest < stop_at + 3 * cfg.probe_interval + cfg.suspicion_timeout(3) + 1.0
    assert latest < stop_at + cfg.suspicion_max_timeout(3)


def test_suspected_live_node_refutes_with_higher_incarnation():
    c = Cluster(5)
    c.join_all()
    c.run_until(5.0)
    n1 = c.nodes["n1"]
    c.route(n1, n1.m.receive(c.now, addr_of("n0"), Suspect(1, "n2", "n0")))
    assert n1.m.member("n2").state is MemberState.SUSPECT
    c.run_until(c.now + 5.0)
    for i, info in c.views("n2").items():
        assert info.state is MemberState.ALIVE, i
        assert info.incarnation == 2, i
    assert c.nodes["n2"].m.incarnation == 2
    assert c.nodes["n2"].m.stats["refutes"] == 1
    t_susp = c.first_event("n1", MemberSuspect, "n2")
    t_alive = c.first_event("n1", MemberAlive, "n2")
    assert t_susp is not None and t_alive is not None and t_susp < t_alive
    assert not any(isinstance(ev, MemberDead) for node in c.nodes.values() for _, ev in node.events)


def test_restarted_node_rejoins_with_higher_incarnation():
    c = Cluster(5)
    c.join_all()
    c.run_until(5.0)
    c.stop("n3")
    # run until everyone has declared n3 dead, well before it is forgotten
    while not all(v.state is MemberState.DEAD for v in c.views("n3").values()):
        assert c.now < 60.0
        c.run_until(c.now + 0.5)
    old_inc = c.nodes["n0"].m.member("n3").incarnation
    # same id and address, a fresh process that starts again at incarnation 1
    restart_at = c.now
    node = c.add("n3")
    c.route(node, node.m.join(c.now, [(None, addr_of("n0"))]))
    c.run_until(c.now + 5.0)
    assert all_alive(c)
    assert node.m.incarnation > old_inc
    for i, info in c.views("n3").items():
        assert info.state is MemberState.ALIVE, i
        assert info.incarnation == node.m.incarnation, i
    for i in ("n0", "n1", "n2", "n4"):
        assert c.first_event(i, MemberDead, "n3") < restart_at
        rejoined = [
            t for t, ev in c.nodes[i].events if isinstance(ev, MemberJoined) and ev.node == "n3"
        ]
        assert rejoined and rejoined[-1] >= restart_at


def test_indirect_probe_avoids_false_positive_when_direct_path_is_blocked():
    c = Cluster(5)
    c.join_all()
    c.run_until(3.0)
    c.block("n0", "n1")
    c.run_until(40.0)
    assert all_alive(c)
    assert not any(
        isinstance(ev, (MemberSuspect, MemberDead))
        for node in c.nodes.values()
        for _, ev in node.events
    )
    indirect = [
        msg
        for t, src, _, msg in c.sent
        if t > 3.0 and src == "n0" and isinstance(msg, IndirectPing) and msg.target == "n1"
    ]
    assert indirect, "n0 never had to probe n1 indirectly"


def test_without_helpers_a_blocked_path_is_a_false_positive():
    # Control for the test above: with indirect checks off, the same block
    # does make n0 suspect n1, so the no-suspicion assertion has teeth.
    cfg = GossipConfig(indirect_checks=0)
    c = Cluster(5, config=cfg)
    c.join_all()
    c.run_until(3.0)
    c.block("n0", "n1")
    c.run_until(20.0)
    assert c.first_event("n0", MemberSuspect, "n1") is not None


def test_graceful_leave_is_seen_as_left_not_dead():
    c = Cluster(5)
    c.join_all()
    c.run_until(5.0)
    n4 = c.nodes["n4"]
    c.route(n4, n4.m.leave(c.now))
    c.run_until(c.now + 2.0)
    c.stop("n4")
    c.run_until(c.now + 20.0)
    for i in ("n0", "n1", "n2", "n3"):
        assert c.nodes[i].m.member("n4").state is MemberState.LEFT
        assert c.first_event(i, MemberLeft, "n4") is not None
        assert c.first_event(i, MemberDead, "n4") is None


def test_cluster_converges_under_packet_loss():
    c = Cluster(8, loss=0.05, seed=3)
    c.join_all()
    for t in (2.0, 4.0, 6.0):
        c.run_until(t)
        # a join is one exchange; like the composer, retry while alone
        for node in c.nodes.values():
            if node.m.alive_count() == 1:
                c.route(node, node.m.join(c.now, [(None, addr_of("n0"))]))
    c.run_until(30.0)
    # Everyone knows everyone.  A lost ping plus lost indirect paths can
    # still make a brief suspicion (the member refutes it), never a death.
    for node in c.nodes.values():
        views = {i.node: i.state for i in node.m.members()}
        assert set(views) == set(c.nodes)
        assert set(views.values()) <= {MemberState.ALIVE, MemberState.SUSPECT}
    assert not any(isinstance(ev, MemberDead) for n in c.nodes.values() for _, ev in n.events)


def test_gossiped_confirmations_shorten_the_suspicion_inside_membership():
    m = lone(5)  # six members: k = suspicion_mult - 2 = 2, min 4 s, max 24 s
    out = m.receive(0.0, "x", Suspect(1, "p0", "x"))
    assert out == [MemberSuspect("p0", "p0:1", 1)]
    assert m.take_broadcasts() == [Suspect(1, "p0", "x")]
    # a repeat from the originator is not news and is not re-gossiped
    m.receive(0.5, "x", Suspect(1, "p0", "x"))
    assert m.take_broadcasts() == []
    m.receive(1.0, "y", Suspect(1, "p0", "p1"))
    assert m.take_broadcasts() == [Suspect(1, "p0", "p1")]
    m.receive(2.0, "y", Suspect(1, "p0", "p2"))
    # two confirmations reach the minimum: dead 4 s after the first suspicion
    assert all(not isinstance(a, MemberDead) for a in m.tick(3.99))
    out = m.tick(4.0)
    assert MemberDead("p0", "p0:1", 1) in out
    assert m.take_broadcasts()[-1] == Dead(1, "p0", "me")
    assert m.alive_count() == 5


def test_a_quorum_of_confirmations_ends_the_suspicion_sooner():
    m = lone(5)  # six members: quorum 3 is possible (3 besides me, p0, x)
    m.receive(0.0, "x", Suspect(1, "p0", "x"))
    m.receive(0.5, "y", Suspect(1, "p0", "p1"))
    m.receive(0.6, "y", Suspect(1, "p0", "p2"))
    # two confirmations: Lifeguard's minimum, 4 s
    assert m._suspicions["p0"].deadline == pytest.approx(4.0)
    m.receive(1.0, "y", Suspect(1, "p0", "p3"))
    assert m._suspicions["p0"].deadline == pytest.approx(2.0)
    # the third is a quorum: dead 2 s after the suspicion began
    assert all(not isinstance(a, MemberDead) for a in m.tick(1.99))
    assert MemberDead("p0", "p0:1", 1) in m.tick(2.0)


def test_no_quorum_rule_when_the_clan_is_too_small_for_one():
    m = lone(4)  # five members: only p1, p2 can confirm besides x
    m.receive(0.0, "x", Suspect(1, "p0", "x"))
    m.receive(0.5, "y", Suspect(1, "p0", "p1"))
    m.receive(0.6, "y", Suspect(1, "p0", "p2"))
    assert all(not isinstance(a, MemberDead) for a in m.tick(3.99))
    assert MemberDead("p0", "p0:1", 1) in m.tick(4.0)


def test_quorum_off_keeps_lifeguard_timer():
    m = lone(8, GossipConfig(push_pull_interval=0.0, suspicion_witnesses=0, suspicion_quorum=0))
    m.receive(0.0, "x", Suspect(1, "p0", "x"))
    for i in (1, 2, 3, 4):
        m.receive(0.1 * i, "y", Suspect(1, "p0", f"p{i}"))
    # 9 members: Lifeguard's nominal timeout 4 s, however many confirm
    assert all(not isinstance(a, MemberDead) for a in m.tick(3.99))
    assert MemberDead("p0", "p0:1", 1) in m.tick(4.0)


def witness_config(**kw):
    return GossipConfig(push_pull_interval=0.0, **kw)


def test_witness_probes_the_suspect_tells_it_and_confirms_when_it_is_silent():
    m = lone(5, witness_config())  # 4 others than the suspect: all witness
    out = m.receive(0.0, "x", Suspect(1, "p0", "x"))
    assert MemberSuspect("p0", "p0:1", 1) in out
    pings = sends(out, Ping)
    assert [(a.to, a.message.target) for a in pings] == [("p0", "p0")]
    # it is told it is suspected, so a live member refutes at once
    assert [(a.to, a.message) for a in sends(out, Suspect)] == [("p0", Suspect(1, "p0", "me"))]
    assert m.stats["witness_probes"] == 1
    m.take_broadcasts()
    # no ack in probe_timeout: helpers are asked, as in our own probes
    out = m.tick(0.5)
    helpers = [a for a in sends(out, IndirectPing) if a.message.seq == pings[0].message.seq]
    assert len(helpers) == 3 and all(a.message.target == "p0" for a in helpers)
    # nobody reached it by the end of the probe: our own confirmation
    m.tick(1.0)
    assert m.stats["witness_confirmed"] == 1
    assert Suspect(1, "p0", "me") in m.take_broadcasts()


def test_witness_probe_answered_confirms_nothing():
    m = lone(5, witness_config())
    out = m.receive(0.0, "x", Suspect(1, "p0", "x"))
    (ping,) = sends(out, Ping)
    m.take_broadcasts()
    m.receive(0.01, "p0:1", Ack(ping.message.seq))
    m.tick(2.0)
    assert m.stats["witness_confirmed"] == 0
    assert m.member("p0").rtt == pytest.approx(0.01)
    assert not any(isinstance(b, Suspect) for b in m.take_broadcasts())


def test_witness_probe_of_a_refuted_member_confirms_nothing():
    m = lone(5, witness_config())
    m.receive(0.0, "x", Suspect(1, "p0", "x"))
    m.receive(0.2, "p0:1", Alive(2, "p0", "p0:1"))
    m.take_broadcasts()
    m.tick(2.0)
    assert m.stats["witness_confirmed"] == 0
    assert m.member("p0").state is MemberState.ALIVE


def test_about_suspicion_witnesses_members_witness_in_a_large_clan():
    cfg = witness_config(suspicion_witnesses=8)
    probing = 0
    for seed in range(40):
        m = lone(101, cfg, seed=seed)
        probing += len(sends(m.receive(0.0, "x", Suspect(1, "p0", "x")), Ping))
    # each of 100 members (not the suspect) would probe with p = 8/100:
    # 40 trials of one member, expected 3.2 -- far from all 40, and not none
    # over more seeds
    assert probing < 15
    many = sum(
        len(sends(lone(101, cfg, seed=s).receive(0.0, "x", Suspect(1, "p0", "x")), Ping))
        for s in range(400)
    )
    assert 16 <= many <= 50  # binomial(400, 0.08): mean 32


def test_a_member_that_left_witnesses_nothing():
    m = lone(5, witness_config())
    m.leave(0.0)
    out = m.receive(0.1, "x", Suspect(1, "p0", "x"))
    assert sends(out, Ping) == [] and m.stats["witness_probes"] == 0


def test_our_own_suspicion_starts_no_witness_probe():
    m = lone(5, witness_config())
    m.receive(0.0, "p0:1", Alive(1, "p0", "p0:1"))
    out = m.receive(0.0, "x", Suspect(1, "p0", "me"))
    assert sends(out, Ping) == []
    assert m.stats["witness_probes"] == 0


def test_witness_probes_are_bounded_under_a_flood_of_suspicions():
    m = lone(60, witness_config())  # p = 8/58 per suspicion; force all
    m._rng.random = lambda: 0.0
    for i in range(50):
        m.receive(0.0, "x", Suspect(1, f"p{i}", "x"))
    assert m.stats["witness_probes"] == MAX_WITNESS_PROBES
    assert m.stats["witness_overflow"] == 50 - MAX_WITNESS_PROBES
    assert len(m._witness) == MAX_WITNESS_PROBES
    m.tick(5.0)
    assert not m._witness


def others_answer(now, send):
    """Everyone but p0 acks (so our own health stays good)."""
    return Ack(send.message.seq) if send.to != "p0" else None


def everyone_answers(now, send):
    return Ack(send.message.seq)


def step(m, until, dt=0.01, answer=others_answer):
    """Tick `m` in small steps up to `until`; (time, action) of everything.
    `answer(now, send)` may return an Ack to feed back for a Ping."""
    got = []
    now = m._now
    while now < until - 1e-9:
        now = min(until, now + dt)
        for a in m.tick(now):
            got.append((now, a))
            if answer is not None and isinstance(a, Send) and isinstance(a.message, Ping):
                reply = answer(now, a)
                if reply is not None:
                    m.receive(now, a.addr, reply)
            elif isinstance(a, Send) and isinstance(a.message, IndirectPing):
                # helpers are alive: they nack, so our own health stays good
                m.receive(now + 0.5, a.addr, Nack(a.message.seq))
    return got


def test_unconfirmed_suspicion_is_checked_at_the_nominal_timeout_and_before_death():
    m = lone(5, GossipConfig(push_pull_interval=0.0, suspicion_witnesses=0))
    m.receive(0.0, "x", Suspect(1, "p0", "x"))  # 6 members: nominal 4 s, max 24 s
    got = step(m, 30.0)
    told = [t for t, a in got if isinstance(a, Send) and a.message == Suspect(1, "p0", "me")]
    # at the nominal timeout we probe it ourselves and tell it; its silence is
    # our confirmation (the Lifeguard timer shrinks); before acting on that
    # under-confirmed timer we check once more, a whole probe
    assert any(t == pytest.approx(4.0, abs=0.011) for t in told)
    dead = [t for t, a in got if isinstance(a, MemberDead)]
    assert len(dead) == 1 and dead[0] < 24.0
    assert told[-1] == pytest.approx(dead[0] - 1.0, abs=0.011)
    assert m.stats["suspicion_checks"] == 1 and m.stats["final_checks"] == 1


def test_a_suspicion_that_missed_the_refutation_is_cleared_by_our_check():
    m = lone(5, GossipConfig(push_pull_interval=0.0, suspicion_witnesses=0))
    m.receive(0.0, "x", Suspect(1, "p0", "x"))

    got = step(m, 4.05, answer=everyone_answers)
    # it answered our check, and (having refuted long ago) tells us directly
    assert any(isinstance(a, Send) and a.message == Suspect(1, "p0", "me") for _, a in got)
    m.receive(4.06, "p0:1", Alive(2, "p0", "p0:1"))
    assert not any(isinstance(a, MemberDead) for _, a in step(m, 40.0, answer=everyone_answers))
    assert m.member("p0").state is MemberState.ALIVE


def test_a_final_check_that_reaches_the_member_waits_for_its_refutation():
    m = lone(5, GossipConfig(push_pull_interval=0.0, suspicion_witnesses=0))
    m.receive(0.0, "x", Suspect(1, "p0", "x"))
    step(m, 6.0)  # the check at 4 s went unanswered: our confirmation
    final = m._suspicions["p0"].deadline
    assert 6.0 < final < 24.0
    step(m, final - 0.01)
    answered = []

    def p0_answers(now, send):
        if send.to == "p0":
            answered.append(now)
        return Ack(send.message.seq)

    got = step(m, 14.0, answer=p0_answers)
    # the final check reached it: no death; checked again each probe interval
    assert not any(isinstance(a, MemberDead) for _, a in got)
    assert answered[0] == pytest.approx(final, abs=0.011)
    assert any(t == pytest.approx(answered[0] + 1.0, abs=0.011) for t in answered)
    assert m.stats["final_checks"] >= 2
    # its refutation arrives: the suspicion is over
    m.receive(14.0, "p0:1", Alive(2, "p0", "p0:1"))
    after = step(m, 40.0, dt=0.1, answer=everyone_answers)
    assert not any(isinstance(a, MemberDead) for _, a in after)
    assert m.member("p0").state is MemberState.ALIVE


def test_a_confirmed_suspicion_is_not_checked_again():
    m = lone(5)
    m.receive(0.0, "x", Suspect(1, "p0", "x"))
    m.receive(0.1, "y", Suspect(1, "p0", "p1"))
    m.receive(0.2, "y", Suspect(1, "p0", "p2"))
    out = m.tick(4.0)
    assert MemberDead("p0", "p0:1", 1) in out
    assert m.stats["final_checks"] == 0


def test_refuting_alive_cancels_the_suspicion_timer():
    m = lone(5)
    m.receive(0.0, "x", Suspect(1, "p0", "x"))
    out = m.receive(1.0, "p0:1", Alive(2, "p0", "p0:1"))
    assert out == [MemberAlive("p0", "p0:1", 2)]
    assert not any(isinstance(a, MemberDead) for a in m.tick(30.0))
    assert m.member("p0").state is MemberState.ALIVE


def test_next_deadline_tracks_timers_and_skips_stale_ones():
    m = lone(5)
    m.receive(0.0, "x", Suspect(1, "p0", "x"))
    m.receive(0.0, "x", Alive(2, "p0", "p0:1"))  # cancels the 24 s timer
    seen = []
    now = 0.0
    for _ in range(200):
        d = m.next_deadline()
        assert d is not None and d >= now
        seen.append(d)
        now = d
        for a in m.tick(now):
            if isinstance(a, Send) and isinstance(a.message, Ping):
                m.receive(now + 0.001, a.addr, Ack(a.message.seq))
        if now > 30:
            break
    # only the probe cycle remains: deadlines about one probe interval apart
    gaps = [b - a for a, b in zip(seen[1:], seen[2:], strict=False)]
    assert gaps and all(g == pytest.approx(1.0) for g in gaps)


@pytest.mark.parametrize("regossip", [True, False])
def test_push_pull_reply_regossip_is_optional_but_requests_always_gossip(regossip):
    m = Membership(
        GossipConfig.lan(),
        "me",
        "me:1",
        random.Random(1),
        0.0,
        regossip_push_pull_replies=regossip,
    )
    m.take_broadcasts()
    reply = PushPull(True, (NodeStateEntry("a", "a:1", 1, MemberState.ALIVE),))
    out = m.receive(1.0, "a:1", reply)
    assert out == [MemberJoined("a", "a:1", 1)]
    assert m.take_broadcasts() == ([Alive(1, "a", "a:1")] if regossip else [])
    request = PushPull(False, (NodeStateEntry("b", "b:1", 1, MemberState.ALIVE),))
    m.receive(1.0, "b:1", request)
    assert m.take_broadcasts() == [Alive(1, "b", "b:1")]
