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
    MAX_REFRESH,
    MIN_INTERVAL,
    REFRESH,
    STALE,
    TopologyService,
    _bucket,
    check_interval_for,
    classify_addr,
    compact_links,
    expand_links,
    merge_links,
    min_interval_for,
    parse_body,
    refresh_for,
)
from clanagent.wire import WireError, pack

from ._fake_ports import WALL0, FakeInventory, fake_ports


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


def test_the_viewers_own_rtt_shows_on_an_edge_the_far_end_reports():
    views = {"a": [link("b", "lan", None)], "b": [link("a", "lan", 0.4)]}
    [edge] = merge_links(views, {"a", "b"})
    assert (edge["kind"], edge["rtt_ms"]) == ("lan", 0.4)


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"kind": "lan", "links": [], "capabilities": []},
        {"at": "1", "kind": "lan", "links": [], "capabilities": []},
        {"at": 1, "kind": "wormhole", "links": [], "capabilities": []},
        {"at": 1, "kind": "lan", "links": [{"peer": "b", "kind": "wormhole"}], "capabilities": []},
        {"at": 1, "kind": "lan", "links": [{"peer": "b", "kind": "down"}], "capabilities": []},
        {"at": 1, "kind": "lan", "links": [{"peer": 5, "kind": "tor"}], "capabilities": []},
        {"at": 1, "kind": "lan", "links": [{"peer": "", "kind": "tor"}], "capabilities": []},
        {"at": 1, "kind": "lan", "links": ["x"], "capabilities": []},
        {"at": -1, "kind": "lan", "links": [], "capabilities": []},
        {"at": 1, "kind": "lan", "links": [], "capabilities": [{"name": 3, "available": True}]},
        {
            "at": 1,
            "kind": "lan",
            "links": [],
            "capabilities": [{"name": "kvm", "available": True, "reason": "x" * 301}],
        },
        # the old shape, with RTTs and every link
        {"at": 1, "links": [{"peer": "b", "kind": "lan", "rtt_ms": 1.0}], "capabilities": []},
    ],
)
def test_malformed_records_are_refused_with_the_field_named(body):
    with pytest.raises(WireError, match="body"):
        parse_body(body)


def test_a_uniform_clans_view_is_the_same_few_bytes_at_any_size():
    """Only what membership cannot tell goes out: the usual kind and the
    links of another kind. Down links and RTTs stay home."""

    def body_of(n: int, tor: int = 0, down: int = 0) -> bytes:
        links = [link(f"m{i:04d}", "lan", 0.5) for i in range(n)]
        for i in range(tor):
            links[i]["kind"] = "tor"
        for i in range(tor, tor + down):
            links[i] = link(f"m{i:04d}", "down", None)
        default, exceptions = compact_links(links)
        return pack({"at": 1, "kind": default, "links": exceptions, "capabilities": []})

    assert len(body_of(10)) == len(body_of(1000)) == len(body_of(1000, down=400)) < 60
    assert len(body_of(1000, tor=3)) < 150  # three exceptions
    default, exceptions = compact_links([link("a", "tor"), link("b", "lan"), link("c", "tor")])
    assert default == "tor" and exceptions == [{"peer": "b", "kind": "lan"}]
    assert compact_links([link("a", "down", None)]) == ("", [])


def test_a_peers_view_expands_to_every_machine_with_its_exceptions():
    machines = ["a", "b", "c", "d"]
    rows = expand_links("lan", [{"peer": "c", "kind": "tor"}], "b", machines)
    assert [(r["peer"], r["kind"], r["rtt_ms"]) for r in rows] == [
        ("a", "lan", None),
        ("c", "tor", None),
        ("d", "lan", None),
    ]
    assert expand_links("", [], "b", machines) == []  # no up link: says nothing
    # merged with membership: a machine the viewer sees offline is down
    views = {"b": rows}
    edges = {(e["a"], e["b"]): e["kind"] for e in merge_links(views, {"a", "b", "c"})}
    assert edges == {("a", "b"): "lan", ("b", "c"): "tor", ("b", "d"): "down"}


def test_rtt_jitter_and_deaths_do_not_change_the_shape():
    assert _bucket(1.0) == _bucket(1.1)
    assert _bucket(1.0) != _bucket(4.0)

    def shape(links):
        default, exceptions = compact_links(links)
        body = {"kind": default, "links": exceptions, "capabilities": []}
        return TopologyService._shape(body)

    a = [link("b", "lan", 1.0), link("c", "lan", 1.0)]
    b = [link("b", "lan", 3.0), link("c", "lan", 1.1)]
    c = [link("b", "lan", 1.0), link("c", "down", None)]
    d = [link("b", "lan", 1.0), link("c", "tor", 1.0)]
    assert shape(a) == shape(b) == shape(c) != shape(d)


def test_the_refresh_stretches_with_the_clan_so_its_total_rate_stays_bounded():
    assert refresh_for(3) == REFRESH == 300.0
    assert refresh_for(100) == 1000.0 and refresh_for(1000) == MAX_REFRESH == 10_000.0
    assert refresh_for(10_000) == MAX_REFRESH  # beyond the target: capped
    for n in (3, 10, 30, 100, 300, 1000):
        assert n / refresh_for(n) <= 0.1  # unchanged views a second, clan-wide
        assert refresh_for(n) <= STALE / 3  # three refreshes fit in the TTL


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


def test_jitter_and_deaths_only_refresh_and_a_path_kind_change_goes_out_within_a_check():
    clan = FakeClan(peers=10)
    kinds: dict[bytes, str] = {}
    service = clan.service(rng=random.Random(7), path_kind=kinds.get)
    down_at = 600.5

    async def main() -> None:
        with trio.fail_after(2000):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await trio.sleep(down_at)
                clan.set_state("m03", "dead")  # membership tells every reader
                await trio.sleep(10 * CHECK_INTERVAL)
                quiet = list(clan.published)
                kinds[clan.keys["m04"]] = "tor"  # the mesh moved to Tor: unsaid
                changed_at = trio.current_time()
                await trio.sleep(CHECK_INTERVAL + 0.01)
                nursery.cancel_scope.cancel()
        # ten minutes of jitter and a death: the first view and the refreshes, no more
        times = [t for t, _ in quiet]
        assert 2 <= len(times) <= 1 + (down_at + 10 * CHECK_INTERVAL) // (REFRESH * 0.9)
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert all(REFRESH * 0.9 <= g <= REFRESH + CHECK_INTERVAL for g in gaps), gaps
        for _, body in quiet:
            assert body["kind"] == "lan" and body["links"] == []  # no RTT, no down link
        # the refreshes only renew the TTL: anti-entropy carries them, no push
        unpushed = clan.ports.bus.unpushed
        assert len(unpushed) == len(quiet) - 1 >= 1
        assert all(rec.body == body for rec, (_, body) in zip(unpushed, quiet[1:], strict=True))
        # the path kind change is out within one check interval, pushed
        t, body = clan.published[-1]
        assert len(clan.published) == len(quiet) + 1
        assert len(clan.ports.bus.unpushed) == len(unpushed)
        assert changed_at <= t <= changed_at + CHECK_INTERVAL
        assert body["kind"] == "lan" and body["links"] == [{"peer": "m04", "kind": "tor"}]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_changed_exception_goes_through_the_bus_at_once_and_jitter_is_not():
    """Through the ports alone: m02 (reached over Tor, unlike the rest) fails,
    and the new view is on the bus with no wait for the next check; RTT
    jitter and the death of a machine of the usual kind change nothing."""
    clan = FakeClan(peers=3)
    ports = replace(clan.ports, identity=SimpleNamespace(public_key=clan.me))
    for row in clan.members.members.values():
        row["rtt_ms"] = 1.0
    kinds = {clan.keys["m02"]: "tor"}
    service = TopologyService(ports, name="m00", rng=random.Random(5), path_kind=kinds.get)

    async def main() -> None:
        with trio.fail_after(100):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await trio.sleep(30.0)
                assert len(clan.published) == 1
                first_t, first = clan.published[0]
                assert first_t == 0.0
                assert first["kind"] == "lan"
                assert first["links"] == [{"peer": "m02", "kind": "tor"}]
                for row in clan.members.members.values():
                    row["rtt_ms"] = 7.0
                clan.set_state("m01", "dead")
                await trio.sleep(60.0)
                assert len(clan.published) == 1  # jitter and m01: nothing on the bus
                down_at = trio.current_time() + 0.25
                await trio.sleep(0.25)
                clan.set_state("m02", "dead")
                await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
        t, body = clan.published[-1]
        assert len(clan.published) == 2 and t == down_at  # woken: not at the next check
        assert body["kind"] == "lan" and body["links"] == []
        rec = clan.ports.store.get(clan.ports.identity.public_key, "topology", "")
        assert rec is not None and rec.body == body  # what the bus stored
        assert body["at"] == int(WALL0 + down_at)  # the wall clock port, not time.time()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_change_waits_for_min_interval_then_goes_at_once():
    clan = FakeClan(peers=3)
    kinds = {clan.keys["m01"]: "tor", clan.keys["m02"]: "tor"}
    service = clan.service(rng=random.Random(3), path_kind=kinds.get)

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
        bodies = [(b["kind"], b["links"]) for _, b in clan.published]
        assert bodies == [
            ("tor", [{"peer": "m03", "kind": "lan"}]),
            ("lan", [{"peer": "m02", "kind": "tor"}]),  # a tie goes to lan
            ("lan", []),
        ]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_min_interval_grows_with_the_clan_so_its_total_rate_does_not():
    assert min_interval_for(4) == MIN_INTERVAL
    assert min_interval_for(100) == 50.0 and min_interval_for(1000) == 500.0
    for n in (10, 100, 1000):
        assert n / min_interval_for(n) <= 2.0  # clan-wide topology records a second
    clan = FakeClan(peers=99)  # a clan of 100 machines
    kinds = {clan.keys["m01"]: "tor", clan.keys["m02"]: "tor"}
    service = clan.service(rng=random.Random(3), path_kind=kinds.get)

    async def main() -> None:
        with trio.fail_after(500):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await trio.sleep(10.0)
                clan.set_state("m01", "dead")  # held: 50 s after the first view
                await trio.sleep(0.5)
                clan.set_state("m02", "dead")  # joins the held change
                await trio.sleep(100.0)
                nursery.cancel_scope.cancel()
        times = [t for t, _ in clan.published]
        assert len(times) == 2, times  # two changes, one publication
        assert 50.0 <= times[1] - times[0] <= 50.0 * (1 + MIN_JITTER) + 1e-6
        assert len(clan.published[0][1]["links"]) == 2 and clan.published[1][1]["links"] == []

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_big_clan_looks_at_its_links_less_often_than_a_small_one():
    # a look costs O(machines); a change cannot go out sooner than the min
    # interval anyway, so the looks are a tenth of it (3 s at least)
    assert check_interval_for(4) == CHECK_INTERVAL
    assert check_interval_for(100) == 5.0 and check_interval_for(1000) == 50.0
    clan = FakeClan(peers=99)
    service = clan.service(rng=random.Random(5))
    looks = []
    real = service.local_links

    def counted():
        looks.append(trio.current_time())
        return real()

    service.local_links = counted

    async def main() -> None:
        with trio.fail_after(500):
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                await trio.sleep(100.0)
                clan.set_state("m01", "dead")  # a member change wakes it at once
                await trio.sleep(0.01)
                assert looks[-1] >= 100.0
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    # 100 s every 5 s, plus the first look and the wake: not every 3 s (35)
    assert 20 <= len(looks) <= 23, len(looks)


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


def test_punched_and_relayed_paths_show_as_their_own_kinds():
    from clanagent.topology import parse_body

    clan = FakeClan(peers=3)
    kinds = {clan.keys["m01"]: "reflexive", clan.keys["m02"]: "relay", clan.keys["m03"]: "relay"}
    service = clan.service(path_kind=kinds.get)
    assert {link["peer"]: link["kind"] for link in service.local_links()} == {
        "m01": "reflexive",
        "m02": "relay",
        "m03": "relay",
    }
    body = service._body()
    assert body["kind"] == "relay" and body["links"] == [{"peer": "m01", "kind": "reflexive"}]
    assert parse_body(body).kind == "relay"  # a valid record for every reader


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
    body = {"at": wall, "kind": "lan", "links": [{"peer": "m00", "kind": "public"}]}
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
