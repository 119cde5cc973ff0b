"""The mesh service on its ports alone (DESIGN rule 7): fake clock, store,
bus, membership and inventory, a fake WireGuard backend -- no agent, no
sockets, no interface.  Its clocks stay apart: WireGuard handshakes are
compared with the wall clock, path state runs on the monotonic one."""

from __future__ import annotations

import random
from pathlib import Path

from clanagent.config import MeshSection
from clanagent.identity import node_id_of
from clanagent.inventory.anchor import Anchor
from clanagent.inventory.select import placement
from clanagent.mesh import candidates as cands
from clanagent.mesh.nat import NAT_KIND
from clanagent.mesh.overlay import vm_ip6
from clanagent.mesh.paths import PathSelector
from clanagent.mesh.service import (
    HANDSHAKE_GRACE,
    GossipEndpoint,
    MeshService,
    explain_path,
)
from clanagent.mesh.vmroutes import VM_STATUS_KIND
from clanagent.mesh.wireguard import Device, PeerConfig, PeerStatus
from clanagent.ports import Ports, Subscriptions
from clanagent.wire import SignedRecord
from tests._mesh_inventory import identities, make_inventory

# Far apart on purpose: mixing them up makes every handshake look ancient
# (or from the future) and every backoff absurd.
NOW, WALL = 1000.0, 1_700_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.t, self.w = NOW, WALL

    def now(self) -> float:
        return self.t

    def wall(self) -> float:
        return self.w


class FakeStore:
    def __init__(self) -> None:
        self.recs: dict[tuple[bytes, str, str], SignedRecord] = {}

    def get(self, origin, kind, key):
        return self.recs.get((origin, kind, key))

    def of_kind(self, kind):
        return [r for (_, k, _), r in self.recs.items() if k == kind]


class FakeBus:
    def __init__(self, accept: bool = True) -> None:
        self.subscriptions = Subscriptions()
        self.published: list[tuple[str, str, object]] = []
        self.accept = accept

    async def publish(self, kind, key, body, push=True):
        self.published.append((kind, key, body))
        return self.accept

    def subscribe(self, kinds, handler):
        self.subscriptions.subscribe(kinds, handler)


class FakeMembers:
    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.rtt_ms: dict[str, float] = {}

    def state(self, node_id):
        return self.states.get(node_id)

    def rows(self):
        return [
            {"node_id": n, "state": s, "rtt_ms": self.rtt_ms.get(n)} for n, s in self.states.items()
        ]

    def synced(self):
        return True

    def subscribe(self, handler):
        pass


class FakeInventoryView:
    def __init__(self, inv) -> None:
        self.inventory = inv
        self.anchor = Anchor(inv.clan_id, "home", ())
        self.handlers: list = []

    def subscribe(self, handler):
        self.handlers.append(handler)


class FakeEvents:
    def publish(self, topic, **fields):
        pass


class FakeBackend:
    kind, name = "fake", "clan0"

    def __init__(self) -> None:
        self.peers: dict[bytes, PeerConfig] = {}
        self.status: dict[bytes, PeerStatus] = {}
        self.applied = 0

    async def get(self) -> Device:
        return Device(None, 51820, dict(self.peers), dict(self.status))

    async def apply(self, diff) -> None:
        self.applied += 1
        for key in diff.remove:
            self.peers.pop(key, None)
        for p in diff.add:
            self.peers[p.public_key] = p
        for u in diff.update:
            old = self.peers[u.public_key]
            self.peers[u.public_key] = PeerConfig(
                u.public_key,
                u.endpoint if u.endpoint is not None else old.endpoint,
                u.allowed_ips if u.allowed_ips is not None else old.allowed_ips,
                old.keepalive if u.keepalive is None else u.keepalive,
            )


class World:
    def __init__(self, accept: bool = True) -> None:
        self.idents = identities()
        self.inv = make_inventory(self.idents)
        self.clock, self.store, self.bus = FakeClock(), FakeStore(), FakeBus(accept)
        self.members, self.view = FakeMembers(), FakeInventoryView(self.inv)
        self.ports = Ports(
            clock=self.clock,
            identity=self.idents["beta"],
            store=self.store,
            bus=self.bus,
            members=self.members,
            inventory=self.view,
            events=FakeEvents(),
        )
        self.seeds: list[str] = []

    def wg(self, name: str) -> bytes:
        return self.inv.doc["machines"][name]["wg_key"]

    def record(self, name: str, kind: str, key: str, body) -> SignedRecord:
        rec = SignedRecord.create(self.idents[name], kind, key, 1, body, clan=self.inv.clan_id)
        self.store.recs[(rec.origin, kind, key)] = rec
        return rec

    def service(self, tmp_path: Path, **kw) -> MeshService:
        return MeshService(
            self.ports,
            cfg=MeshSection(mdns=False),
            state_path=tmp_path,
            gossip_endpoint=GossipEndpoint(lambda: ("10.9.9.9", 7946), self.seeds.append),
            **kw,
        )


def _running(w: World) -> MeshService:
    svc = w.service(Path("/nonexistent"))
    svc.backend = FakeBackend()
    svc.selector = PathSelector(True, random.Random(0))
    return svc


async def test_records_and_inventory_reach_the_mesh_through_subscriptions(tmp_path):
    w = World()
    svc = w.service(tmp_path)
    assert w.bus.subscriptions.kinds() == {cands.ENDPOINTS_KIND, VM_STATUS_KIND, NAT_KIND}
    assert len(w.view.handlers) == 1
    w.bus.subscriptions.dispatch(
        w.record("alpha", cands.ENDPOINTS_KIND, "", cands.endpoints_body(["10.0.0.1:7946"], [], 1))
    )
    assert svc._wakeup.is_set()
    svc._wakeup = type(svc._wakeup)()
    w.view.handlers[0](w.inv)  # a new inventory head
    assert svc._wakeup.is_set()
    shown = svc.explain("alpha")
    assert {p["address"] for p in shown["paths"]} >= {"10.0.0.1:7946", "198.51.100.7:7946"}
    # A LAN sighting goes to gossip once per new address.
    key = w.idents["gamma"].public_key
    svc.on_lan_candidate(key, "10.0.0.3:7946")
    svc.on_lan_candidate(key, "10.0.0.3:7946")
    assert w.seeds == ["10.0.0.3:7946"]


async def test_reconcile_configures_peers_and_judges_handshakes_on_the_right_clock():
    w = World()
    svc = _running(w)
    for name, lan, port in (("alpha", "10.0.0.1:7946", 51820), ("gamma", "10.0.0.3:7946", 51821)):
        svc.on_record(
            w.record(name, cands.ENDPOINTS_KIND, "", cands.endpoints_body([lan], [], port))
        )
    w.members.states = {node_id_of(w.idents[n].public_key): "alive" for n in ("alpha", "gamma")}
    w.members.rtt_ms = {node_id_of(w.idents["alpha"].public_key): 7.0}
    backend = svc.backend
    await svc.reconcile_once()
    assert backend.peers[w.wg("alpha")].endpoint == "10.0.0.1:51820"
    assert backend.peers[w.wg("gamma")].endpoint == "10.0.0.3:51821"
    assert backend.peers[w.wg("delta")].endpoint is None
    # alpha answered 5 s ago (WireGuard says so in epoch seconds); gamma's
    # last handshake is older than WireGuard's rekey time: a dead path.
    backend.status[w.wg("alpha")] = PeerStatus(last_handshake=w.clock.wall() - 5)
    backend.status[w.wg("gamma")] = PeerStatus(last_handshake=w.clock.wall() - 500)
    w.clock.t += HANDSHAKE_GRACE + 1
    w.clock.w += HANDSHAKE_GRACE + 1
    await svc.reconcile_once()
    alpha = svc.explain("alpha")
    assert alpha["handshake"] is True
    (lan,) = [p for p in alpha["paths"] if p["address"] == "10.0.0.1:7946"]
    assert lan["rtt_ms"] == 7.0 and lan["failures"] == 0  # the membership's RTT
    (gamma,) = [p for p in svc.explain("gamma")["paths"] if p["address"] == "10.0.0.3:7946"]
    # backed off for seconds on the monotonic clock, not until some epoch
    assert gamma["failures"] == 1 and 0 < gamma["retry_in"] <= 60
    assert svc.explain("gamma")["handshake"] is False


async def test_a_dead_host_loses_its_vm_route():
    w = World()
    svc = _running(w)
    host = placement(w.inv.doc, "web")[0]
    addr = str(vm_ip6(w.inv.clan_id, "web"))
    w.record(host, VM_STATUS_KIND, "web", {"vm": "web", "state": "running", "overlay": addr})
    await svc.reconcile_once()
    assert f"{addr}/128" in svc.backend.peers[w.wg(host)].allowed_ips
    w.members.states = {node_id_of(w.idents[host].public_key): "dead"}
    await svc.reconcile_once()
    assert f"{addr}/128" not in svc.backend.peers[w.wg(host)].allowed_ips


async def test_endpoints_are_published_on_the_bus_and_again_after_a_refusal():
    w = World(accept=False)
    svc = _running(w)
    await svc._publish_endpoints()
    await svc._publish_endpoints()  # refused by our own check: tried again
    assert len(w.bus.published) == 2
    kind, key, body = w.bus.published[0]
    assert (kind, key) == (cands.ENDPOINTS_KIND, "")
    assert body["lan"] == ["10.9.9.9:7946"] and body["wg_port"] == 51820
    w.bus.accept = True
    await svc._publish_endpoints()
    await svc._publish_endpoints()  # unchanged: not republished
    assert len(w.bus.published) == 3


def test_explain_path_without_a_running_mesh_reads_the_store():
    w = World()
    w.record("alpha", cands.ENDPOINTS_KIND, "", cands.endpoints_body(["10.0.0.1:7946"], [], 1))
    shown = explain_path(w.ports, machine="alpha", inventory_endpoints=dict)
    assert shown["wireguard"] is False and shown["handshake"] is False
    assert shown["chosen"] == {"kind": "lan", "address": "10.0.0.1:7946"}
    assert not w.bus.subscriptions.kinds()  # a view subscribes to nothing


async def test_a_peer_heard_only_at_its_nat_mapping_shows_that_path():
    """On a public member, a machine behind a NAT has no path of ours, yet
    WireGuard talks to it at the address its packets came from: `clanctl
    path` and the map show that path (reflexive, learnt), not "none"."""
    w = World()
    svc = _running(w)
    await svc.reconcile_once()
    delta = w.idents["delta"].public_key
    assert svc.explain("delta")["chosen"] is None and svc.path_kind(delta) is None
    # delta's handshake arrived from its NAT's public address
    peer = svc.backend.peers[w.wg("delta")]
    svc.backend.peers[w.wg("delta")] = PeerConfig(
        peer.public_key, "203.0.113.9:40000", peer.allowed_ips, peer.keepalive
    )
    svc.backend.status[w.wg("delta")] = PeerStatus(last_handshake=w.clock.wall() - 20, rx_bytes=148)
    await svc.reconcile_once()
    shown = svc.explain("delta")
    assert shown["chosen"] == {"kind": "reflexive", "address": "203.0.113.9:40000", "learnt": True}
    assert shown["reason"].startswith("learnt from the peer's packets")
    assert shown["paths"][0]["sources"] == ["wireguard"] and shown["paths"][0]["chosen"]
    assert svc.path_kind(delta) == "reflexive"
    # nothing heard for a minute (a session whose handshake is still recent,
    # e.g. through a relay that stopped): no path
    w.clock.t += 61
    w.clock.w += 61
    await svc.reconcile_once()
    assert svc.explain("delta")["chosen"] is None and svc.path_kind(delta) is None
    # heard again: the path is back; but not at another member's host (a relay's port)
    svc.backend.status[w.wg("delta")] = PeerStatus(last_handshake=w.clock.wall(), rx_bytes=296)
    await svc.reconcile_once()
    assert svc.path_kind(delta) == "reflexive"
    svc.backend.peers[w.wg("delta")] = PeerConfig(
        peer.public_key, "198.51.100.7:40001", peer.allowed_ips, peer.keepalive
    )
    await svc.reconcile_once()
    assert svc.explain("delta")["chosen"] is None and svc.path_kind(delta) is None
    # a session at a candidate's host is that candidate's, judged by the
    # selector (a relay that stopped, a LAN path that failed): not shown
    gamma = w.idents["gamma"].public_key
    svc.on_record(
        w.record("gamma", cands.ENDPOINTS_KIND, "", cands.endpoints_body(["10.0.0.3:7946"], [], 1))
    )
    await svc.reconcile_once()
    for cand in svc.selector.explain(gamma, w.clock.t)["paths"]:
        svc.selector.report_failure(gamma, svc._cands[(gamma, cand["address"])], w.clock.t)
    peer = svc.backend.peers[w.wg("gamma")]
    svc.backend.peers[w.wg("gamma")] = PeerConfig(
        peer.public_key, "10.0.0.3:51820", peer.allowed_ips, peer.keepalive
    )
    svc.backend.status[w.wg("gamma")] = PeerStatus(last_handshake=w.clock.wall(), rx_bytes=999)
    await svc.reconcile_once()
    assert svc.explain("gamma")["chosen"] is None and svc.path_kind(gamma) is None


async def test_behind_a_nat_a_peer_without_a_session_is_kicked_at_once_then_every_5_s():
    """A public member learns our NAT mapping from our WireGuard's packets:
    a path with no session yet gets a datagram through the tunnel at once,
    not at WireGuard's next keepalive (up to 25 s later)."""
    w = World()
    svc = _running(w)
    kicked: list[bytes] = []

    async def trigger(key: bytes) -> None:
        kicked.append(key)

    svc._trigger = trigger  # type: ignore[method-assign]
    svc.on_record(
        w.record("gamma", cands.ENDPOINTS_KIND, "", cands.endpoints_body(["10.0.0.3:7946"], [], 1))
    )
    alpha, gamma = w.idents["alpha"].public_key, w.idents["gamma"].public_key
    await svc.reconcile_once()
    assert sorted(kicked) == sorted([alpha, gamma])  # beta has no public address
    await svc.reconcile_once()
    assert len(kicked) == 2  # not again within 5 s
    svc.backend.status[w.wg("alpha")] = PeerStatus(last_handshake=w.clock.wall())
    w.clock.t += 6
    w.clock.w += 6
    await svc.reconcile_once()
    assert kicked[2:] == [gamma]  # alpha has a session now
    # a machine with a public address of its own waits for its peers
    svc2 = _running(World())
    svc2.cfg = MeshSection(mdns=False, public_endpoints=["203.0.113.5:51820"])
    svc2._trigger = trigger  # type: ignore[method-assign]
    await svc2.reconcile_once()
    assert len(kicked) == 3


async def test_a_learnt_session_wins_over_an_unproven_or_failing_chosen_path_in_the_view():
    """As WireGuard keeps the learnt address over a doubtful chosen path
    (peerplan._working), `clanctl path` shows the learnt one as in use."""
    w = World()
    svc = _running(w)
    delta = w.idents["delta"].public_key
    svc.on_record(
        w.record("delta", cands.ENDPOINTS_KIND, "", cands.endpoints_body(["10.0.0.4:7946"], [], 1))
    )
    await svc.reconcile_once()
    assert svc.explain("delta")["chosen"]["kind"] == "lan"  # unproven, nothing heard
    peer = svc.backend.peers[w.wg("delta")]
    svc.backend.peers[w.wg("delta")] = PeerConfig(
        peer.public_key, "203.0.113.9:40000", peer.allowed_ips, peer.keepalive
    )
    svc.backend.status[w.wg("delta")] = PeerStatus(last_handshake=w.clock.wall(), rx_bytes=148)
    await svc.reconcile_once()
    shown = svc.explain("delta")
    assert shown["chosen"] == {"kind": "reflexive", "address": "203.0.113.9:40000", "learnt": True}
    assert "our lan path 10.0.0.4:7946 is unproven" in shown["reason"]
    assert [r["address"] for r in shown["paths"] if r["chosen"]] == ["203.0.113.9:40000"]
    assert svc.path_kind(delta) == "reflexive"
    # once the LAN path is proven, it is the one in use
    lan = svc._cands[(delta, "10.0.0.4:7946")]
    svc.selector.report_success(delta, lan, 0.002, w.clock.t)
    assert svc.explain("delta")["chosen"]["kind"] == "lan"
    assert svc.path_kind(delta) == "lan"
