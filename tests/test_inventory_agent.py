"""The inventory inside running agents: founding, joining, admission, removal."""

from __future__ import annotations

import copy
import time

import nacl.signing
import pytest
import trio

from clanagent.agent import Agent
from clanagent.config import Config, ControlConfig, GossipSection, MeshSection
from clanagent.control.client import ClientError, ControlClient
from clanagent.identity import load_or_create
from clanagent.inventory import (
    Anchor,
    make_version,
    parse_token,
    reseal_doc,
    save_anchor,
)
from clanagent.wire import pack

pytestmark = pytest.mark.integration


def cfg_for(tmp_path, i: int) -> Config:
    return Config(
        state_dir=str(tmp_path / f"s{i}"),
        control=ControlConfig(socket=str(tmp_path / f"c{i}.sock")),
        # loopback only: no mDNS on the host's LAN, no WireGuard interface per agent
        mesh=MeshSection(wireguard=False, mdns=False),
        gossip=GossipSection(listen="127.0.0.1:0", profile="local", name=f"m{i}"),
    )


async def start(nursery, cfg) -> tuple[Agent, trio.CancelScope]:
    agent = Agent(cfg)
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await agent.run(task_status=task_status)

    await nursery.start(run)
    return agent, scope


async def call(agent: Agent, method: str, params=None):
    def go():
        with ControlClient(agent.cfg.control.socket, timeout=10) as c:
            return c.call(method, params)

    return await trio.to_thread.run_sync(go)


async def wait_until(pred, what: str, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


def machine_entry(ident, tags, endpoints=()) -> dict:
    return {
        "node_key": ident.public_key,
        "box_key": ident.box_public,
        "wg_key": ident.wg_public,
        "tags": sorted(tags),
        "endpoints": list(endpoints),
        "sealed_endpoints": b"",
        "public": True,
    }


def genesis(admin, machines: dict, clan_id=b"\x01" * 16, threshold=1, admins=None) -> dict:
    return {
        "format": 1,
        "clan": {
            "id": clan_id,
            "name": "test",
            "admins": sorted(admins or [bytes(admin.verify_key)]),
            "threshold": threshold,
        },
        "machines": machines,
        "networks": {"default": ["lan", "public", "tor"], "by_tag": {}},
        "services": {},
        "vms": {},
    }


async def submit(agent, doc, parents, keys, *, init=False, seal=True):
    if seal:
        plain = {n: m["endpoints"] for n, m in doc["machines"].items() if m["endpoints"]}
        doc = reseal_doc(doc, plain)
    v = make_version(doc, parents, int(time.time()), "test", keys)
    return v, await call(agent, "inventory.submit", {"version": v.to_wire(), "init": init})


async def test_found_join_admit_and_remove(tmp_path):
    admin = nacl.signing.SigningKey.generate()
    idents = {i: load_or_create(tmp_path / f"s{i}")[0] for i in (1, 2, 3)}
    with trio.fail_after(90):
        async with trio.open_nursery() as n:
            a1, _ = await start(n, cfg_for(tmp_path, 1))
            doc = genesis(admin, {"m1": machine_entry(idents[1], ["server"], ["192.0.2.10:7946"])})
            v1, r = await submit(a1, doc, [], [admin], init=True)
            assert r["status"] == "accepted"
            assert (await call(a1, "status"))["clan"]["id"] == doc["clan"]["id"].hex()

            # add m2 and m3; m2 joins with its token; m3 gets the anchor but is then removed
            doc2 = copy.deepcopy(v1.doc)
            doc2["machines"]["m2"] = machine_entry(idents[2], ["laptop"])
            doc2["machines"]["m3"] = machine_entry(idents[3], ["laptop"])
            plain = await call(a1, "inventory.endpoints")
            assert plain == {"m1": ["192.0.2.10:7946"]}  # a member opens the sealed endpoints
            doc2 = reseal_doc(doc2, plain)
            v2, r = await submit(a1, doc2, [v1.hash], [admin], seal=False)
            token = parse_token((await call(a1, "invite", {"machine": "m2"}))["token"])
            assert token.clan_id == doc["clan"]["id"] and token.seeds == (a1.gossip.addr,)
            for i in (2, 3):
                save_anchor(
                    tmp_path / f"s{i}",
                    Anchor(token.clan_id, token.name, token.admins, token.seeds, f"m{i}"),
                )
            a2, _ = await start(n, cfg_for(tmp_path, 2))
            a3, s3 = await start(n, cfg_for(tmp_path, 3))

            def names(agent):
                return {p["name"] for p in agent.node.peers() if p["state"] == "alive"}

            await wait_until(
                lambda: names(a1) == {"m2", "m3"} and names(a2) == {"m1", "m3"},
                "all three admitted",
            )
            # m2 learned the inventory by gossip and can read m1's sealed endpoint
            await wait_until(
                lambda: (
                    a2.inventory.inventory is not None and "m3" in a2.inventory.inventory.machines
                ),
                "inventory at m2",
            )
            assert (await call(a2, "inventory.endpoints"))["m1"] == ["192.0.2.10:7946"]
            rows = {r["name"]: r for r in await call(a2, "machines")}
            assert rows["m1"]["online"] and rows["m1"]["tags"] == ["server"]

            # remove m3: within one gossip interval its sessions are closed ...
            doc3 = copy.deepcopy(v2.doc)
            del doc3["machines"]["m3"]
            doc3 = reseal_doc(doc3, {"m1": ["192.0.2.10:7946"]})
            v3, r = await submit(a1, doc3, [v2.hash], [admin], seal=False)
            m3_id = idents[3].node_id
            await wait_until(
                lambda: (
                    m3_id not in a1.gossip._links
                    and a2.inventory.inventory is not None
                    and "m3" not in a2.inventory.inventory.machines
                ),
                "m3 cut off",
                5,
            )
            await wait_until(lambda: m3_id not in a2.gossip._links, "m3 cut off at m2", 5)
            # ... its new records are refused, and it cannot come back
            # (a kind every agent takes from a member: only the removal refuses it)
            from clanagent.mesh.candidates import endpoints_body

            held = a1.store.get(idents[3].public_key, "endpoints", "")
            before = None if held is None else held.version
            a3.gossip.publish("endpoints", "", endpoints_body(["192.0.2.33:7946"], [], None))
            await trio.sleep(1.5)
            held = a1.store.get(idents[3].public_key, "endpoints", "")
            assert (None if held is None else held.version) == before
            assert a1.admit_peer(idents[3].public_key) is False
            assert a1.admit_peer(idents[2].public_key) is True
            # a new version cannot be made without the admin key
            intruder = nacl.signing.SigningKey.generate()
            doc4 = copy.deepcopy(v3.doc)
            doc4["machines"]["m3"] = machine_entry(idents[3], ["evil"])
            with pytest.raises(ClientError) as exc:
                await submit(a1, doc4, [v3.hash], [intruder], seal=False)
            assert "under-signed" in exc.value.message or "signature" in exc.value.message
            n.cancel_scope.cancel()


async def test_submit_errors_are_clear(tmp_path):
    admin = nacl.signing.SigningKey.generate()
    other = nacl.signing.SigningKey.generate()
    ident = load_or_create(tmp_path / "s1")[0]
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            a1, _ = await start(n, cfg_for(tmp_path, 1))
            doc = genesis(admin, {"m1": machine_entry(ident, [])})
            with pytest.raises(ClientError) as exc:  # not in a clan and not init
                await submit(a1, doc, [], [admin])
            assert "not in a clan yet" in exc.value.message
            with pytest.raises(ClientError) as exc:
                await call(a1, "inventory.submit", {"version": {"doc": 1}})
            assert exc.value.code == "invalid_params" and "malformed" in exc.value.message
            # threshold 2 with one signature
            two = genesis(
                admin,
                {"m1": machine_entry(ident, [])},
                threshold=2,
                admins=[bytes(admin.verify_key), bytes(other.verify_key)],
            )
            with pytest.raises(ClientError) as exc:
                await submit(a1, two, [], [admin], init=True)
            assert "under-signed" in exc.value.message
            assert (await call(a1, "status"))["clan"] is None  # nothing was kept
            v, r = await submit(a1, two, [], [admin, other], init=True)
            assert r["status"] == "accepted"
            with pytest.raises(ClientError) as exc:
                await submit(a1, two, [], [admin, other], init=True)
            assert "already belongs" in exc.value.message
            # an invalid document is never accepted
            bad = copy.deepcopy(v.doc)
            bad["machines"]["m1"]["tags"] = ["Not A Tag"]
            with pytest.raises(ClientError) as exc:
                await submit(a1, bad, [v.hash], [admin, other])
            assert "invalid" in exc.value.message
            hist = await call(a1, "inventory.history")
            assert len(hist) == 1
            n.cancel_scope.cancel()


def test_a_non_member_learns_no_address_from_the_inventory(tmp_path):
    admin = nacl.signing.SigningKey.generate()
    ident = load_or_create(tmp_path / "s1")[0]
    doc = genesis(admin, {"m1": machine_entry(ident, [], ["198.51.100.77:7946"])})
    sealed = reseal_doc(doc, {"m1": ["198.51.100.77:7946"]})
    from clanagent.inventory import doc_to_toml, open_doc_endpoints

    public_copy = doc_to_toml(sealed)  # what an admin might keep in a public repository
    for needle in ("198.51.100.77", "7946"):
        assert needle not in public_copy
        assert needle.encode() not in pack(sealed)
    stranger = load_or_create(tmp_path / "s9")[0]
    assert open_doc_endpoints(sealed, stranger.public_key, stranger.box_key) == {}
    assert open_doc_endpoints(sealed, ident.public_key, ident.box_key) == {
        "m1": ["198.51.100.77:7946"]
    }


async def test_an_idle_agent_does_not_spin(tmp_path):
    """The gossip timer loop sleeps until its next deadline: an idle agent uses
    almost no CPU (it once woke itself on every tick and burned a whole core)."""
    import collections

    steps: collections.Counter[str] = collections.Counter()

    class CountSteps(trio.abc.Instrument):
        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            steps[task.name.rsplit(".", 1)[-1]] += 1

    admin = nacl.signing.SigningKey.generate()
    async with trio.open_nursery() as n:
        agent, _ = await start(n, cfg_for(tmp_path, 1))
        ident = agent.identity
        doc = genesis(admin, {"m1": machine_entry(ident, [])})
        v = make_version(doc, [], int(time.time()), "genesis", [admin])
        await call(agent, "inventory.submit", {"version": v.to_wire(), "init": True})
        await trio.sleep(1.5)  # settle: the first records go out
        counter = CountSteps()
        trio.lowlevel.add_instrument(counter)
        t0 = time.process_time()
        await trio.sleep(2.0)
        cpu = time.process_time() - t0
        trio.lowlevel.remove_instrument(counter)
        n.cancel_scope.cancel()
    # the local profile's fastest timer is 0.1 s: a few dozen wake-ups, not thousands
    assert steps["_timer_loop"] < 200, steps.most_common(5)
    assert cpu < 1.0, f"an idle agent used {cpu:.2f} s of CPU in 2 s"


async def test_clan_init_while_the_first_gossip_start_is_under_way(tmp_path, monkeypatch):
    """The control socket serves before the network parts are up: a `clan init`
    that arrives while gossip is still starting waits for it, then restarts
    gossip under the new clan (it cancelled the half-started run and ended
    the agent with "child exited without calling task_status.started()")."""
    from clanagent.gossip import service as gossip_service

    slow = trio.Event()
    original = gossip_service.GossipService._load_peer_book

    async def held_once(self):
        if not slow.is_set():
            slow.set()
            await trio.sleep(1.0)  # the first start is still under way
        await original(self)

    monkeypatch.setattr(gossip_service.GossipService, "_load_peer_book", held_once)
    admin = nacl.signing.SigningKey.generate()
    ident = load_or_create(tmp_path / "s1")[0]
    cfg = cfg_for(tmp_path, 1)
    agent = Agent(cfg)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(agent.run)
            await slow.wait()
            doc = genesis(admin, {"m1": machine_entry(ident, ["server"])})
            _, r = await submit(agent, doc, [], [admin], init=True)
            assert r["status"] == "accepted"
            status = await call(agent, "status")
            assert status["clan"]["id"] == doc["clan"]["id"].hex()
            assert agent.gossip is not None and agent.gossip.node is not None
            assert agent.gossip.clan == doc["clan"]["id"]
            # The parts that started meanwhile published under the new clan
            # only (the mesh once signed its endpoints record with the
            # default clan id, which every peer refused).
            await trio.sleep(1.0)
            kinds = {r.kind for r in agent.store.records()}
            assert {"node-info", "inventory", "endpoints"} <= kinds, kinds
            assert {r.clan for r in agent.store.records()} == {doc["clan"]["id"]}
            agent.stop()
