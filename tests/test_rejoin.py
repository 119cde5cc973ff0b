"""Restarts rejoin (issue 13, item 4).

Sans-IO: the rejoin schedule on a mock clock, the node retrying members it
marked left or dead, authenticated address moves, the peer book codec with
hostile files.  Integration: three real agents in-process on loopback; the
founder (the seed of the others) stops or is killed and comes back with no
seeds configured.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.gossip.config import GossipConfig
from clanagent.gossip.events import Alive, MemberJoined, MemberUpdated, PushPull, Send
from clanagent.gossip.membership import Membership
from clanagent.gossip.node import DATAGRAM_LIMITS, GossipNode, MsgType, SendTo
from clanagent.gossip.rejoin import (
    MAX_PEERS,
    PEER_BOOK_FILE,
    RETRY_MAX_DELAY,
    PeerBookError,
    PeerEntry,
    RejoinSchedule,
    decode_peer_book,
    load_peer_book,
    save_peer_book,
)
from clanagent.store import Store
from clanagent.wire import unpack
from tests.test_gossip_node import CLAN, Router, make_nodes
from tests.test_gossip_service import alive_peers, make_cfg, start_agent, wait_until

LOCAL = GossipConfig.local()
PUSH_PULL = LOCAL.push_pull_interval  # 15 s: the bound a restarted founder must meet


# -- the schedule, on a mock clock ---------------------------------------------------


def attempt_times(sched: RejoinSchedule, until: float, step: float = 0.25) -> list[float]:
    t, times = 0.0, []
    while t <= until:
        if sched.due(t):
            times.append(t)
        t += step
    return times


def test_backoff_doubles_from_the_base_with_jitter_up_to_the_cap():
    sched = RejoinSchedule(15.0, random.Random(1))
    sched.lost("x", "h:1", 0.0)
    times = attempt_times(sched, 3600.0)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    for k, gap in enumerate(gaps):
        nominal = min(RETRY_MAX_DELAY, 15.0 * 2**k)
        assert 0.5 * nominal - 0.25 <= gap <= nominal + 0.25, (k, gap)
    # The first attempt is within one base interval; later ones never wait
    # longer than the cap, so a member that comes back is found within minutes.
    assert gaps[0] <= 15.25
    assert max(gaps) <= RETRY_MAX_DELAY + 0.25
    assert len(times) >= 3600 / RETRY_MAX_DELAY  # kept trying for the whole hour


def test_jitter_spreads_members_lost_together():
    sched = RejoinSchedule(15.0, random.Random(2))
    for i in range(20):
        sched.lost(f"m{i}", f"h:{i}", 0.0)
    firsts = sorted(e[2] for e in sched.pending().values())
    assert firsts[0] >= 7.5 and firsts[-1] <= 15.0
    assert len(set(firsts)) == 20


def test_a_member_found_again_is_no_longer_retried_and_a_new_loss_starts_over():
    sched = RejoinSchedule(10.0, random.Random(3))
    sched.lost("x", "h:1", 0.0)
    assert attempt_times(sched, 100.0)
    sched.found("x")
    assert sched.next_deadline() == float("inf") and sched.due(1e6) == []
    sched.lost("x", "h:2", 200.0)
    assert sched.pending()["x"][:2] == ("h:2", 0)
    assert 205.0 <= sched.next_deadline() <= 210.0


def test_only_members_the_inventory_lists_are_retried():
    sched = RejoinSchedule(10.0, random.Random(4))
    sched.lost("a", "h:1", 0.0)
    sched.lost("b", "h:2", 0.0)
    sched.scope({"a"})
    assert set(sched.pending()) == {"a"}
    sched.lost("c", "h:3", 0.0)  # not listed: not retried
    assert "c" not in sched
    # While listed, a member is retried for as long as it takes.
    assert sched.due(10 * 24 * 3600.0) == [("a", "h:1")]


def test_without_an_inventory_a_lost_member_is_given_up_after_the_timeout():
    sched = RejoinSchedule(10.0, random.Random(5), timeout=1000.0)
    sched.lost("a", "h:1", 0.0)
    times = attempt_times(sched, 2000.0, step=1.0)
    assert times and max(times) <= 1000.0 + RETRY_MAX_DELAY
    assert "a" not in sched and sched.stats["rejoin_given_up"] == 1


def test_the_schedule_is_bounded():
    sched = RejoinSchedule(10.0, random.Random(6), max_entries=8)
    for i in range(20):
        sched.lost(f"m{i}", "h:1", float(i))
    assert len(sched) == 8 and set(sched.pending()) == {f"m{i}" for i in range(12, 20)}
    assert sched.stats["rejoin_evicted"] == 12
    for i in range(1000):  # churn does not grow the heap
        sched.lost("m19", "h:1", 100.0 + i)
    assert len(sched._heap) <= 2 * len(sched) + 65


# -- the node: members marked left or dead are retried -------------------------------


class Recorder(Router):
    """The test router, also remembering (time, src, dst, message types) of each send."""

    def __init__(self, nodes):
        super().__init__(nodes)
        self.sent: list[tuple[float, str, str, set[int]]] = []

    def handle(self, src, actions):
        for a in actions:
            if isinstance(a, SendTo):
                items = unpack(a.data, DATAGRAM_LIMITS)[1]
                self.sent.append((self.now, src, a.addr, {t for t, _ in items}))
        super().handle(src, actions)


def recorder(n: int) -> tuple[Recorder, dict[str, GossipNode]]:
    router, nodes = make_nodes(n)
    rec = Recorder(nodes)
    rec.q, rec.seq = router.q, router.seq
    return rec, nodes


def restart(router: Router, nodes: dict[str, GossipNode], addr: str) -> GossipNode:
    """The node at `addr` again: same identity, empty memory, no seeds."""
    old = nodes[addr]
    node = GossipNode(
        old.identity,
        LOCAL,
        addr=addr,
        clan=CLAN,
        store=Store.open(None),
        rng=random.Random(99),
        now=router.now,
        name=old.name,
    )
    nodes[addr] = node
    router.down.discard(addr)
    return node


def everyone_alive(nodes: dict[str, GossipNode]) -> bool:
    return all(
        sum(m["state"] == "alive" for m in node.members()) == len(nodes) for node in nodes.values()
    )


def rejoin_time(router: Router, nodes, limit: float) -> float | None:
    start = router.now
    while router.now < start + limit:
        router.run_until(router.now + 0.1)
        if everyone_alive(nodes):
            return router.now - start
    return None


@pytest.mark.parametrize("how", ["left", "dead"])
def test_a_member_restarted_long_after_and_knowing_nobody_is_found_by_retries(how):
    router, nodes = recorder(3)
    router.run_until(5.0)
    assert everyone_alive(nodes)
    if how == "left":
        router.handle("n0", nodes["n0"].leave(router.now))
        router.run_until(router.now + 0.5)
    else:
        router.down.add("n0")
    router.run_until(router.now + 30.0)  # long past detection, and past forgetting it
    assert {nodes[a].member_state(nodes["n0"].node_id) for a in ("n1", "n2")} <= {how, None}
    pushes = [s for s in router.sent if s[2] == "n0" and int(MsgType.PUSH_PULL) in s[3]]
    assert pushes, "nobody tries to reach the member any more"
    for a in ("n1", "n2"):
        assert nodes["n0"].node_id in nodes[a].rejoin_pending()
    restart(router, nodes, "n0")
    # n0 was lost 30 s ago: the next retries are at most 60 s away (third step).
    took = rejoin_time(router, nodes, 4 * PUSH_PULL + 1)
    assert took is not None
    for a in ("n1", "n2"):
        assert nodes[a].rejoin_pending() == {}


@pytest.mark.parametrize("how", ["left", "dead"])
def test_a_member_restarted_at_once_is_back_within_one_push_pull_interval(how):
    router, nodes = recorder(3)
    router.run_until(5.0)
    if how == "left":
        router.handle("n0", nodes["n0"].leave(router.now))
        router.run_until(router.now + 0.5)
        marked = router.now
    else:
        router.down.add("n0")
        victim = nodes["n0"].node_id
        while not all(nodes[a].member_state(victim) == "dead" for a in ("n1", "n2")):
            router.run_until(router.now + 0.1)
        marked = router.now
    restart(router, nodes, "n0")
    took = rejoin_time(router, nodes, 2 * PUSH_PULL)
    assert took is not None and router.now - marked <= PUSH_PULL + 1.0


def test_members_the_inventory_no_longer_lists_are_not_retried():
    router, nodes = recorder(3)
    router.run_until(5.0)
    gone = nodes["n0"].node_id
    router.handle("n0", nodes["n0"].leave(router.now))
    router.run_until(router.now + 0.5)
    for a in ("n1", "n2"):
        nodes[a].set_rejoin_scope({nodes["n1"].node_id, nodes["n2"].node_id})
    t0 = router.now
    router.run_until(t0 + 120.0)
    assert not [s for s in router.sent if s[0] > t0 and s[2] == "n0" and MsgType.PUSH_PULL in s[3]]
    assert all(nodes[a].rejoin_pending() == {} for a in ("n1", "n2"))
    assert gone not in {m["node_id"] for m in nodes["n1"].members()}


def test_a_big_clan_makes_a_few_attempts_per_step_not_one_per_member():
    """A guard on the cost of retries (main's Serf-style reconnect met it too)."""
    router, nodes = recorder(30)
    router.run_until(15.0)
    assert everyone_alive(nodes)
    router.down.add("n0")
    router.run_until(router.now + 3 * PUSH_PULL)
    pushes = [s for s in router.sent if s[2] == "n0" and MsgType.PUSH_PULL in s[3]]
    # 29 peers, each at most 2 steps in 45 s: about REJOIN_FANOUT (3) per step.
    assert 1 <= len(pushes) <= 20, len(pushes)


# -- membership: who may move a member's address -----------------------------------


def lone(node_id: str = "me") -> Membership:
    return Membership(LOCAL, node_id, f"{node_id}:1", random.Random(1), 0.0)


def test_a_member_may_move_its_own_address_when_it_says_so_itself():
    m = lone()
    m.receive(0.0, "x:1", Alive(1, "x", "x:1", b""))
    third = m.receive(1.0, "y:1", Alive(2, "x", "x:2", b""), from_node="y")
    assert third == [] and m.stats["address_conflict"] == 1
    assert {i.node: i.addr for i in m.members()}["x"] == "x:1"
    own = m.receive(1.0, "x:2", Alive(2, "x", "x:2", b""), from_node="x")
    assert any(isinstance(e, MemberUpdated) for e in own)
    assert {i.node: i.addr for i in m.members()}["x"] == "x:2"
    assert m.stats["address_moved"] == 1
    # not at an old incarnation, even from itself
    m.receive(2.0, "x:3", Alive(1, "x", "x:3", b""), from_node="x")
    assert {i.node: i.addr for i in m.members()}["x"] == "x:2"


def test_a_push_pull_from_an_authenticated_sender_is_answered_by_id():
    m = lone()
    state = Membership(LOCAL, "x", "x:1", random.Random(2), 0.0).local_state()
    out = m.receive(0.0, "127.0.0.1:54321", PushPull(False, state), from_node="x")
    replies = [a for a in out if isinstance(a, Send) and isinstance(a.message, PushPull)]
    assert replies and replies[0].to == "x"
    assert any(isinstance(e, MemberJoined) for e in out)


# -- the peer book -----------------------------------------------------------------


def test_peer_book_round_trips_bounded_and_skips_what_cannot_be_dialed(tmp_path):
    entries = [PeerEntry(f"id{i}", f"127.0.0.1:{1000 + i}", f"m{i}") for i in range(MAX_PEERS + 50)]
    entries.insert(0, PeerEntry("ob", "outbound-only:abc", "x"))
    path = tmp_path / PEER_BOOK_FILE
    save_peer_book(path, entries)
    got, skipped = load_peer_book(path)
    assert len(got) == MAX_PEERS and got[0] == PeerEntry("id0", "127.0.0.1:1000", "m0")
    assert skipped == 0
    assert [p.name for p in tmp_path.iterdir()] == [PEER_BOOK_FILE]  # no temp file left
    assert load_peer_book(tmp_path / "missing.json") == ([], 0)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\xff garbage",
        b"[1, 2]",
        b'{"version": 2, "peers": []}',
        b'{"version": 1, "peers": {}}',
        b"[" * 100000,
        b'{"version": 1, "peers": []}' + b" " * (300 * 1024),
    ],
)
def test_an_unusable_peer_file_is_refused_as_a_whole(data):
    with pytest.raises(PeerBookError):
        decode_peer_book(data)


def test_bad_entries_are_skipped_and_counted():
    doc = {
        "version": 1,
        "peers": [
            {"id": "good", "addr": "127.0.0.1:7946", "name": "g"},
            {"id": "good", "addr": "127.0.0.1:7947"},  # duplicate id
            {"id": "a b", "addr": "127.0.0.1:1"},
            {"id": "x" * 500, "addr": "127.0.0.1:1"},
            {"id": "p", "addr": "no-port"},
            {"id": "q", "addr": "h:99999"},
            {"id": "r", "addr": "h:1\n"},
            {"id": "s", "addr": 7},
            {"id": "t", "addr": "h:1", "name": ["x"]},
            "not a dict",
        ],
    }
    got, skipped = decode_peer_book(json.dumps(doc).encode())
    assert got == [PeerEntry("good", "127.0.0.1:7946", "g")] and skipped == 9


def test_a_peer_file_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PeerBookError):  # and does not block
        load_peer_book(fifo)
    target = tmp_path / "t.json"
    save_peer_book(target, [PeerEntry("a", "h:1")])
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(PeerBookError, match="symlink"):  # not followed
        load_peer_book(link)


@settings(max_examples=150, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda c: st.lists(c, max_size=5) | st.dictionaries(st.text(max_size=8), c, max_size=5),
            max_leaves=20,
        ).map(lambda v: json.dumps({"version": 1, "peers": v}).encode()),
    )
)
def test_decoding_any_bytes_gives_entries_or_peer_book_error(data):
    try:
        got, skipped = decode_peer_book(data)
    except PeerBookError:
        return
    assert len(got) <= MAX_PEERS and skipped >= 0
    assert all(isinstance(e, PeerEntry) for e in got)


# -- real agents ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restarted_cfg(cfg, tmp_path, tag: str, *, join: list[str], listen: str | None = None):
    """The same state dir, another control socket, the given seeds."""
    gossip = dataclasses.replace(cfg.gossip, join=join)
    if listen is not None:
        gossip = dataclasses.replace(gossip, listen=listen)
    control = dataclasses.replace(cfg.control, socket=str(tmp_path / f"c-{tag}.sock"))
    return dataclasses.replace(cfg, gossip=gossip, control=control)


def book_of(cfg) -> list[PeerEntry]:
    try:
        return load_peer_book(cfg.state_path / PEER_BOOK_FILE)[0]
    except (OSError, PeerBookError):
        return []


def state_of(agent, name: str) -> str | None:
    return {p["name"]: p["state"] for p in agent.node.peers()}.get(name)


async def stop(agent, scope, how: str) -> None:
    if how == "left":
        agent.stop()  # what SIGTERM does: a graceful leave, then the agent ends
        with trio.fail_after(5):
            while not agent.gossip.node.membership.has_left:
                await trio.sleep(0.01)
        await trio.sleep(1.5)  # the agent finishes stopping
    else:
        scope.cancel()  # a kill: no leave


async def three(n, tmp_path, listen1: str = "127.0.0.1:0"):
    cfg1 = make_cfg(tmp_path, 1, [])
    cfg1 = dataclasses.replace(cfg1, gossip=dataclasses.replace(cfg1.gossip, listen=listen1))
    a1, s1 = await start_agent(n, cfg1)
    seed = a1.gossip.addr
    a2, _ = await start_agent(n, make_cfg(tmp_path, 2, [seed]))
    a3, _ = await start_agent(n, make_cfg(tmp_path, 3, [seed]))
    await wait_until(lambda: all(len(alive_peers(a)) == 2 for a in (a1, a2, a3)), "joined")
    return cfg1, (a1, s1), a2, a3


async def back_in_the_clan(a1, a2, a3, limit: float) -> float:
    t0 = time.monotonic()
    await wait_until(
        lambda: (
            alive_peers(a1) == {"m2", "m3"}
            and state_of(a2, "m1") == "alive"
            and state_of(a3, "m1") == "alive"
        ),
        "the founder is back",
        timeout=limit,
    )
    return time.monotonic() - t0


REJOIN_TIMES: dict[str, float] = {}


@pytest.mark.integration
@pytest.mark.parametrize("how", ["left", "dead"])
async def test_founder_restarted_with_no_seeds_rejoins_from_its_peer_book(tmp_path, how):
    with trio.fail_after(90):
        async with trio.open_nursery() as n:
            cfg1, (a1, s1), a2, a3 = await three(n, tmp_path)
            await wait_until(lambda: len(book_of(cfg1)) == 2, "peer book written", timeout=15)
            await stop(a1, s1, how)
            await wait_until(
                lambda: state_of(a2, "m1") == how and state_of(a3, "m1") == how,
                f"m1 {how}",
                timeout=30,
            )
            # Back with NO seeds (and mDNS off), on a new port.
            again = restarted_cfg(cfg1, tmp_path, "again", join=[])
            t0 = time.monotonic()
            b1, _ = await start_agent(n, again)
            assert b1.gossip.addr != a1.gossip.addr
            took = await back_in_the_clan(b1, a2, a3, PUSH_PULL + 5)
            REJOIN_TIMES[f"peer-book/{how}"] = time.monotonic() - t0
            print(f"rejoin from the peer book after {how}: {time.monotonic() - t0:.2f} s")
            assert took <= PUSH_PULL + 5
            n.cancel_scope.cancel()


@pytest.mark.integration
@pytest.mark.parametrize("how", ["left", "dead"])
async def test_founder_that_forgot_its_peers_is_found_by_their_retries(tmp_path, how):
    """No peer file, no seeds: only the peers' retries can bring it back
    (it listens on the address they knew)."""
    listen = f"127.0.0.1:{free_port()}"
    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            cfg1, (a1, s1), a2, a3 = await three(n, tmp_path, listen)
            await stop(a1, s1, how)
            await wait_until(
                lambda: state_of(a2, "m1") == how and state_of(a3, "m1") == how,
                f"m1 {how}",
                timeout=30,
            )
            marked = time.monotonic()
            (cfg1.state_path / PEER_BOOK_FILE).unlink(missing_ok=True)
            again = restarted_cfg(cfg1, tmp_path, "again", join=[], listen=listen)
            b1, _ = await start_agent(n, again)
            await back_in_the_clan(b1, a2, a3, PUSH_PULL + 10)
            took = time.monotonic() - marked
            REJOIN_TIMES[f"retries/{how}"] = took
            print(f"rejoin by the peers' retries after {how}: {took:.2f} s after the mark")
            # The first retry comes within one push-pull interval of the mark.
            assert took <= PUSH_PULL + 3
            n.cancel_scope.cancel()


@pytest.mark.integration
async def test_a_restarted_agent_without_a_peer_file_still_joins_through_its_seeds(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            cfg1, (a1, s1), a2, a3 = await three(n, tmp_path)
            await stop(a1, s1, "left")
            (cfg1.state_path / PEER_BOOK_FILE).unlink(missing_ok=True)
            (cfg1.state_path / PEER_BOOK_FILE).write_bytes(b"\x00corrupt")
            again = restarted_cfg(cfg1, tmp_path, "again", join=[a2.gossip.addr])
            t0 = time.monotonic()
            b1, _ = await start_agent(n, again)
            took = await back_in_the_clan(b1, a2, a3, 20)
            print(f"rejoin through a seed: {time.monotonic() - t0:.2f} s")
            assert b1.gossip.counters()["peer_book_skipped"] == 1
            assert took < 20
            # ... and it writes a good peer file again
            await wait_until(lambda: len(book_of(cfg1)) == 2, "peer book rewritten", timeout=15)
            n.cancel_scope.cancel()
