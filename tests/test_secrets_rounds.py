"""The secrets service's per-round cost: nothing is recomputed per member per round."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from clanagent.identity import node_id_of
from clanagent.secrets import service as secrets_service
from clanagent.secrets.service import SecretsService

from ._fake_ports import FakePorts
from ._fake_vm_backend import inline


def doc_of(keys: list[bytes]) -> dict:
    machines = {f"m{i}": {"node_key": k, "box_key": k} for i, k in enumerate(keys)}
    return {
        "machines": machines,
        "services": {},
        "clan": {"id": b"c" * 16, "name": "t", "admins": []},
    }


def inventory_of(keys: list[bytes]) -> SimpleNamespace:
    names = {k: SimpleNamespace(name=f"m{i}") for i, k in enumerate(keys)}
    return SimpleNamespace(doc=doc_of(keys), machine_by_node_key=names.get)


def fake_ports(keys: list[bytes]) -> FakePorts:
    """m0 of a clan whose every member is alive (a bare doc: no planner inputs)."""
    me = SimpleNamespace(public_key=keys[0], box_key=b"b" * 32)
    fp = FakePorts.build(me, inventory=inventory_of(keys))
    fp.members.set_keys(keys)
    return fp


def test_node_ids_are_computed_once_per_inventory(tmp_path, monkeypatch):
    calls: list[bytes] = []

    def counting(key: bytes) -> str:
        calls.append(key)
        return node_id_of(key)

    monkeypatch.setattr(secrets_service, "node_id_of", counting)
    keys = [bytes([i + 1]) * 32 for i in range(6)]
    fp = fake_ports(keys)
    svc = SecretsService(fp.ports, runtime_dir=tmp_path)

    def doc() -> dict:
        return fp.inventory.inventory.doc

    async def rounds(n: int) -> None:
        with trio.fail_after(10):
            for _ in range(n):
                await svc.sync_once()

    trio.run(rounds, 20)
    assert len(calls) <= len(keys)  # one per member, for the one inventory
    assert svc._online(doc()) == [f"m{i}" for i in range(6)]

    # membership changes are still seen, without hashing again
    fp.members.set(node_id_of(keys[2]), "dead")
    fp.members.set(node_id_of(keys[3]), None)
    before = len(calls)
    assert svc._online(doc()) == ["m0", "m1", "m4", "m5"]
    assert len(calls) == before

    # a new inventory (a machine added): hashed once more, then cached again
    keys.append(b"\x77" * 32)
    fp.members.set(node_id_of(keys[-1]), "alive")
    fp.inventory.set(inventory_of(keys))
    calls.clear()
    trio.run(rounds, 20)
    assert len(calls) == len(keys)
    assert "m6" in svc._online(doc())

    # only alive members generate; with no membership (gossip not running), us alone
    fp.members.set(node_id_of(keys[1]), "suspect")
    calls.clear()
    assert svc._online(doc()) == ["m0", "m4", "m5", "m6"]
    fp.members.members.clear()  # unsaid: nobody is told
    assert svc._online(doc()) == ["m0"]
    assert calls == []


def test_an_installed_generation_is_not_written_again_each_round(tmp_path, monkeypatch):
    from clanagent.secrets import files
    from clanagent.secrets.model import SecretInstance
    from clanagent.secrets.planner import Install, Plan

    keys = [bytes([i + 1]) * 32 for i in range(3)]
    svc = SecretsService(fake_ports(keys).ports, runtime_dir=tmp_path)
    inst = SecretInstance("vpn", "psk", "role:client")
    current = {"version": 5, "generation": 1}

    def fake_plan(*args, **kwargs):
        rec = SimpleNamespace(origin=keys[1], version=current["version"])
        body = SimpleNamespace(generation=current["generation"], public={})
        return Plan(install=[Install(inst, rec, body)])

    opened, installs, fsyncs = [], [], []
    real_install, real_fsync = files.install, files.os.fsync
    monkeypatch.setattr(secrets_service, "plan", fake_plan)
    monkeypatch.setattr(svc, "_opens", lambda body: opened.append(body) or {"psk": b"s3cret"})
    monkeypatch.setattr(
        files, "install", lambda *a, **k: installs.append(a) or real_install(*a, **k)
    )
    monkeypatch.setattr(files.os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))

    async def rounds(n: int) -> None:
        with trio.fail_after(10):
            for _ in range(n):
                await svc.sync_once()

    trio.run(rounds, 30)
    assert len(installs) == 1 and len(opened) == 1  # once, not once per round
    assert len(fsyncs) <= 4  # the files of that one installation
    psk = tmp_path / "secrets" / "vpn" / "psk" / "psk"
    assert psk.read_bytes() == b"s3cret"

    # a new generation is installed at once
    current.update(version=9, generation=2)
    trio.run(rounds, 5)
    assert len(installs) == 2
    assert files.installed_generation(tmp_path, "vpn", "psk") == 2

    # and every REVERIFY the files are checked again (a hand-deleted file comes back)
    psk.unlink()
    monkeypatch.setattr(secrets_service, "REVERIFY", 0.0)
    trio.run(rounds, 1)
    assert len(installs) == 3 and psk.read_bytes() == b"s3cret"


def test_member_churn_costs_a_round_per_settle_not_a_round_per_change(tmp_path):
    """Who is online only decides who generates, after SETTLE of stillness: 100
    member changes in 5 s make a handful of rounds (each lists every member),
    not 100, and one round follows SETTLE after the last change."""
    import trio.testing

    from clanagent.secrets.service import SETTLE

    keys = [bytes([i + 1]) * 32 for i in range(6)]
    fp = fake_ports(keys)
    # the file work inline: a worker thread would let the MockClock jump
    # through the whole churn while the first round waits for it
    svc = SecretsService(fp.ports, runtime_dir=tmp_path, run_sync=inline)
    rounds: list[float] = []
    real = svc.sync_once

    async def counting() -> None:
        rounds.append(trio.current_time())
        await real()

    svc.sync_once = counting

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(svc.run)
            await trio.sleep(1.0)
            start = trio.current_time()
            del rounds[:]
            for _ in range(100):
                svc.member_changed()
                await trio.sleep(0.05)
            last = trio.current_time() - 0.05
            await trio.sleep(2 * SETTLE)
            churn = [t for t in rounds if t < last + 0.01]
            assert len(churn) <= 5 * 2 + 2, rounds  # about one per 0.5 s at most
            after = [t for t in rounds if t > last]
            assert after and after[0] - last <= SETTLE + 0.6, (last, rounds)
            assert start < rounds[0]
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
