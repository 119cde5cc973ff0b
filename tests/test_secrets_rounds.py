"""The secrets service's per-round cost: nothing is recomputed per member per round."""

from __future__ import annotations

from types import SimpleNamespace

import trio

from clanagent.identity import node_id_of
from clanagent.secrets import service as secrets_service
from clanagent.secrets.service import SecretsService


class FakeNode:
    def __init__(self, keys: list[bytes]) -> None:
        self.states = {node_id_of(k): "alive" for k in keys}
        self.stats = {"ae_synced": 1}

    def member_state(self, node_id: str) -> str | None:
        return self.states.get(node_id)

    def members(self) -> list[dict]:
        return [{"node_id": n, "state": s} for n, s in self.states.items()]


def doc_of(keys: list[bytes]) -> dict:
    machines = {f"m{i}": {"node_key": k, "box_key": k} for i, k in enumerate(keys)}
    return {"machines": machines, "services": {}, "clan": {"admins": []}}


def fake_agent(keys: list[bytes], runtime: str) -> SimpleNamespace:
    names = {k: SimpleNamespace(name=f"m{i}") for i, k in enumerate(keys)}
    inv = SimpleNamespace(doc=doc_of(keys), machine_by_node_key=names.get)
    return SimpleNamespace(
        cfg=SimpleNamespace(runtime_dir=runtime, secrets_owner=None),
        inventory=SimpleNamespace(inventory=inv),
        identity=SimpleNamespace(public_key=keys[0], box_key=b"b" * 32),
        gossip=SimpleNamespace(node=FakeNode(keys)),
        store=SimpleNamespace(records=lambda: iter(())),
        services=None,
    )


def test_node_ids_are_computed_once_per_inventory(tmp_path, monkeypatch):
    calls: list[bytes] = []

    def counting(key: bytes) -> str:
        calls.append(key)
        return node_id_of(key)

    monkeypatch.setattr(secrets_service, "node_id_of", counting)
    keys = [bytes([i + 1]) * 32 for i in range(6)]
    agent = fake_agent(keys, str(tmp_path))
    svc = SecretsService(agent)

    async def rounds(n: int) -> None:
        with trio.fail_after(10):
            for _ in range(n):
                await svc.sync_once()

    trio.run(rounds, 20)
    assert len(calls) <= len(keys)  # one per member, for the one inventory
    assert svc._online(agent.inventory.inventory.doc) == [f"m{i}" for i in range(6)]

    # membership changes are still seen, without hashing again
    agent.gossip.node.states[node_id_of(keys[2])] = "dead"
    del agent.gossip.node.states[node_id_of(keys[3])]
    before = len(calls)
    assert svc._online(agent.inventory.inventory.doc) == ["m0", "m1", "m4", "m5"]
    assert len(calls) == before

    # a new inventory (a machine added): hashed once more, then cached again
    keys.append(b"\x77" * 32)
    agent.gossip.node.states[node_id_of(keys[-1])] = "alive"
    agent.inventory.inventory = SimpleNamespace(
        doc=doc_of(keys), machine_by_node_key=agent.inventory.inventory.machine_by_node_key
    )
    calls.clear()
    trio.run(rounds, 20)
    assert len(calls) == len(keys)
    assert "m6" in svc._online(agent.inventory.inventory.doc)

    # a node without the state lookup: one pass over its members, same answer
    node = agent.gossip.node
    node.states[node_id_of(keys[1])] = "suspect"  # only alive members generate
    agent.gossip.node = SimpleNamespace(members=node.members, stats=node.stats)
    calls.clear()
    assert svc._online(agent.inventory.inventory.doc) == ["m0", "m4", "m5", "m6"]
    agent.gossip.node = None
    assert svc._online(agent.inventory.inventory.doc) == ["m0"]  # us, alone
    assert calls == []


def test_an_installed_generation_is_not_written_again_each_round(tmp_path, monkeypatch):
    from clanagent.secrets import files
    from clanagent.secrets.model import SecretInstance
    from clanagent.secrets.planner import Install, Plan

    keys = [bytes([i + 1]) * 32 for i in range(3)]
    agent = fake_agent(keys, str(tmp_path))
    svc = SecretsService(agent)
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
