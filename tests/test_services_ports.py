"""The services service on fake ports: it needs nothing of the agent (DESIGN rule 7).

A server (m1) publishes its exports through its bus; the record, arriving
at a client (m2) through its bus subscription, wakes the client's running
service, which renders the import file."""

from __future__ import annotations

import copy

import nacl.signing
import trio

from clanagent.identity import Identity
from clanagent.mesh.overlay import overlay_ip6
from clanagent.services.service import ServicesService
from clanagent.services.wiring import EXPORT_KIND, export_key

from ._fake_ports import FakePorts, Rounds, inventory_of
from .test_inventory_agent import genesis, machine_entry
from .test_services_agent import vpn_service

LOOP_TIMEOUT = 30  # the service's own re-check interval without a wake-up


def test_an_export_arriving_through_the_bus_renders_the_import_file(tmp_path):
    admin = nacl.signing.SigningKey.generate()
    ids = {"m1": Identity.generate(), "m2": Identity.generate()}
    doc = genesis(
        admin,
        {"m1": machine_entry(ids["m1"], ["server"]), "m2": machine_entry(ids["m2"], ["laptop"])},
    )
    doc["services"]["vpn"] = vpn_service("true")  # a reload command that succeeds
    inv = inventory_of(doc)
    server = FakePorts.build(ids["m1"], inventory=inv)
    client = FakePorts.build(ids["m2"], inventory=inv)
    server_svc = ServicesService(server.ports, runtime_dir=tmp_path / "run1")
    client_svc = ServicesService(client.ports, runtime_dir=tmp_path / "run2")
    rounds = Rounds(client_svc)
    env = tmp_path / "run2" / "services" / "vpn" / "imports.env"
    server_ip = str(overlay_ip6(doc["clan"]["id"], ids["m1"].public_key))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(client_svc.run)
            with trio.fail_after(5):
                await rounds.reach(1)
            assert client.bus.published == []  # a client exports nothing
            assert "SERVER_ADDRESS" not in (env.read_text() if env.exists() else "")

            # the server publishes its exports through its bus (the anchor gives its address)
            await server_svc.sync_once()
            (rec,) = server.bus.of(EXPORT_KIND, export_key("vpn", "server"))
            assert rec.body["values"]["address"] == server_ip
            await server_svc.sync_once()
            assert len(server.bus.published) == 1  # unchanged: not published again

            # the record reaches the client: its subscription wakes the running service
            start = trio.current_time()
            assert client.bus.deliver(rec)
            with trio.fail_after(LOOP_TIMEOUT / 2):
                await rounds.reach(2)
            assert trio.current_time() - start < LOOP_TIMEOUT / 2
            text = env.read_text()
            assert f'CLAN_VPN_SERVER_ADDRESS="{server_ip}"' in text
            assert 'CLAN_VPN_SERVER_PORT="51000"' in text
            assert ("service.imports", {"service": "vpn", "reloaded": True}) in client.events.events
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_an_inventory_change_through_the_port_republishes_the_exports(tmp_path):
    admin = nacl.signing.SigningKey.generate()
    ident = Identity.generate()
    doc = genesis(admin, {"m1": machine_entry(ident, ["server"])})
    doc["services"]["vpn"] = vpn_service("")
    server = FakePorts.build(ident, inventory=inventory_of(doc))
    svc = ServicesService(server.ports, runtime_dir=tmp_path)
    key = export_key("vpn", "server")
    rounds = Rounds(svc)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            with trio.fail_after(5):
                first = await server.bus.wait_published(EXPORT_KIND, key)
                await rounds.reach(2)  # its own record woke it once more; now it sleeps
            assert first.body["values"]["port"] == "51000"
            doc2 = copy.deepcopy(doc)
            doc2["services"]["vpn"]["roles"]["server"]["settings"]["port"] = 51001
            start = trio.current_time()
            server.inventory.set(inventory_of(doc2))  # the head moved: the port says so
            with trio.fail_after(LOOP_TIMEOUT / 2):
                rec = await server.bus.wait_published(EXPORT_KIND, key, count=2)
            assert trio.current_time() - start < LOOP_TIMEOUT / 2
            assert rec.body["values"]["port"] == "51001"
            nursery.cancel_scope.cancel()

    trio.run(main)
