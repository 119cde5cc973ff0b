"""The clan map: link classification, merging both ends' views, record checks."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from clanagent.identity import node_id_of
from clanagent.publish_policy import MIN_JITTER, PublishPolicy
from clanagent.topology import (
    CHECK_INTERVAL,
    MIN_INTERVAL,
    REFRESH,
    TopologyService,
    _bucket,
    _parse_body,
    classify_addr,
    coarse_rtt,
    merge_links,
)


@pytest.mark.parametrize(
    "addr, kind",
    [
        ("127.0.0.1:7946", "lan"),
        ("10.1.2.3:7946", "lan"),
        ("[fe80::1]:7946", "lan"),
        ("[fd00::1]:7946", "lan"),
        ("8.8.8.8:7946", "public"),
        ("[2001:4860::8888]:7946", "public"),
        ("abcdefghijklmnop.onion:7946", "tor"),
        ("host.example:7946", "other"),
        ("", "other"),
    ],
)
def test_addresses_are_classified(addr, kind):
    assert classify_addr(addr) == kind


def link(peer, kind, rtt=1.0):
    return {"peer": peer, "kind": kind, "rtt_ms": rtt}


def test_one_edge_per_pair_up_when_either_end_sees_it():
    views = {
        "a": [link("b", "lan", 0.5), link("c", "down", None)],
        "b": [link("a", "lan", 0.7), link("c", "tor", 300.0)],
        "c": [link("a", "public", 20.0), link("b", "tor", 310.0)],
    }
    edges = merge_links(views, {"a", "b", "c"})
    assert [(e["a"], e["b"], e["kind"], e["rtt_ms"]) for e in edges] == [
        ("a", "b", "lan", 0.5),
        ("a", "c", "public", 20.0),  # a's session is down, c reaches a
        ("b", "c", "tor", 300.0),
    ]
    assert edges[1]["seen_by"]["a"]["kind"] == "down"


def test_an_offline_machine_has_only_down_links():
    views = {"a": [link("b", "lan")], "b": [link("a", "lan")]}
    assert merge_links(views, {"a"})[0]["kind"] == "down"
    assert merge_links({"a": [link("a", "lan")]}, {"a"}) == []  # no self loops


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"links": [], "capabilities": []},
        {"at": "1", "links": [], "capabilities": []},
        {"at": 1, "links": [{"peer": "b", "kind": "wormhole", "rtt_ms": 1}], "capabilities": []},
        {"at": 1, "links": [{"peer": 5, "kind": "lan"}], "capabilities": []},
        {"at": 1, "links": ["x"], "capabilities": []},
    ],
)
def test_malformed_records_are_ignored(body):
    assert _parse_body(body) is None


def test_records_are_cleaned():
    body = {
        "at": 5,
        "links": [{"peer": "b", "kind": "lan", "rtt_ms": -3}],
        "capabilities": [
            {"name": "kvm", "available": True, "reason": "x" * 1000},
            {"name": 3, "available": True},
        ],
    }
    parsed = _parse_body(body)
    assert parsed["links"] == [{"peer": "b", "kind": "lan", "rtt_ms": None}]
    assert len(parsed["capabilities"]) == 1 and len(parsed["capabilities"][0]["reason"]) == 300


def test_rtt_jitter_does_not_republish():
    assert _bucket(1.0) == _bucket(1.1)
    assert _bucket(1.0) != _bucket(4.0)
    a = {"links": [link("b", "lan", 1.0)], "capabilities": []}
    b = {"links": [link("b", "lan", 1.1)], "capabilities": []}
    c = {"links": [link("b", "down", None)], "capabilities": []}
    assert TopologyService._shape(a) == TopologyService._shape(b) != TopologyService._shape(c)


# -- the publish cadence: a fake agent on trio's virtual clock -----------------------


class FakeClanAgent:
    """What TopologyService reads: inventory, identity, gossip members, status."""

    def __init__(self, peers: int, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        keys = {f"m{i:02d}": bytes([i + 1]) * 32 for i in range(peers + 1)}
        doc = {"machines": {n: {"node_key": k} for n, k in keys.items()}}
        self.inventory = SimpleNamespace(inventory=SimpleNamespace(doc=doc))
        self.identity = SimpleNamespace(public_key=keys["m00"])
        self.state = {n: "alive" for n in keys if n != "m00"}
        self.keys = keys
        self.mesh = None
        self.gossip = SimpleNamespace(node=SimpleNamespace(members=self.members))
        self.published: list[tuple[float, dict]] = []

    def members(self) -> list[dict]:
        # Loopback RTTs that jitter between 0.3 and 3 ms: across several
        # half-power-of-two buckets from one look to the next.
        return [
            {
                "node_id": node_id_of(self.keys[n]),
                "state": st,
                "addr": "127.0.0.1:7946",
                "rtt_ms": 0.3 * 10 ** self.rng.random(),
            }
            for n, st in self.state.items()
        ]

    def status(self) -> dict:
        return {"capabilities": [{"name": "kvm", "available": True, "reason": ""}]}

    async def publish_record(self, kind: str, key: str, body: dict) -> None:
        assert kind == "topology" and key == ""
        self.published.append((trio.current_time(), body))


def test_rtt_jitter_only_refreshes_and_a_link_down_goes_out_within_a_check():
    agent = FakeClanAgent(peers=10)
    service = TopologyService(agent, rng=random.Random(7))
    down_at = 600.5

    async def main() -> None:
        with trio.fail_after(2000):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await trio.sleep(down_at)
                jitter_only = list(agent.published)
                agent.state["m03"] = "dead"
                await trio.sleep(CHECK_INTERVAL + 0.01)
                nursery.cancel_scope.cancel()
        # ten minutes of jitter: the first view and the periodic refreshes, no more
        times = [t for t, _ in jitter_only]
        assert 2 <= len(times) <= 1 + down_at // (REFRESH * 0.9)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(REFRESH * 0.9 <= g <= REFRESH + CHECK_INTERVAL for g in gaps), gaps
        # the RTTs published are coarse (a bucket's lower bound)
        for _, body in jitter_only:
            for link in body["links"]:
                assert link["kind"] == "lan" and link["rtt_ms"] == coarse_rtt(link["rtt_ms"])
        # the link going down is out within one check interval
        t, body = agent.published[-1]
        assert len(agent.published) == len(jitter_only) + 1
        assert down_at < t <= down_at + CHECK_INTERVAL
        assert {link["peer"]: link["kind"] for link in body["links"]}["m03"] == "down"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_change_waits_for_min_interval_then_goes_at_once():
    agent = FakeClanAgent(peers=3)
    service = TopologyService(agent, rng=random.Random(3))

    async def main() -> None:
        with trio.fail_after(100):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await trio.sleep(10.0)
                agent.state["m01"] = "dead"  # seen at the next look
                await trio.sleep(CHECK_INTERVAL)
                agent.state["m02"] = "dead"
                service.wake()  # seen at once, held for min_interval
                await trio.sleep(10.0)
                nursery.cancel_scope.cancel()
        times = [t for t, _ in agent.published]
        assert len(times) == 3, times
        assert times[2] - times[1] >= MIN_INTERVAL
        assert times[2] - times[1] <= MIN_INTERVAL * (1 + MIN_JITTER) + 1e-6
        assert service.counters()["held"] >= 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_publish_policy():
    p = PublishPolicy(min_interval=2.0, refresh=300.0, rng=random.Random(1))
    assert p.due(0.0, "a")
    p.published(0.0, "a")
    assert not p.due(1.0, "a") and p.hold_until is None
    assert not p.due(1.0, "b") and 2.0 <= p.hold_until <= 2.5
    assert p.due(p.hold_until, "b")
    assert not p.due(269.0, "a")  # unchanged: only the refresh
    assert p.due(300.0, "a")
    p.published(300.0, "a")
    assert 300.0 + 270.0 <= p.next_refresh <= 600.0
    one_shot = PublishPolicy(min_interval=1.0, refresh=None, rng=random.Random(1))
    one_shot.published(0.0, "a")
    assert not one_shot.due(1e9, "a") and one_shot.due(1e9, "b")


def test_node_ids_are_hashed_once_per_inventory(monkeypatch):
    import clanagent.identity

    calls = []
    real = clanagent.identity.node_id_of
    monkeypatch.setattr(
        clanagent.identity, "node_id_of", lambda key: calls.append(key) or real(key)
    )
    agent = FakeClanAgent(peers=20)
    service = TopologyService(agent, rng=random.Random(1))
    for _ in range(50):
        links = service.local_links()
    assert len(links) == 20 and all(link["kind"] == "lan" for link in links)
    assert len(calls) <= 21  # once per machine, not once per machine per look
    doc = agent.inventory.inventory.doc
    agent.inventory.inventory = SimpleNamespace(doc={"machines": dict(doc["machines"])})
    agent.state["m05"] = "dead"
    links = service.local_links()
    assert len(calls) <= 42
    assert {link["peer"]: link["kind"] for link in links}["m05"] == "down"
