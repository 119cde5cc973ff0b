"""The clan map: link classification, merging both ends' views, record checks."""

from __future__ import annotations

import random
from dataclasses import replace
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

from ._memory_ports import WALL0, FakeInventory, fake_ports


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


# -- the publish cadence: fake ports on trio's virtual clock -------------------------


class FakeClan:
    """What TopologyService reads, as ports: an inventory, the membership
    (loopback RTTs that jitter), and the bus its records go out on."""

    def __init__(self, peers: int, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        keys = {f"m{i:02d}": bytes([i + 1]) * 32 for i in range(peers + 1)}
        doc = {"machines": {n: {"node_key": k} for n, k in keys.items()}}
        self.inventory = FakeInventory(SimpleNamespace(doc=doc))
        self.keys = keys
        self.ports = fake_ports(inventory=self.inventory)
        self.members = self.ports.members
        for n in keys:
            if n != "m00":
                self.members.members[node_id_of(keys[n])] = {
                    "node_id": node_id_of(keys[n]),
                    "state": "alive",
                    "addr": "127.0.0.1:7946",
                }
        # the bus signs with the identity: give it m00's public key to compare
        self.me = keys["m00"]
        self.published: list[tuple[float, dict]] = []
        self.ports.bus.subscribe(["topology"], self._heard)

    def _heard(self, rec) -> None:
        assert rec.kind == "topology" and rec.key == ""
        self.published.append((trio.current_time(), rec.body))

    def set_state(self, name: str, state: str) -> None:
        """A member changes state: the membership port tells its listeners."""
        self.members.set(node_id_of(self.keys[name]), state)

    def jitter(self) -> None:
        # Loopback RTTs between 0.3 and 3 ms: across several half-power-of-two
        # buckets from one look to the next.
        for row in self.members.members.values():
            row["rtt_ms"] = 0.3 * 10 ** self.rng.random()

    def service(self, **kw) -> TopologyService:
        ports = replace(self.ports, identity=SimpleNamespace(public_key=self.me))
        caps = [{"name": "kvm", "available": True, "reason": ""}]
        svc = TopologyService(ports, name="m00", capabilities=lambda: caps, **kw)
        real = svc.local_links

        def links():
            self.jitter()
            return real()

        svc.local_links = links
        return svc


def test_rtt_jitter_only_refreshes_and_a_link_down_goes_out_within_a_check():
    clan = FakeClan(peers=10)
    service = clan.service(rng=random.Random(7))
    down_at = 600.5

    async def main() -> None:
        with trio.fail_after(2000):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await trio.sleep(down_at)
                jitter_only = list(clan.published)
                clan.members.members[node_id_of(clan.keys["m03"])]["state"] = "dead"  # unsaid
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
        t, body = clan.published[-1]
        assert len(clan.published) == len(jitter_only) + 1
        assert down_at < t <= down_at + CHECK_INTERVAL
        assert {link["peer"]: link["kind"] for link in body["links"]}["m03"] == "down"

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_link_down_is_republished_through_the_bus_at_once_and_jitter_is_not():
    """Through the ports alone: membership says m02 failed, and the new view is
    on the bus with no wait for the next check; RTT jitter inside one bucket
    (1.0 -> 1.3 ms) changes nothing on the bus."""
    clan = FakeClan(peers=3)
    ports = replace(clan.ports, identity=SimpleNamespace(public_key=clan.me))
    for row in clan.members.members.values():
        row["rtt_ms"] = 1.0
    service = TopologyService(ports, name="m00", rng=random.Random(5))

    async def main() -> None:
        with trio.fail_after(100):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await trio.sleep(30.0)
                assert len(clan.published) == 1
                first_t, first = clan.published[0]
                assert first_t == 0.0
                assert {link["peer"]: link["rtt_ms"] for link in first["links"]} == {
                    "m01": 1.0,
                    "m02": 1.0,
                    "m03": 1.0,
                }
                for row in clan.members.members.values():
                    row["rtt_ms"] = 1.3  # the same half-power-of-two bucket as 1.0
                await trio.sleep(60.0)
                assert len(clan.published) == 1  # jitter: nothing on the bus
                assert _bucket(1.3) == _bucket(1.0)
                down_at = trio.current_time() + 0.25
                await trio.sleep(0.25)
                clan.set_state("m02", "dead")
                await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
        t, body = clan.published[-1]
        assert len(clan.published) == 2 and t == down_at  # woken: not at the next check
        assert {link["peer"]: link["kind"] for link in body["links"]} == {
            "m01": "lan",
            "m02": "down",
            "m03": "lan",
        }
        rec = clan.ports.store.get(clan.ports.identity.public_key, "topology", "")
        assert rec is not None and rec.body == body  # what the bus stored
        assert body["at"] == int(WALL0 + down_at)  # the wall clock port, not time.time()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_change_waits_for_min_interval_then_goes_at_once():
    clan = FakeClan(peers=3)
    service = clan.service(rng=random.Random(3))

    async def main() -> None:
        with trio.fail_after(100):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await trio.sleep(10.0)
                clan.set_state("m01", "dead")  # seen at once: published at once
                await trio.sleep(0.5)
                clan.set_state("m02", "dead")  # seen at once, held for min_interval
                await trio.sleep(10.0)
                nursery.cancel_scope.cancel()
        times = [t for t, _ in clan.published]
        assert len(times) == 3, times
        assert times[1] == 10.0
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

    clan = FakeClan(peers=20)
    calls = []
    real = clanagent.identity.node_id_of
    monkeypatch.setattr(
        clanagent.identity, "node_id_of", lambda key: calls.append(key) or real(key)
    )
    service = clan.service(rng=random.Random(1))
    for _ in range(50):
        links = service.local_links()
    assert len(links) == 20 and all(link["kind"] == "lan" for link in links)
    assert len(calls) <= 21  # once per machine, not once per machine per look
    doc = clan.inventory.inventory.doc
    clan.inventory.set(SimpleNamespace(doc={"machines": dict(doc["machines"])}))
    clan.set_state("m05", "dead")
    links = service.local_links()
    assert len(calls) <= 42
    assert {link["peer"]: link["kind"] for link in links}["m05"] == "down"


def test_the_mesh_path_kind_wins_over_the_gossip_address():
    clan = FakeClan(peers=2)
    kinds = {clan.keys["m01"]: "tor", clan.keys["m02"]: None}
    service = clan.service(path_kind=kinds.get)
    assert {link["peer"]: link["kind"] for link in service.local_links()} == {
        "m01": "tor",
        "m02": "lan",  # no current path: the gossip address says
    }


def test_the_view_reads_peers_topology_records_of_that_kind_only():
    """view(): machines and VMs from the callables, peers' links from their
    topology records in the store (by kind), the clan name from the anchor."""
    from clanagent.identity import Identity
    from clanagent.wire import SignedRecord

    peer = Identity.generate()
    keys = {"m00": b"\x01" * 32, "m01": peer.public_key}
    doc = {"machines": {n: {"node_key": k} for n, k in keys.items()}}
    inventory = FakeInventory(SimpleNamespace(doc=doc), anchor=SimpleNamespace(name="home"))
    ports = fake_ports(inventory=inventory)
    ports = replace(ports, identity=SimpleNamespace(public_key=keys["m00"]))
    wall = int(ports.clock.wall())
    body = {"at": wall, "links": [{"peer": "m00", "kind": "public", "rtt_ms": 9.0}]}
    ports.bus.deliver(SignedRecord.create(peer, "topology", "", 1, {**body, "capabilities": []}))
    ports.bus.deliver(SignedRecord.create(peer, "endpoints", "", 2, {"not": "topology"}))
    rows = [
        {"name": n, "node_id": n, "tags": [], "state": "alive", "online": True, "services": []}
        for n in keys
    ]
    vms = [{"vm": "web", "machine": "m01", "state": "running", "reason": "", "accel": "kvm"}]
    service = TopologyService(ports, name="me", machines=lambda: rows, vms=lambda: vms)
    view = service.view()
    assert view["self"] == "m00" and view["clan"] == {"name": "home"}
    assert [(e["a"], e["b"], e["kind"]) for e in view["links"]] == [("m00", "m01", "public")]
    by_name = {m["name"]: m for m in view["machines"]}
    assert by_name["m01"]["vms"][0]["vm"] == "web" and by_name["m01"]["reported_at"] == wall
    assert service.counters()["bad_records"] == 0
