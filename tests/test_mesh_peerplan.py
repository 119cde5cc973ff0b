"""The mesh's reconcile decision (`peerplan.plan_peers`): inventory and
records in, desired WireGuard peers out -- no interface, no clock, no trio."""

from __future__ import annotations

import random

import pytest

from clanagent.inventory.select import placement
from clanagent.mesh import candidates as cands
from clanagent.mesh.overlay import assign_ipv4, overlay_ip6, vm_ip6
from clanagent.mesh.paths import PathSelector
from clanagent.mesh.peerplan import plan_peers
from clanagent.mesh.wireguard import desired_from
from tests._mesh_inventory import identities, make_inventory

V4 = "100.64.0.0/24"


@pytest.fixture(scope="module")
def world():
    idents = identities()
    return idents, make_inventory(idents)


def _keys(idents):
    return {name: i.public_key for name, i in idents.items()}


def _endpoints(k):
    return {
        k["alpha"]: cands.endpoints_body(["10.0.0.1:7946"], [], 51820),
        k["gamma"]: cands.endpoints_body([], ["[2001:db8::5]:7946"], 51821),
    }


def _running(inv, k):
    host = placement(inv.doc, "web")[0]
    body = {"vm": "web", "state": "running", "overlay": str(vm_ip6(inv.clan_id, "web"))}
    return host, [(k[host], "web", body)]


def test_every_other_machine_becomes_a_peer_with_its_chosen_endpoint(world):
    idents, inv = world
    k = _keys(idents)
    host, status = _running(inv, k)
    plan = plan_peers(
        inv.doc,
        inv.clan_id,
        k["beta"],
        PathSelector(True, random.Random(0)),
        100.0,
        endpoints=_endpoints(k),
        vm_status=status,
        ipv4_range=V4,
    )
    wg = {name: inv.doc["machines"][name]["wg_key"] for name in k}
    by_wg = {p.wg_public: p for p in plan.peers}
    assert set(by_wg) == {wg["alpha"], wg["gamma"], wg["delta"]}  # never ourselves
    assert [p.wg_public for p in plan.peers] == [
        wg[n] for n in sorted(("alpha", "gamma", "delta"), key=lambda n: k[n])
    ]
    # alpha: its LAN address (preferred over the inventory's public one), with
    # the WireGuard port its endpoints record names.
    assert by_wg[wg["alpha"]].endpoint == "10.0.0.1:51820"
    assert by_wg[wg["gamma"]].endpoint == "[2001:db8::5]:51821"
    assert by_wg[wg["delta"]].endpoint is None  # nothing known: WireGuard waits for it
    v4 = assign_ipv4(V4, list(k.values()))
    for name in ("alpha", "gamma", "delta"):
        peer = by_wg[wg[name]]
        assert peer.overlay6 == overlay_ip6(inv.clan_id, k[name])
        assert peer.overlay4 == v4[k[name]]
        assert peer.vms == ((vm_ip6(inv.clan_id, "web"),) if name == host else ())
    assert plan.overlay4 == v4[k["beta"]]
    assert {c.address for c in plan.candidates[k["alpha"]]} == {
        "10.0.0.1:7946",
        "198.51.100.7:7946",
    }
    # What the interface gets: the VM's /128 goes to its host only.
    me = idents["beta"]
    desired = desired_from(me.wg_private, me.wg_public, 51820, plan.peers)
    vm_cidr = f"{vm_ip6(inv.clan_id, 'web')}/128"
    assert [key for key, p in desired.peers.items() if vm_cidr in p.allowed_ips] == [wg[host]]


def test_a_gone_host_loses_its_vm_route_and_no_v4_without_a_range(world):
    idents, inv = world
    k = _keys(idents)
    host, status = _running(inv, k)
    plan = plan_peers(
        inv.doc,
        inv.clan_id,
        k["beta"],
        PathSelector(True, random.Random(0)),
        100.0,
        endpoints=_endpoints(k),
        vm_status=status,
        gone=frozenset({k[host]}),
    )
    assert all(p.vms == () for p in plan.peers)
    assert all(p.overlay4 is None for p in plan.peers) and plan.overlay4 is None


def test_a_withdrawn_record_takes_its_endpoint_away_and_tor_is_no_endpoint(world):
    idents, inv = world
    k = _keys(idents)
    sel = PathSelector(True, random.Random(0))
    kw = {"vm_status": (), "onions": {k["delta"]: "abcdefghij.onion:7946"}}
    first = plan_peers(inv.doc, inv.clan_id, k["beta"], sel, 100.0, endpoints=_endpoints(k), **kw)
    wg_alpha = inv.doc["machines"]["alpha"]["wg_key"]
    assert {p.wg_public: p.endpoint for p in first.peers}[wg_alpha] == "10.0.0.1:51820"
    # The same selector next round: alpha's record is gone, so is its WireGuard
    # port; only the inventory's address (no port known) and nothing to configure.
    later = plan_peers(inv.doc, inv.clan_id, k["beta"], sel, 130.0, endpoints={}, **kw)
    ends = {p.wg_public: p.endpoint for p in later.peers}
    assert ends[wg_alpha] is None
    # delta is reachable over Tor only: gossip can use it, WireGuard cannot.
    assert sel.current(k["delta"]).kind == "tor"
    assert ends[inv.doc["machines"]["delta"]["wg_key"]] is None


def test_a_peer_that_allows_no_public_path_gets_no_public_endpoint(world):
    idents, inv = world
    k = _keys(idents)
    doc = {**inv.doc, "machines": {**inv.doc["machines"]}}
    doc["machines"]["gamma"] = {**doc["machines"]["gamma"], "public": False}
    plan = plan_peers(
        doc,
        inv.clan_id,
        k["beta"],
        PathSelector(True, random.Random(0)),
        100.0,
        endpoints=_endpoints(k),
    )
    wg_gamma = doc["machines"]["gamma"]["wg_key"]
    assert {p.wg_public: p.endpoint for p in plan.peers}[wg_gamma] is None
