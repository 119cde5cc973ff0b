"""Concurrent inventory edits across a partition, in the network simulator.

Two admins edit the same version while the clan is split in two; after the
partition heals every node must hold the same effective inventory: both
sides' non-conflicting changes merged, the true conflict listed (nothing
silently dropped), until an admin resolves it.
"""

from __future__ import annotations

import copy

import nacl.signing

from clanagent.gossip.config import GossipConfig
from clanagent.gossip.node import GossipNode
from clanagent.inventory import (
    RECORD_KIND,
    Anchor,
    InventoryManager,
    make_version,
)

from .sim.cluster import Cluster, seeded_identity

N = 20
CLAN = b"\x42" * 16


def machine(ident, tags):
    return {
        "node_key": ident.public_key,
        "box_key": ident.box_public,
        "wg_key": ident.wg_public,
        "tags": sorted(tags),
        "endpoints": [],
        "sealed_endpoints": b"",
        "public": True,
    }


def build(seed: int = 7):
    admin_a = nacl.signing.SigningKey(bytes([1]) * 32)
    admin_b = nacl.signing.SigningKey(bytes([2]) * 32)
    admins = tuple(sorted([bytes(admin_a.verify_key), bytes(admin_b.verify_key)]))
    identities = [seeded_identity(seed, i) for i in range(N)]
    managers: dict[str, InventoryManager] = {}

    def factory(identity, config, **kw):
        mgr = InventoryManager(Anchor(CLAN, "sim", admins))
        managers[kw["addr"]] = mgr
        return GossipNode(
            identity, config, admit=lambda rec: mgr.admit_record(rec) is not False, **kw
        )

    cluster = Cluster(
        N, GossipConfig.local(), seed=seed, clan=CLAN, node_factory=factory, identities=identities
    )
    doc = {
        "format": 1,
        "clan": {"id": CLAN, "name": "sim", "admins": list(admins), "threshold": 1},
        "machines": {f"n{i}": machine(identities[i], ["base"]) for i in range(N)},
        "networks": {"default": ["lan", "public", "tor"], "by_tag": {}},
        "services": {},
        "vms": {},
    }
    return cluster, managers, doc, admin_a, admin_b


def publish_version(cluster, managers, addr, version):
    # The submitting agent offers it to its own history, then gossips it.
    managers[addr].offer_version(version)
    cluster.publish(addr, RECORD_KIND, version.hash.hex(), version.to_wire())


def heads(managers):
    return {addr: m.head for addr, m in managers.items()}


def test_partitioned_admins_edit_then_heal_and_resolve():
    cluster, managers, doc, admin_a, admin_b = build()
    assert cluster.wait_converged(timeout=30)
    g = make_version(doc, [], 1, "genesis", [admin_a])
    publish_version(cluster, managers, "n0", g)
    cluster.run_for(3)
    assert all(h.leaves == (g.hash,) for h in heads(managers).values())

    cluster.partition([[f"n{i}" for i in range(10)], [f"n{i}" for i in range(10, N)]])
    left = copy.deepcopy(doc)
    left["machines"]["n2"]["tags"] = ["base", "left"]  # only the left side touches n2
    left["machines"]["n5"]["tags"] = ["a"]  # both sides change n5 differently
    left["services"]["web"] = {
        "type": "nginx",
        "settings": {},
        "reload": "",
        "roles": {
            "server": {"machines": ["n1"], "tags": [], "settings": {}, "exports": [], "imports": []}
        },
        "secrets": {},
    }
    right = copy.deepcopy(doc)
    right["machines"]["n12"]["tags"] = ["base", "right"]
    right["machines"]["n5"]["tags"] = ["b"]
    del right["machines"]["n19"]  # the right side removes a machine
    vx = make_version(left, [g.hash], 2, "left edit", [admin_a])
    vy = make_version(right, [g.hash], 3, "right edit", [admin_b])
    publish_version(cluster, managers, "n1", vx)
    publish_version(cluster, managers, "n11", vy)
    cluster.run_for(5)
    assert managers["n3"].head.leaves == (vx.hash,)
    assert managers["n13"].head.leaves == (vy.hash,)

    cluster.heal()
    converged = cluster.run_until_true(
        lambda: all(set(h.leaves) == {vx.hash, vy.hash} for h in heads(managers).values()),
        timeout=120,
    )
    assert converged, "the two edits did not reach every node after the heal"
    views = list(heads(managers).values())
    first = views[0]
    for h in views[1:]:  # identical on every node, whatever the arrival order
        assert h.doc == first.doc
        assert h.conflicts == first.conflicts
    merged = first.doc
    assert merged["machines"]["n2"]["tags"] == ["base", "left"]
    assert merged["machines"]["n12"]["tags"] == ["base", "right"]
    assert "web" in merged["services"]
    assert "n19" not in merged["machines"]
    assert merged["machines"]["n5"]["tags"] == ["base"]  # conflict: the base value stays
    (conflict,) = first.conflicts
    assert conflict.path == "machines.n5"
    values = {h: v["tags"] for h, v in conflict.variants}
    assert values == {vx.hash: ["a"], vy.hash: ["b"]}  # nothing silently dropped

    resolved = copy.deepcopy(merged)
    resolved["machines"]["n5"]["tags"] = ["a", "b"]
    vr = make_version(resolved, [vx.hash, vy.hash], 4, "resolve n5", [admin_a])
    publish_version(cluster, managers, "n7", vr)
    assert cluster.run_until_true(
        lambda: all(h.leaves == (vr.hash,) for h in heads(managers).values()), timeout=30
    )
    assert all(not h.conflicts for h in heads(managers).values())
    assert all(h.doc["machines"]["n5"]["tags"] == ["a", "b"] for h in heads(managers).values())


def test_forged_inventory_is_not_spread():
    cluster, managers, doc, admin_a, _ = build(seed=3)
    assert cluster.wait_converged(timeout=30)
    mallory = nacl.signing.SigningKey(bytes([9]) * 32)
    bad = make_version(doc, [], 1, "forged", [mallory])
    cluster.publish("n4", RECORD_KIND, bad.hash.hex(), bad.to_wire())
    cluster.run_for(5)
    # only the node that published it holds the record; nobody accepted it
    holders = [
        a
        for a in cluster.addrs
        if cluster.stores[a].get(cluster.identities[4].public_key, RECORD_KIND, bad.hash.hex())
    ]
    assert holders == ["n4"]
    assert all(m.head.doc is None for m in managers.values())
