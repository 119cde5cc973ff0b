"""Service wiring across a simulated clan: exports gossip, every client resolves them."""

from __future__ import annotations

import nacl.signing

from clanagent.gossip.config import GossipConfig
from clanagent.services.wiring import (
    EXPORT_KIND,
    collect_exports,
    export_body,
    export_key,
    resolve_imports,
)

from .sim.cluster import Cluster, seeded_identity
from .test_inventory_sim import machine

N = 20


def test_exports_reach_every_client_through_gossip():
    ids = [seeded_identity(5, i) for i in range(N)]
    cluster = Cluster(N, GossipConfig.local(), seed=5, identities=ids)
    assert cluster.wait_converged(timeout=30)
    admin = nacl.signing.SigningKey(bytes([3]) * 32)
    doc = {
        "format": 1,
        "clan": {
            "id": b"\x07" * 16,
            "name": "sim",
            "admins": [bytes(admin.verify_key)],
            "threshold": 1,
        },
        "machines": {
            f"n{i}": machine(ids[i], ["server"] if i < 2 else ["client"]) for i in range(N)
        },
        "networks": {"default": ["lan", "public", "tor"], "by_tag": {}},
        "services": {
            "vpn": {
                "type": "vpn",
                "settings": {},
                "reload": "",
                "secrets": {},
                "roles": {
                    "server": {
                        "machines": [],
                        "tags": ["server"],
                        "settings": {},
                        "exports": ["address", "public_key"],
                        "imports": [],
                    },
                    "client": {
                        "machines": [],
                        "tags": ["client"],
                        "settings": {},
                        "exports": [],
                        "imports": ["vpn.server"],
                    },
                },
            }
        },
        "vms": {},
    }
    for i in (0, 1):
        body = export_body(
            "vpn",
            "server",
            f"n{i}",
            {"address": f"fd00::{i + 1}", "public_key": ids[i].public_key.hex()},
        )
        cluster.publish(f"n{i}", EXPORT_KIND, export_key("vpn", "server"), body)
    # a forged export: a client claims to be a server
    fake = export_body("vpn", "server", "n5", {"address": "fd00::666", "public_key": "00"})
    cluster.publish("n5", EXPORT_KIND, export_key("vpn", "server"), fake)
    cluster.run_for(3)
    for i in range(2, N):
        store = cluster.stores[f"n{i}"]
        recs = [(r.origin, r.key, r.body) for r in store.records() if r.kind == EXPORT_KIND]
        exports, rejected = collect_exports(doc, recs)
        assert len(rejected) == 1  # n5 holds no server role: ignored everywhere
        env = resolve_imports(doc, f"n{i}", exports).services["vpn"].env
        assert env["CLAN_VPN_SERVER_ADDRESS"] == "fd00::1"  # the first provider, by name
        assert env["CLAN_VPN_SERVER_ADDRESS_1"] == "fd00::2"
        assert env["CLAN_VPN_SERVER_PUBLIC_KEY"] == ids[0].public_key.hex()
        assert "fd00::666" not in env.values()
