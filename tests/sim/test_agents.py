"""Whole agents in the simulator: a clan of ~50 founded, edited and watched.

Each test is one trio run on a MockClock (`tests/sim/agents.run_sim`): the
virtual seconds below cost only the work done in them. Every agent runs the
real gossip node, store, inventory manager and record checks, and (where a
test gives `ALL_SERVICES`) the real secrets, services, VM (in-memory
backend) and topology parts, behind the same ports the real agent builds
(clanagent/ports.py).
"""

from __future__ import annotations

import copy

import nacl.signing
import pytest
import trio

from clanagent.gossip.config import GossipConfig
from clanagent.inventory import RECORD_KIND
from clanagent.secrets.record import SECRET_KIND
from tests.sim.agents import (
    ALL_SERVICES,
    AgentSim,
    backup_service,
    genesis_doc,
    run_sim,
    sign_version,
    vm_entry,
)

N = 50
ADMIN = nacl.signing.SigningKey(bytes([7]) * 32)


def secret_files(sim: AgentSim, addr: str) -> dict[str, bytes]:
    d = sim[addr].workdir / "run" / "secrets" / "backup" / "repokey"
    if not d.is_dir():
        return {}
    return {
        p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
    }


def version(doc, parents, msg):
    return sign_version(doc, parents, msg, ADMIN)


def inventory_record(sim: AgentSim, addr: str, v):
    return sim[addr].store.get(sim[addr].identity.public_key, RECORD_KIND, v.hash.hex())


async def found(sim: AgentSim, nursery: trio.Nursery, *, timeout: float = 60.0):
    """Start every agent, let n0 found the clan; return the genesis version."""
    await sim.start(nursery)
    assert await sim.wait_for(sim.converged, timeout), "membership did not converge"
    g = version(genesis_doc(sim), [], "genesis")
    sim["n0"].submit_inventory(g)
    rec = inventory_record(sim, "n0", g)
    assert rec is not None
    assert await sim.wait_for(lambda: sim.all_hold(rec), 30), sim.spread(rec)
    return g


def test_whole_agents_found_a_clan_and_converge_on_an_edit(tmp_path):
    async def main():
        sim = AgentSim(
            N,
            admins=[bytes(ADMIN.verify_key)],
            seed=1,
            workdir=tmp_path,
            service_starters=ALL_SERVICES,
        )
        async with trio.open_nursery() as nursery:
            g = await found(sim, nursery)
            # every agent admitted: the head is the genesis and names all of them
            assert all(a.inventory.head.leaves == (g.hash,) for a in sim.live())
            assert all(len(a.inventory.inventory.machines) == N for a in sim.live())
            assert all(a.ports.me() == a.addr for a in sim.live())
            # an edit on another machine reaches everyone
            doc = copy.deepcopy(g.doc)
            doc["machines"]["n7"]["tags"] = ["base", "edited"]
            v2 = version(doc, [g.hash], "tag n7")
            t0 = trio.current_time()
            sim["n13"].submit_inventory(v2)
            rec = inventory_record(sim, "n13", v2)
            assert await sim.wait_for(
                lambda: all(a.inventory.head.leaves == (v2.hash,) for a in sim.live()), 30
            )
            assert sim.all_hold(rec)
            spread = sim.spread(rec)
            print(f"edit spread: {spread}, now {trio.current_time():.1f}")
            assert spread["missing"] == [] and spread["seconds"] <= trio.current_time() - t0
            assert all(
                a.inventory.inventory.machines["n7"].tags == ("base", "edited")
                or list(a.inventory.inventory.machines["n7"].tags) == ["base", "edited"]
                for a in sim.live()
            )
            # a service with a shared secret: exactly one server generates
            # it, its record reaches every machine, both servers install it
            doc3 = copy.deepcopy(v2.doc)
            servers = ["n1", "n2", "n30"]
            doc3["services"]["backup"] = backup_service(servers, ["n3"])
            v3 = version(doc3, [v2.hash], "backup service")
            sim["n40"].submit_inventory(v3)

            def secret_records():
                return [
                    r for r in sim["n0"].store.of_kind(SECRET_KIND) if r.key == "backup/repokey"
                ]

            assert await sim.wait_for(
                lambda: secret_records() and sim.all_hold(secret_records()[0]), 60
            ), [secret_records(), sim.spread(secret_records()[0]) if secret_records() else None]
            (srec,) = secret_records()
            generated = {a.addr: a.parts["secrets"].stats["generated"] for a in sim.live()}
            assert sum(generated.values()) == 1, generated
            (generator,) = [a for a, n in generated.items() if n]
            assert generator in servers
            assert srec.origin == sim[generator].identity.public_key
            assert await sim.wait_for(lambda: all(secret_files(sim, a) for a in servers), 30), {
                a: secret_files(sim, a) for a in servers
            }
            values = [secret_files(sim, a)["password"] for a in servers]
            assert len(values[0]) == 24 and values.count(values[0]) == len(servers)
            assert secret_files(sim, "n3") == {}  # a client is no holder
            print(f"secret {srec.key} spread: {sim.spread(srec)}")
            # a VM placed on n9 by a tag: its host boots it (the in-memory
            # backend) and its status record reaches every machine
            doc4 = copy.deepcopy(v3.doc)
            doc4["machines"]["n9"]["tags"] = ["base", "vmhost"]
            doc4["vms"]["web"] = vm_entry(tmp_path, ["vmhost"])
            v4 = version(doc4, [v3.hash], "a VM on n9")
            sim["n0"].submit_inventory(v4)
            n9 = sim["n9"]

            def vm_status():
                return n9.store.get(n9.identity.public_key, "vm-status", "web")

            def running_everywhere():
                st = vm_status()
                return (
                    st is not None
                    and st.body["state"] == "running"
                    and st.body["machine"] == "n9"
                    and sim.all_hold(st)
                )

            assert await sim.wait_for(running_everywhere, 60), vm_status()
            assert n9.parts["vm_host"].started == ["web"]
            assert all(a.parts["vm_host"].started == [] for a in sim.live() if a is not n9)
            vrec = vm_status()
            print(f"vm-status spread: {sim.spread(vrec)}")
            rows = sim["n44"].vm_list()
            assert [(r["vm"], r["machine"], r["state"]) for r in rows] == [
                ("web", "n9", "running")
            ], rows
            assert sim.false_deaths() == []
            # no part's handler failed, no node hit an internal error
            assert all(a.bus.subscriptions.faults == 0 and a.faults == 0 for a in sim.live())
            assert all(a.node.stats["internal_errors"] == 0 for a in sim.live())
            # records were checked by the real body rules, none refused
            assert all(a.record_stats["checked"] > 0 for a in sim.live())
            assert sum(a.record_stats["refused"] for a in sim.live()) == 0
            nursery.cancel_scope.cancel()

    run_sim(main)


def test_a_broken_delivery_path_is_not_counted_as_converged():
    async def main():
        sim = AgentSim(12, admins=[bytes(ADMIN.verify_key)], seed=2, config=GossipConfig.local())
        async with trio.open_nursery() as nursery:
            g = await found(sim, nursery)
            sim.net.blackhole("n5")  # every datagram to n5 is lost from now on
            doc = copy.deepcopy(g.doc)
            doc["machines"]["n3"]["tags"] = ["base", "x"]
            v2 = version(doc, [g.hash], "tag n3")
            sim["n1"].submit_inventory(v2)
            rec = inventory_record(sim, "n1", v2)
            everyone = [a.addr for a in sim.live()]
            assert not await sim.wait_for(lambda: sim.all_hold(rec, everyone), 20)
            spread = sim.spread(rec, everyone)
            assert spread["missing"] == ["n5"]
            assert spread["holders"] == len(everyone) - 1
            assert spread["seconds"] is None
            assert sim.arrivals.arrived_at("n5", rec) is None
            assert sim["n5"].inventory.head.leaves == (g.hash,)
            nursery.cancel_scope.cancel()

    run_sim(main)


def test_a_crashed_whole_agent_is_marked_dead_by_all_and_its_link_goes_down(tmp_path):
    async def main():
        sim = AgentSim(
            N,
            admins=[bytes(ADMIN.verify_key)],
            seed=3,
            workdir=tmp_path,
            service_starters=ALL_SERVICES,
        )
        async with trio.open_nursery() as nursery:
            await found(sim, nursery)
            observer = sim["n2"]

            def topology_of(agent):
                return agent.store.get(agent.identity.public_key, "topology", "")

            # every machine publishes its view; n2's says "other" (the simulated
            # gossip addresses) for every link, with no exceptions and no RTTs
            assert await sim.wait_for(
                lambda: (
                    topology_of(observer) is not None
                    and topology_of(observer).body["kind"] == "other"
                    and sim.all_hold(topology_of(observer))
                ),
                30,
            )
            before = topology_of(observer)
            assert before.body["links"] == []
            victim = sim["n21"]
            crashed_at = trio.current_time()
            victim.crash()
            cfg = sim.config
            n = len(sim.agents)
            # memberlist's bound: a probe round to notice (stretched by
            # Lifeguard's awareness at worst), then the longest suspicion.
            bound = (
                cfg.probe_interval * cfg.awareness_max_multiplier
                + cfg.suspicion_timeout(n) * cfg.suspicion_max_timeout_mult
            )
            assert await sim.wait_for(
                lambda: sim.detection_time("n21", crashed_at) is not None, bound
            )
            t = sim.detection_time("n21", crashed_at)
            assert 0 < t <= bound
            print(f"detected in {t:.2f} virtual s (bound {bound:.1f})")
            assert not victim.up
            assert sim.false_deaths() == []
            # the topology change: every live machine's map shows n21's links
            # down from its own membership, and no view had to be republished
            # for it (membership already told everyone)
            for agent in sim.live():
                edges = agent.parts["topology"].view()["links"]
                to_victim = [e for e in edges if "n21" in (e["a"], e["b"])]
                assert len(to_victim) == n - 1, (agent.name, len(to_victim))
                assert all(e["kind"] == "down" for e in to_victim), to_victim
                others = [e for e in edges if "n21" not in (e["a"], e["b"])]
                assert others and all(e["kind"] == "other" for e in others)
            assert topology_of(observer).version == before.version
            nursery.cancel_scope.cancel()

    run_sim(main)


@pytest.mark.parametrize("n", [65, 300])
def test_admission_of_n_whole_agents(tmp_path, n):
    """65: more than 64 (a msgpack map limit once stopped clans at that size);
    300: the clan-size test of issue 13 (1000 runs in bench/agents_sim.py).
    Every agent is admitted, and the last machine's own records count
    everywhere: its topology view reaches every machine."""

    async def main():
        sim = AgentSim(
            n,
            admins=[bytes(ADMIN.verify_key)],
            seed=4,
            workdir=tmp_path,
            service_starters=ALL_SERVICES,
        )
        last = f"n{n - 1}"
        async with trio.open_nursery() as nursery:
            g = await found(sim, nursery, timeout=120.0)
            assert all(a.inventory.head.leaves == (g.hash,) for a in sim.live())
            assert all(len(a.inventory.inventory.machines) == n for a in sim.live())
            key = sim[last].identity.public_key
            assert all(a.inventory.admit_peer(key) is True for a in sim.live())
            assert await sim.wait_for(
                lambda: (
                    (rec := sim[last].store.get(key, "topology", "")) is not None
                    and sim.all_hold(rec)
                ),
                60,
            )
            assert all(a.record_stats["refused"] == 0 for a in sim.live())
            assert len(sim.live()) == n and sim.false_deaths() == []
            nursery.cancel_scope.cancel()

    run_sim(main)


def test_shared_record_decoding_shares_objects_and_still_verifies():
    from clanagent.wire import SignedRecord, WireError
    from tests.sim.agents import shared_record_decoding
    from tests.sim.cluster import seeded_identity

    ident = seeded_identity(0, 1)
    data = SignedRecord.create(ident, "note", "k", 1, {"v": 1}).encode()
    forged = bytearray(data)
    forged[-1] ^= 1
    with shared_record_decoding():
        a = SignedRecord.decode(data)
        assert SignedRecord.decode(data, verify=False) is a
        SignedRecord.decode(bytes(forged), verify=False)  # parses: the check is verify's
        with pytest.raises(WireError):
            SignedRecord.decode(bytes(forged))
    assert SignedRecord.decode(data) is not a  # back to one object per decode
