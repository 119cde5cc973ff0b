"""The secrets service on fake ports: it needs nothing of the agent (DESIGN rule 7).

Two servers share a role-scoped secret. Each runs the real SecretsService
over its own `FakePorts` (a hand-moved clock, an in-memory store, a
list-backed bus, an editable membership, the real inventory model)."""

from __future__ import annotations

from typing import Any

import nacl.signing
import trio

from clanagent.identity import Identity, node_id_of
from clanagent.secrets.model import generator_for
from clanagent.secrets.record import SECRET_KIND, open_body, parse_secret_record
from clanagent.secrets.service import SETTLE, TICK, SecretsService

from ._fake_ports import FakePorts, Rounds, inventory_of
from .test_inventory_agent import genesis, machine_entry
from .test_secrets_agent import backup_service

INSTANCE = "backup/repokey"


def clan() -> tuple[dict, dict[str, Identity]]:
    admin = nacl.signing.SigningKey.generate()
    ids = {m: Identity.generate() for m in ("m1", "m2")}
    doc = genesis(admin, {m: machine_entry(ident, []) for m, ident in ids.items()})
    svc = backup_service()
    svc["settings"] = {}  # files stay the test's user's
    svc["roles"]["client"]["machines"] = []
    svc["secrets"] = {"repokey": svc["secrets"]["repokey"]}  # shared by the two servers
    doc["services"]["backup"] = svc
    return doc, ids


def machine(doc: dict, ids: dict[str, Identity], name: str, tmp_path) -> tuple[FakePorts, Any]:
    fp = FakePorts.build(ids[name], inventory=inventory_of(doc))
    svc = SecretsService(fp.ports, runtime_dir=tmp_path / name)
    fp.members.set_keys([ident.public_key for ident in ids.values()])  # both alive
    fp.clock.advance(SETTLE + 0.1)  # and the membership has settled
    return fp, svc


def password(tmp_path, name: str) -> bytes | None:
    path = tmp_path / name / "secrets" / "backup" / "repokey" / "password"
    return path.read_bytes() if path.exists() else None


def test_only_the_chosen_online_holder_generates_and_publishes_through_the_bus(tmp_path):
    doc, ids = clan()
    chosen = generator_for(INSTANCE, [(m, ident.public_key) for m, ident in ids.items()])
    other = "m2" if chosen == "m1" else "m1"
    fps, svcs = {}, {}
    for name in ids:
        fps[name], svcs[name] = machine(doc, ids, name, tmp_path)

    async def main() -> None:
        with trio.fail_after(20):
            for name in ids:
                await svcs[name].sync_once()
            assert fps[other].bus.published == []  # waits for the chosen one
            (rec,) = fps[chosen].bus.of(SECRET_KIND, INSTANCE)
            assert fps[chosen].store.get(ids[chosen].public_key, SECRET_KIND, INSTANCE) == rec
            assert fps[chosen].events.topics() == ["secret.generated"]
            body = parse_secret_record(rec)
            assert body.generation == 1 and body.created == int(fps[chosen].clock.wall())
            opened = {m: open_body(body, i.public_key, i.box_key) for m, i in ids.items()}
            assert opened["m1"] == opened["m2"] and opened["m1"] is not None
            # the next round installs it where it was made ...
            await svcs[chosen].sync_once()
            assert password(tmp_path, chosen) == opened["m1"]["password"]
            # ... and the record, arriving at the other through its bus, there too
            assert fps[other].bus.deliver(rec)
            await svcs[other].sync_once()
            assert password(tmp_path, other) == opened["m1"]["password"]
            assert fps[other].bus.published == []  # it never made one of its own

    trio.run(main)


def test_a_membership_change_through_the_port_wakes_the_next_generator(tmp_path):
    doc, ids = clan()
    chosen = generator_for(INSTANCE, [(m, ident.public_key) for m, ident in ids.items()])
    other = "m2" if chosen == "m1" else "m1"
    fp, svc = machine(doc, ids, other, tmp_path)
    rounds = Rounds(svc)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            with trio.fail_after(5):
                await rounds.reach(1)
            assert fp.bus.published == []  # the chosen one is alive
            # The chosen machine fails: the port reports it, and the service,
            # which would otherwise sleep for a whole TICK, takes over.
            fp.members.set(node_id_of(ids[chosen].public_key), "dead")
            start = trio.current_time()
            with trio.fail_after(TICK / 2):
                rec = await fp.bus.wait_published(SECRET_KIND, INSTANCE)
            assert trio.current_time() - start < TICK / 2
            assert parse_secret_record(rec).generation == 1
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_rotate_request_arriving_through_the_bus_wakes_the_generator(tmp_path):
    doc, ids = clan()
    chosen = generator_for(INSTANCE, [(m, ident.public_key) for m, ident in ids.items()])
    other = "m2" if chosen == "m1" else "m1"
    fp, svc = machine(doc, ids, chosen, tmp_path)
    asker, asker_svc = machine(doc, ids, other, tmp_path)
    rounds = Rounds(svc)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            with trio.fail_after(5):
                first = await fp.bus.wait_published(SECRET_KIND, INSTANCE)
                await rounds.reach(2)  # it woke itself to install it, then sleeps
            assert password(tmp_path, chosen) is not None
            # the other holder asks for a rotation (through its own bus) ...
            assert asker.bus.deliver(first)
            assert await asker_svc.request_rotation(INSTANCE) == {"id": INSTANCE, "generation": 1}
            (request,) = asker.bus.published
            # ... and the request, arriving through the bus, wakes the generator
            start = trio.current_time()
            assert fp.bus.deliver(request)
            with trio.fail_after(TICK / 2):
                rec = await fp.bus.wait_published(SECRET_KIND, INSTANCE, count=2)
            assert trio.current_time() - start < TICK / 2
            assert parse_secret_record(rec).generation == 2
            nursery.cancel_scope.cancel()

    trio.run(main)
