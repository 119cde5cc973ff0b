"""Secrets in running agents: one generator, sealed to holders, rotated, revoked."""

from __future__ import annotations

import copy
import os
import stat
import time

import nacl.signing
import pytest
import trio

from clanagent.identity import load_or_create
from clanagent.inventory import Anchor, make_version, save_anchor
from clanagent.secrets.record import open_body, parse_secret_record

from .test_inventory_agent import call, genesis, machine_entry, start, wait_until
from .test_services_agent import cfg_for

pytestmark = pytest.mark.integration


def backup_service() -> dict:
    return {
        "type": "backup",
        # secret files belong to the service's user (when the agent may chown)
        "settings": {"secrets_owner": "nobody"} if os.geteuid() == 0 else {},
        "reload": "",
        "roles": {
            "server": {
                "machines": ["m1", "m2"],
                "tags": [],
                "settings": {},
                "exports": [],
                "imports": [],
            },
            "client": {
                "machines": ["m3"],
                "tags": [],
                "settings": {},
                "exports": [],
                "imports": [],
            },
        },
        "secrets": {
            "repokey": {
                "generator": "password",
                "length": 24,
                "command": "",
                "depends": [],
                "scope": "role:server",
                "rotate_days": 30,
                "secret_files": [],
                "public_files": [],
            },
            "hostkey": {
                "generator": "ed25519",
                "length": 0,
                "command": "",
                "depends": [],
                "scope": "machine",
                "rotate_days": 0,
                "secret_files": [],
                "public_files": [],
            },
            "broken": {
                "generator": "command",
                "length": 0,
                "command": "exit 3",
                "depends": [],
                "scope": "role:server",
                "rotate_days": 0,
                "secret_files": ["x"],
                "public_files": [],
            },
        },
    }


def files_of(tmp_path, i, rel) -> dict[str, bytes]:
    d = tmp_path / f"run{i}" / "secrets" / rel
    if not d.is_dir():
        return {}
    return {
        p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
    }


async def test_shared_secret_lifecycle(tmp_path):
    admin = nacl.signing.SigningKey.generate()
    idents = {i: load_or_create(tmp_path / f"s{i}")[0] for i in (1, 2, 3)}
    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            a1, _ = await start(n, cfg_for(tmp_path, 1))
            doc = genesis(admin, {f"m{i}": machine_entry(idents[i], []) for i in (1, 2, 3)})
            doc["services"]["backup"] = backup_service()
            v1 = make_version(doc, [], int(time.time()), "backup", [admin])
            await call(a1, "inventory.submit", {"version": v1.to_wire(), "init": True})
            for i in (2, 3):
                save_anchor(
                    tmp_path / f"s{i}",
                    Anchor(
                        doc["clan"]["id"],
                        "t",
                        tuple(doc["clan"]["admins"]),
                        (a1.gossip.addr,),
                        f"m{i}",
                    ),
                )
            a2, _ = await start(n, cfg_for(tmp_path, 2))
            a3, _ = await start(n, cfg_for(tmp_path, 3))
            agents = {1: a1, 2: a2, 3: a3}

            def shared(i):
                return files_of(tmp_path, i, "backup/repokey")

            await wait_until(
                lambda: shared(1) and shared(1) == shared(2),
                "both servers hold the same repokey",
                30,
            )
            first = shared(1)["password"]
            assert len(first) == 24
            assert shared(3) == {}  # the client is no holder
            path = tmp_path / "run1" / "secrets" / "backup" / "repokey" / "password"
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
            if os.geteuid() == 0:
                import pwd

                assert os.stat(path).st_uid == pwd.getpwnam("nobody").pw_uid
            # per-machine secrets: each server has its own, public part readable
            await wait_until(
                lambda: (
                    files_of(tmp_path, 1, "backup/hostkey")
                    and files_of(tmp_path, 2, "backup/hostkey")
                ),
                "host keys",
                30,
            )
            assert files_of(tmp_path, 1, "backup/hostkey") != files_of(
                tmp_path, 2, "backup/hostkey"
            )
            pub = tmp_path / "run1" / "public" / "backup" / "hostkey" / "public"
            assert stat.S_IMODE(os.stat(pub).st_mode) == 0o444
            rows = {r["id"]: r for r in await call(a3, "secrets.list")}
            assert rows["backup/repokey"]["generation"] == 1
            assert rows["backup/repokey"]["recipients"] == ["m1", "m2"]
            assert rows["backup/hostkey@m1"]["public"]["public"] == pub.read_bytes()
            # exactly one machine made the shared secret
            recs = [
                r
                for a in agents.values()
                for r in a.store.records()
                if r.kind == "secret" and r.key == "backup/repokey"
            ]
            assert len({r.origin for r in recs}) == 1
            # the client's agent cannot open it
            body = parse_secret_record(recs[0])
            assert open_body(body, idents[3].public_key, idents[3].box_key) is None
            # a failing generator: a clear error, no generation
            await wait_until(
                lambda: any(
                    r["error"]
                    for r in a1.secrets.rows() + a2.secrets.rows()
                    if r["id"] == "backup/broken"
                ),
                "the broken one",
                30,
            )
            err = next(
                r["error"]
                for r in a1.secrets.rows() + a2.secrets.rows()
                if r["id"] == "backup/broken" and r["error"]
            )
            assert "exit" in err or "status 3" in err or "3" in err
            assert rows["backup/broken"]["generation"] is None

            # a manual rotation makes generation 2 on both servers
            await call(a3, "secrets.rotate", {"id": "backup/repokey"})
            await wait_until(
                lambda: shared(1).get("password") not in (None, first) and shared(1) == shared(2),
                "generation 2",
                30,
            )
            second = shared(1)["password"]

            # m2 leaves the server role: the secret rotates, m2 loses its files and
            # cannot open what is made after its removal
            doc2 = copy.deepcopy(v1.doc)
            doc2["services"]["backup"]["roles"]["server"]["machines"] = ["m1"]
            v2 = make_version(doc2, [v1.hash], int(time.time()), "m2 out", [admin])
            await call(a1, "inventory.submit", {"version": v2.to_wire()})
            await wait_until(
                lambda: shared(1).get("password") not in (None, second),
                "a rotation after the removal",
                30,
            )
            await wait_until(lambda: shared(2) == {}, "m2's files removed", 30)

            def newest():
                return max(
                    (
                        r
                        for a in agents.values()
                        for r in a.store.records()
                        if r.kind == "secret" and r.key == "backup/repokey"
                    ),
                    key=lambda r: parse_secret_record(r).generation,
                )

            def m1_has_newest() -> bool:
                opened = open_body(
                    parse_secret_record(newest()), idents[1].public_key, idents[1].box_key
                )
                return opened is not None and shared(1).get("password") == opened["password"]

            await wait_until(m1_has_newest, "m1 to install the newest generation", 30)
            body = parse_secret_record(newest())
            assert body.generation >= 3
            assert open_body(body, idents[2].public_key, idents[2].box_key) is None
            n.cancel_scope.cancel()
