"""Service wiring in running agents: a server role exports, client roles import."""

from __future__ import annotations

import copy
import json
import shlex
import time

import nacl.signing
import pytest
import trio

from clanagent.config import Config, ControlConfig, GossipSection, MeshSection
from clanagent.identity import load_or_create
from clanagent.inventory import Anchor, make_version, save_anchor
from clanagent.mesh.overlay import overlay_ip6

from .test_inventory_agent import call, genesis, machine_entry, start, wait_until

pytestmark = pytest.mark.integration


def cfg_for(tmp_path, i: int) -> Config:
    return Config(
        state_dir=str(tmp_path / f"s{i}"),
        runtime_dir=str(tmp_path / f"run{i}"),
        control=ControlConfig(socket=str(tmp_path / f"c{i}.sock")),
        gossip=GossipSection(listen="127.0.0.1:0", profile="local", name=f"m{i}"),
        mesh=MeshSection(wireguard=False, mdns=False),  # loopback only
    )


def vpn_service(reload_cmd: str) -> dict:
    return {
        "type": "wireguard-vpn",
        "settings": {},
        "reload": reload_cmd,
        "roles": {
            "server": {
                "machines": ["m1"],
                "tags": [],
                "settings": {"port": 51000},
                "exports": ["address", "port", "public_key"],
                "imports": [],
            },
            "client": {
                "machines": [],
                "tags": ["laptop"],
                "settings": {},
                "exports": [],
                "imports": ["vpn.server"],
            },
        },
        "secrets": {},
    }


async def test_server_exports_clients_import_and_reload(tmp_path):
    admin = nacl.signing.SigningKey.generate()
    idents = {i: load_or_create(tmp_path / f"s{i}")[0] for i in (1, 2, 3)}
    marker = tmp_path / "reloaded"
    with trio.fail_after(90):
        async with trio.open_nursery() as n:
            a1, _ = await start(n, cfg_for(tmp_path, 1))
            doc = genesis(
                admin,
                {
                    "m1": machine_entry(idents[1], ["server"]),
                    "m2": machine_entry(idents[2], ["laptop"]),
                    "m3": machine_entry(idents[3], ["laptop"]),
                },
            )
            doc["services"]["vpn"] = vpn_service(f"touch {shlex.quote(str(marker))}")
            v = make_version(doc, [], int(time.time()), "vpn", [admin])
            await call(a1, "inventory.submit", {"version": v.to_wire(), "init": True})
            for i in (2, 3):
                save_anchor(
                    tmp_path / f"s{i}",
                    Anchor(
                        doc["clan"]["id"],
                        "test",
                        tuple(doc["clan"]["admins"]),
                        (a1.gossip.addr,),
                        f"m{i}",
                    ),
                )
            a2, _ = await start(n, cfg_for(tmp_path, 2))
            a3, _ = await start(n, cfg_for(tmp_path, 3))
            server_ip = str(overlay_ip6(doc["clan"]["id"], idents[1].public_key))
            env2 = tmp_path / "run2" / "services" / "vpn" / "imports.env"

            def rendered(path) -> bool:
                return path.exists() and server_ip in path.read_text()

            await wait_until(lambda: rendered(env2), "m2 to render the server's exports", 30)
            await wait_until(
                lambda: rendered(tmp_path / "run3" / "services" / "vpn" / "imports.env"),
                "m3 too",
                30,
            )
            text = env2.read_text()
            assert f'CLAN_VPN_SERVER_ADDRESS="{server_ip}"' in text
            assert 'CLAN_VPN_SERVER_PORT="51000"' in text
            assert f'CLAN_VPN_SERVER_PUBLIC_KEY="{idents[1].public_key.hex()}"' in text
            data = json.loads((tmp_path / "run2" / "services" / "vpn" / "imports.json").read_text())
            assert data  # every provider and value, for programs
            assert marker.exists()  # the reload command ran
            # the server consumes nothing: no files there
            assert not (tmp_path / "run1" / "services" / "vpn").exists()
            view = await call(a3, "services")
            (vpn,) = view
            server = next(r for r in vpn["roles"] if r["role"] == "server")
            assert server["imported_by"] == ["vpn.client"]
            assert server["published"][0]["values"]["address"] == server_ip
            client = next(r for r in vpn["roles"] if r["role"] == "client")
            assert client["machines"] == ["m2", "m3"]

            # the server's port changes: clients re-render and reload
            marker.unlink()
            doc2 = copy.deepcopy(v.doc)
            doc2["services"]["vpn"]["roles"]["server"]["settings"]["port"] = 51001
            v2 = make_version(doc2, [v.hash], int(time.time()), "port", [admin])
            await call(a1, "inventory.submit", {"version": v2.to_wire()})
            await wait_until(lambda: 'PORT="51001"' in env2.read_text(), "the new port", 30)
            await wait_until(marker.exists, "a reload after the change", 10)
            n.cancel_scope.cancel()
