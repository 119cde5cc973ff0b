"""VM overlay addresses (`vm_ip6`) and which peer each is routed to (`vm_routes`)."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest

from clanagent.mesh.overlay import OverlayError, clan_subnet, overlay_ip6, vm_ip6
from clanagent.mesh.vmroutes import CLAN_NETWORK, VM_STATUS_KIND, vm_routes
from clanagent.mesh.wireguard import MeshPeer, desired_from

CLAN = b"clan-one"
K1, K2, K3 = (bytes([i]) * 32 for i in (1, 2, 3))


# Pinned like the machine vectors: a change moves every VM of every clan.
def test_vm_ip6_pinned_and_documented() -> None:
    assert vm_ip6(CLAN, "web") == ipaddress.IPv6Address("fd37:2326:4e9b:0:bd53:fe44:41ed:d2d2")
    iid = hashlib.blake2b(b"web", digest_size=8, person=b"clan-vm-iid").digest()
    assert vm_ip6(b"other", "web").packed[8:] == iid
    assert vm_ip6(b"other", "web") in clan_subnet(b"other")


def test_vm_ip6_is_stable_and_independent_of_machine_derivation() -> None:
    assert vm_ip6(CLAN, "web") == vm_ip6(CLAN, "web")
    assert vm_ip6(CLAN, "web") != vm_ip6(CLAN, "db")
    # the same bytes as a machine key and as a VM name give different ids
    name = "x" * 32
    assert vm_ip6(CLAN, name) != overlay_ip6(CLAN, name.encode())
    machine_iid = hashlib.blake2b(name.encode(), digest_size=8, person=b"clan-iid").digest()
    assert vm_ip6(CLAN, name).packed[8:] != machine_iid
    with pytest.raises(OverlayError):
        vm_ip6(CLAN, "")


def _doc(count: int = 1, networks=(CLAN_NETWORK,)) -> dict:
    machines = {
        "m1": {"node_key": K1, "tags": ["vmhost"]},
        "m2": {"node_key": K2, "tags": ["vmhost"]},
        "m3": {"node_key": K3, "tags": []},
    }
    vm = {"machines": [], "tags": ["vmhost"], "count": count, "networks": list(networks)}
    return {"machines": machines, "vms": {"web": vm, "plain": {**vm, "networks": []}}}


def _status(vm: str = "web", state: str = "running", overlay: str | None = None) -> dict:
    addr = str(vm_ip6(CLAN, vm)) if overlay is None else overlay
    return {"vm": vm, "state": state, "overlay": addr}


def _host(doc: dict) -> tuple[bytes, bytes]:
    from clanagent.inventory.select import placement

    (host,) = placement(doc, "web")
    keys = {"m1": K1, "m2": K2}
    other = next(k for m, k in keys.items() if m != host)
    return keys[host], other


def test_kind_matches_the_vm_service() -> None:
    from clanagent.vmhost.service import VM_STATUS_KIND as published
    from clanagent.vmhost.spec import CLAN_NETWORK as spec_network

    assert published == VM_STATUS_KIND and spec_network == CLAN_NETWORK


def test_routes_the_vm_to_the_machine_that_runs_it() -> None:
    doc = _doc()
    host, _ = _host(doc)
    assert vm_routes(doc, CLAN, [(host, "web", _status())]) == {host: [vm_ip6(CLAN, "web")]}


def test_rejects_forged_misplaced_stopped_and_unnetworked() -> None:
    doc = _doc()
    host, other = _host(doc)
    # a forged address: the record names someone else's address
    forged = str(overlay_ip6(CLAN, K3))
    assert vm_routes(doc, CLAN, [(host, "web", _status(overlay=forged))]) == {}
    assert vm_routes(doc, CLAN, [(host, "web", _status(overlay=""))]) == {}
    # a machine the inventory does not place the VM on, even with the right address
    assert vm_routes(doc, CLAN, [(other, "web", _status())]) == {}
    assert vm_routes(doc, CLAN, [(K3, "web", _status())]) == {}
    # not running
    for state in ("stopped", "crashed", "failed", "starting"):
        assert vm_routes(doc, CLAN, [(host, "web", _status(state=state))]) == {}
    # a VM that is not on the clan network
    assert vm_routes(doc, CLAN, [(host, "plain", _status("plain"))]) == {}
    # a key that is not a machine, a body for another VM than the record key, junk
    assert vm_routes(doc, CLAN, [(b"\x09" * 32, "web", _status())]) == {}
    assert vm_routes(doc, CLAN, [(host, "plain", _status())]) == {}
    assert vm_routes(doc, CLAN, [(host, "web", ["junk"])]) == {}
    assert vm_routes(doc, CLAN, [(host, "gone", _status("gone"))]) == {}


def test_a_vm_on_two_machines_goes_to_the_first_that_runs_it() -> None:
    doc = _doc(count=2)
    both = [(K1, "web", _status()), (K2, "web", _status())]
    assert vm_routes(doc, CLAN, both) == {K1: [vm_ip6(CLAN, "web")]}
    only_m2 = [(K1, "web", _status(state="crashed")), (K2, "web", _status())]
    assert vm_routes(doc, CLAN, only_m2) == {K2: [vm_ip6(CLAN, "web")]}
    # m1 died with its last word "running": not believed, the route moves to m2
    assert vm_routes(doc, CLAN, both, frozenset({K1})) == {K2: [vm_ip6(CLAN, "web")]}
    assert vm_routes(doc, CLAN, both, frozenset({K1, K2})) == {}


def test_desired_from_adds_the_vms_to_allowed_ips() -> None:
    addr = vm_ip6(CLAN, "web")
    peer = MeshPeer(K2, overlay_ip6(CLAN, K2), None, None, (addr,))
    d = desired_from(K1, K1, 51820, [peer])
    assert d.peers[K2].allowed_ips == tuple(
        sorted((f"{overlay_ip6(CLAN, K2)}/128", f"{addr}/128"), key=ipaddress.ip_network)
    )
