"""Record bodies are checked, not only signatures (issue 12, item 3).

Every record kind the agent publishes has one spec in clanagent.records; a
valid record of each kind -- made by the agent's own producer code, so the
registry cannot drift from what the agent sends -- passes, and every
structured-but-wrong body is a Refusal, never another exception.  The
semantic rules (one rotation per request, no far-future timestamps, VM
state only from the VM's host) hold both in the check and in the parts that
consume the records (defence in depth).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import nacl.signing
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clanagent import records
from clanagent.agent import Agent, TrioClock
from clanagent.identity import Identity, load_or_create
from clanagent.inventory import Anchor, make_version
from clanagent.inventory.manager import InventoryManager
from clanagent.ports import Ports
from clanagent.records import MAX_FUTURE_SKEW, RecordContext, Refusal, validate
from clanagent.secrets.planner import plan
from clanagent.secrets.record import build_rotate_request
from clanagent.store import Store
from clanagent.wire import NodeInfo, SignedRecord

from .test_inventory_agent import genesis, machine_entry
from .test_secrets_agent import backup_service
from .test_secrets_planner import SHARED, T0, _chosen, make_clan, publish, tasks
from .test_services_agent import cfg_for

# ------------------------------------------------------------------ a clan in memory


def vm_decl(machines=("m1",)) -> dict:
    return {
        "machines": list(machines),
        "tags": [],
        "count": 1,
        "vcpus": 1,
        "memory_mb": 128,
        "kernel": "/nonexistent/vmlinuz",
        "initrd": "",
        "rootfs": "",
        "disk_mb": 0,
        "networks": [],
        "secrets": [],
        "backend": "auto",
        "graphics": False,
    }


def make_agents(tmp_path) -> tuple[nacl.signing.SigningKey, Anchor, Any, dict[int, Agent]]:
    """Three agents (m1..m3) that share one inventory, not started: no sockets, no gossip.

    The inventory holds the backup service (a shared secret on m1, m2) and
    VM "web", placed on m1."""
    admin = nacl.signing.SigningKey.generate()
    idents = {i: load_or_create(tmp_path / f"s{i}")[0] for i in (1, 2, 3)}
    doc = genesis(admin, {f"m{i}": machine_entry(idents[i], ["server"]) for i in (1, 2, 3)})
    svc = backup_service()
    del svc["secrets"]["broken"]
    doc["services"]["backup"] = svc
    doc["vms"]["web"] = vm_decl()
    version = make_version(doc, [], int(time.time()), "test", [admin])
    anchor = Anchor(doc["clan"]["id"], "test", tuple(doc["clan"]["admins"]))
    agents = {}
    for i, ident in idents.items():
        a = Agent(cfg_for(tmp_path, i))
        a.identity, a.store, a.anchor = ident, Store(None), anchor
        a.inventory = InventoryManager(anchor)
        a.inventory.offer_version(version)
        assert a.inventory.inventory is not None
        a.ports = ports_of(a)
        agents[i] = a
    return admin, anchor, version, agents


def ports_of(agent: Agent) -> Ports:
    """The ports `Agent.run` builds, for an agent that is not started."""
    return agent.make_ports()


def vm_service(agent: Agent) -> Any:
    from clanagent.vmhost.service import VmService

    return VmService(agent.ports, state_dir=agent.cfg.state_dir, runtime_dir=agent.cfg.runtime_dir)


def own(agent: Agent, kind: str, key: str | None = None) -> SignedRecord:
    assert agent.identity is not None and agent.store is not None
    recs = [
        r
        for r in agent.store.by_origin(agent.identity.public_key)
        if r.kind == kind and (key is None or r.key == key)
    ]
    assert recs, f"{kind} was not published"
    return recs[-1]


async def produce_every_kind(tmp_path) -> tuple[dict[int, Agent], dict[str, SignedRecord]]:
    """One record of every kind, each made by the code that makes it in the agent."""
    from clanagent import __version__
    from clanagent.mesh import candidates as cands
    from clanagent.ports import Ports
    from clanagent.secrets.service import SecretsService
    from clanagent.services.wiring import EXPORT_KIND, export_body
    from clanagent.vmhost.requests import sign_request

    admin, anchor, version, agents = make_agents(tmp_path)
    a1, a2 = agents[1], agents[2]
    out: dict[str, SignedRecord] = {}

    # inventory: what `clanctl inventory apply` makes the agent publish
    fresh = Agent(cfg_for(tmp_path, 9))
    fresh.identity, fresh.store, fresh.anchor = a1.identity, Store(None), anchor
    fresh.inventory = InventoryManager(anchor)
    await fresh.inventory_api.submit(version.to_wire(), False)
    out["inventory"] = own(fresh, "inventory")

    # node-info: as the gossip service says it (gossip/service.py)
    info = NodeInfo(name=a1.name, version=__version__, addrs=["127.0.0.1:7946"])
    assert await a1.publish_record("node-info", "", info.to_wire())
    out["node-info"] = own(a1, "node-info")

    # endpoints (mesh/service.py)
    body = cands.endpoints_body(["192.0.2.1:7946"], ["198.51.100.1:7946"], 51820, b"")
    assert await a1.publish_record(cands.ENDPOINTS_KIND, "", body)
    out["endpoints"] = own(a1, "endpoints")

    # nat (mesh/nat.py): an observation of m2 sealed to it, a punch request, a
    # relay ask and a grant, as the mesh service builds them
    from clanagent.inventory.sealing import recipients_of, seal_endpoints
    from clanagent.mesh import nat

    k2, k3 = a2.identity.public_key, agents[3].identity.public_key
    body = nat.nat_body(
        seen=[(k2, nat.seal_seen("203.0.113.7:51820", a2.identity.box_public))],
        reflexive=seal_endpoints(["198.51.100.7:51820"], recipients_of(a1.inventory.inventory.doc)),
        punch=[(k2, int(time.time() * 1000) + 3000, 1)],
        relay_ask=[(k2, k3)],
        relays=[(*sorted((k2, k3)), 40001, 40002)],
    )
    assert await a1.publish_record(nat.NAT_KIND, "", body)
    out["nat"] = own(a1, "nat")

    # topology: the real service's publish
    assert await a1._topology_service().publish_once()
    out["topology"] = own(a1, "topology")

    # export (services/service.py publishes export_body)
    body = export_body("backup", "server", "m1", {"port": "22"})
    assert await a1.publish_record(EXPORT_KIND, "backup.server", body)
    out["export"] = own(a1, EXPORT_KIND)

    # secret + secret-rotate: the secrets service, alone online
    ports = Ports(
        clock=TrioClock(),
        identity=a1.identity,
        store=a1.store,
        bus=a1.bus,
        members=a1.membership,
        inventory=a1.inventory,
        events=a1.events_bus,
    )
    a1.secrets = SecretsService(ports, runtime_dir=a1.cfg.runtime_dir)
    await a1.secrets.sync_once()
    out["secret"] = own(a1, "secret", "backup/repokey")
    reply = await a1.secrets.request_rotation("backup/repokey")
    assert reply["generation"] == 1
    out["secret-rotate"] = own(a1, "secret-rotate")

    # vm-request: an admin's signed order through the agent
    req = sign_request(admin, "web", "stop", int(time.time()))
    await a2.vm_api.request(req.to_wire())
    out["vm-request"] = own(a2, "vm-request")

    # vm-logs-request: a read of a VM hosted elsewhere
    a2.vms = SimpleNamespace(handles={})
    assert await a2.vm_api.logs("web", int(time.time())) == {"pending": True}
    out["vm-logs-request"] = own(a2, "vm-logs-request")

    # vm-status and vm-logs: the VM service of the host, m1
    vms = vm_service(a1)
    vms._errors = {"web": "no backend here"}
    await vms._publish_status()
    out["vm-status"] = own(a1, "vm-status")
    a1.store.put(out["vm-logs-request"])
    vms.handles = {"web": SimpleNamespace()}
    vms.local_tail = lambda name, max_bytes=16 * 1024: b"booting\nVM_READY\n"
    await vms._answer_log_requests()
    out["vm-logs"] = own(a1, "vm-logs")
    return agents, out


async def test_every_kind_as_the_agent_makes_it_passes(tmp_path):
    agents, made = await produce_every_kind(tmp_path)
    assert set(made) == set(records.KINDS), "a kind without a producer here, or vice versa"
    judge = agents[3]
    for kind, rec in made.items():
        judge.validate_record(rec)  # raises Refusal if not
        assert judge.record_stats["refused"] == 0, kind
    for a in agents.values():
        assert a.record_stats["own_refusals"] == 0
    assert judge.record_stats["checked"] == len(made)


def test_unknown_kind_refused():
    ident = Identity.generate()
    rec = SignedRecord.create(ident, "junk-kind", "x", 1, {"a": 1})
    with pytest.raises(Refusal) as exc:
        validate(rec, RecordContext(now=time.time()))
    assert not exc.value.transient


# ------------------------------------------------------------------ timestamps


async def test_far_future_timestamps_refused(tmp_path):
    agents, made = await produce_every_kind(tmp_path)
    judge = agents[3]
    far = int(time.time()) + MAX_FUTURE_SKEW + 3600
    cases = {
        "topology": ("at", agents[1]),
        "vm-status": ("at", agents[1]),
        "vm-logs": ("at", agents[1]),
        "vm-logs-request": ("at", agents[2]),
        "secret-rotate": ("requested", agents[1]),
    }
    for kind, (field, maker) in cases.items():
        rec = made[kind]
        body = {**rec.body, field: far}
        forged = SignedRecord.create(maker.identity, kind, rec.key, 99, body, clan=rec.clan)
        with pytest.raises(Refusal) as exc:
            judge.validate_record(forged)
        assert not exc.value.transient, kind
        assert "future" in exc.value.reason
        # ... and the agent will not publish such a record of its own
        assert not await maker.publish_record(kind, rec.key, body)
    near = {**made["topology"].body, "at": int(time.time()) + MAX_FUTURE_SKEW - 10}
    ok = SignedRecord.create(
        agents[1].identity, "topology", "", 99, near, clan=made["topology"].clan
    )
    judge.validate_record(ok)


# ------------------------------------------------------------------ runaway rotation


async def test_huge_rotation_generation_refused_by_validate(tmp_path):
    agents, made = await produce_every_kind(tmp_path)
    judge, member = agents[3], agents[2]
    inst = "backup/repokey"
    # the judge knows generation 1 (from m1)
    judge.store.put(made["secret"])
    now = int(time.time())
    for generation, transient in ((2**62, False), (2**48 + 1, False), (5, True)):
        rec = build_rotate_request(member.identity, inst, generation, now, clan=made["secret"].clan)
        with pytest.raises(Refusal) as exc:
            judge.validate_record(rec)
        assert exc.value.transient is transient, generation
    for generation in (1, 2):  # the current one, or the next (a member that saw it first)
        judge.validate_record(build_rotate_request(member.identity, inst, generation, now))
    # a rotate request for a secret the inventory does not declare
    with pytest.raises(Refusal):
        judge.validate_record(build_rotate_request(member.identity, "nope/x/machine:m1", 1, now))


def test_rotate_request_with_huge_generation_rotates_once():
    clan = make_clan()
    online = ["a", "b", "c"]
    g = _chosen(clan, online)
    recs = {"svc/shared": [publish(clan, g, SHARED, 1, T0)]}
    req = {"svc/shared": [build_rotate_request(clan.ids["d"], "svc/shared", 2**62, T0 + 10)]}
    made = 0
    now = T0 + 20
    for _ in range(5):  # five rounds of the planner, each generating what it says
        now += 1
        ts = tasks(plan(clan.doc, g, online, recs, req, now))
        for t in ts:
            made += 1
            recs["svc/shared"].append(publish(clan, g, SHARED, t.generation, now))
    assert made <= 1


def test_rotate_request_rules_in_the_planner():
    clan = make_clan()
    online = ["a", "b", "c"]
    g = _chosen(clan, online)
    recs = {"svc/shared": [publish(clan, g, SHARED, 3, T0)]}

    def asks(generation, requested, now=T0 + 100):
        r = {
            "svc/shared": [build_rotate_request(clan.ids["d"], "svc/shared", generation, requested)]
        }
        return [t.reason for t in tasks(plan(clan.doc, g, online, recs, r, now))]

    assert asks(3, T0 + 10) == ["requested"]
    assert asks(4, T0 + 10) == ["requested"]  # the next one: a member saw it first
    assert asks(5, T0 + 10) == []  # beyond the next
    assert asks(3, T0 - 10) == []  # made before the current generation: spent
    assert asks(3, T0 + 1000) == []  # dated after now
    assert asks(3, 2**52) == []
    # in the second the current one was created (times are seconds): it names
    # the current one, so the rotation it causes spends it
    assert asks(3, T0) == ["requested"]
    # naming the next one, from that same second: it could be the one it
    # caused, so not again
    assert asks(4, T0) == []


# ------------------------------------------------------------------ VM state from its host only


async def test_forged_vm_status_and_logs_refused_and_not_shown(tmp_path):

    agents, made = await produce_every_kind(tmp_path)
    a1, forger, viewer = agents[1], agents[2], agents[3]
    clan = made["vm-status"].clan
    now = int(time.time())
    status = {**made["vm-status"].body, "state": "running", "reason": "forged", "at": now}
    tail = {"at": now + 5, "machine": "m1", "tail": b"FORGED"}
    # m2 speaks for m1's VM, naming m1 or itself
    for body in (status, {**status, "machine": "m2"}):
        rec = SignedRecord.create(forger.identity, "vm-status", "web", 50, body, clan=clan)
        with pytest.raises(Refusal):
            viewer.validate_record(rec)
        viewer.store.put(rec)  # as if a forwarder without the check stored it
    for body in (tail, {**tail, "machine": "m2"}):
        rec = SignedRecord.create(forger.identity, "vm-logs", "web", 51, body, clan=clan)
        with pytest.raises(Refusal):
            viewer.validate_record(rec)
        viewer.store.put(rec)
    # the viewer shows none of it
    viewer.vms = vm_service(viewer)
    rows = {(r["vm"], r["machine"]): r for r in viewer.vms.clan_vms()}
    assert rows == {("web", "m1"): rows[("web", "m1")]}
    assert rows[("web", "m1")]["state"] == "unknown"
    viewer.vms.handles = {}
    assert await viewer.vm_api.logs("web", now) == {"pending": True}
    # the host's own records are taken and shown
    for kind in ("vm-status", "vm-logs"):
        viewer.validate_record(made[kind])
        viewer.store.put(made[kind])
    rows = {(r["vm"], r["machine"]): r for r in viewer.vms.clan_vms()}
    assert rows[("web", "m1")]["state"] == "failed"
    got = await viewer.vm_api.logs("web", 0)
    assert got["machine"] == "m1" and got["tail"] == b"booting\nVM_READY\n"
    # without an inventory nobody can say where a VM runs: not now, not refused
    ctx = RecordContext(now=time.time(), inventory=None)
    with pytest.raises(Refusal) as exc:
        validate(made["vm-status"], ctx)
    assert exc.value.transient
    assert a1.record_stats["own_refusals"] == 0


async def test_oversized_log_tail_refused(tmp_path):
    agents, made = await produce_every_kind(tmp_path)
    rec = made["vm-logs"]
    body = {**rec.body, "tail": b"x" * (records.MAX_LOG_TAIL + 1)}
    big = SignedRecord.create(agents[1].identity, "vm-logs", "web", 77, body, clan=rec.clan)
    with pytest.raises(Refusal):
        agents[3].validate_record(big)


# ------------------------------------------------------------------ vm.logs is a read


async def test_vm_logs_with_huge_since_cannot_freeze_the_tail(tmp_path):
    """A read-level caller's vm.logs: bounded requests; the host's answers stay fresh."""

    agents, made = await produce_every_kind(tmp_path)
    a1, reader = agents[1], agents[3]
    reader.vms = SimpleNamespace(handles={})
    with trio.fail_after(10):
        replies = [await reader.vm_api.logs("web", 2**62) for _ in range(50)]
    assert all(r == {"pending": True} for r in replies)
    mine = reader.store.get(reader.identity.public_key, "vm-logs-request", "web")
    assert mine is not None and mine.body["at"] <= time.time() + 1  # clamped to now
    reader.validate_record(mine)
    # many calls, one request (rate-limited): versions did not run up
    assert reader.store.max_version(reader.identity.public_key) <= 2

    # a request that got into the clan from an older agent: 2**62
    old = SignedRecord.create(reader.identity, "vm-logs-request", "web", 1000, {"at": 2**62})
    a1.store.put(old)
    a1.store.delete(a1.identity.public_key, "vm-logs", "web")
    vms = vm_service(a1)
    vms.handles = {"web": SimpleNamespace()}
    tails = iter([b"first\n", b"first\nsecond\n"])
    vms.local_tail = lambda name, max_bytes=16 * 1024: next(tails)
    await vms._answer_log_requests()
    first = a1.store.get(a1.identity.public_key, "vm-logs", "web")
    assert (
        first.body["tail"] == b"first\n" and first.body["at"] <= time.time() + 1
    )  # our clock, not the request's
    # a later ordinary request gets a newer tail (the answer did not stand for it)
    later = int(time.time()) + 2
    a1.store.put(
        SignedRecord.create(agents[2].identity, "vm-logs-request", "web", 5, {"at": later})
    )
    vms._logs_answered.clear()
    while int(time.time()) < later:
        await trio.sleep(0.1)
    await vms._answer_log_requests()
    second = a1.store.get(a1.identity.public_key, "vm-logs", "web")
    assert second.body["tail"] == b"first\nsecond\n" and second.body["at"] >= later


# ------------------------------------------------------------------ wrong bodies: Refusal only

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
_wire = st.recursive(
    _scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def made_records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("records")
    return trio.run(produce_every_kind, tmp)


def _mutations(body):
    """Structured-but-wrong variants: each field dropped, or replaced."""
    if not isinstance(body, dict):
        return st.just(body)
    keys = sorted(body)
    return st.one_of(
        st.sampled_from(keys).map(lambda k: {x: v for x, v in body.items() if x != k}),
        st.tuples(st.sampled_from(keys), _wire).map(lambda kv: {**body, kv[0]: kv[1]}),
        st.tuples(st.text(max_size=8), _wire).map(lambda kv: {**body, kv[0]: kv[1]}),
        _wire,
    )


def _deep(data, value):
    """`value` with one nested item (in a map or a list, at any depth) replaced or dropped."""
    if isinstance(value, dict) and value and data.draw(st.integers(0, 3)) > 0:
        k = data.draw(st.sampled_from(sorted(value, key=repr)))
        if data.draw(st.integers(0, 5)) == 0:
            return {x: v for x, v in value.items() if x != k}
        return {**value, k: _deep(data, value[k])}
    if isinstance(value, list) and value and data.draw(st.integers(0, 3)) > 0:
        i = data.draw(st.integers(0, len(value) - 1))
        return [*value[:i], _deep(data, value[i]), *value[i + 1 :]]
    return data.draw(_wire)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_wrong_bodies_are_refused_never_crash(made_records, data):
    agents, made = made_records
    kind = data.draw(st.sampled_from(sorted(made)))
    rec = made[kind]
    body = data.draw(_mutations(rec.body))
    if data.draw(st.booleans()):
        body = _deep(data, rec.body)
    key = data.draw(st.one_of(st.just(rec.key), st.text(max_size=10)))
    signer = agents[1] if rec.origin == agents[1].identity.public_key else agents[2]
    if rec.origin not in (agents[1].identity.public_key, agents[2].identity.public_key):
        signer = agents[1]
    try:
        forged = SignedRecord.create(signer.identity, kind, key, 7, body, clan=rec.clan)
    except Exception:
        return  # not even a record (too big, bad key): the wire layer's business
    try:
        agents[3].validate_record(forged)
    except Refusal:
        pass


async def test_topology_view_dated_in_the_future_never_counts_as_fresh(tmp_path):

    agents, made = await produce_every_kind(tmp_path)
    a1, a2 = agents[1], agents[2]
    links = [{"peer": "m3", "kind": "tor"}]
    real = a1.inventory_api.machines
    a1.inventory_api.machines = lambda: [{**r, "online": True} for r in real()]

    def m2_m3_seen_by(at: int) -> set[str]:
        body = {"at": at, "kind": "lan", "links": links, "capabilities": []}
        a1.store.put(SignedRecord.create(a2.identity, "topology", "", at, body))
        edges = a1._topology_service().view()["links"]
        return {m for e in edges if (e["a"], e["b"]) == ("m2", "m3") for m in e["seen_by"]}

    assert m2_m3_seen_by(int(time.time())) == {"m2"}  # a fresh view counts
    assert m2_m3_seen_by(int(time.time()) + 10**6) == set()  # one from the future does not


def test_a_holders_generation_beyond_the_bound_never_counts():
    from clanagent.records import MAX_GENERATION

    clan = make_clan()
    online = ["a", "b", "c"]
    g = _chosen(clan, online)
    holder = next(m for m in ("a", "b", "c") if m != g)
    recs = {
        "svc/shared": [
            publish(clan, g, SHARED, 3, T0),
            publish(clan, holder, SHARED, MAX_GENERATION + 1, T0 + 5),
        ]
    }
    req = {"svc/shared": [build_rotate_request(clan.ids["d"], "svc/shared", 3, T0 + 10)]}
    (t,) = tasks(plan(clan.doc, g, online, recs, req, T0 + 20))
    assert t.reason == "requested" and t.generation == 4


async def test_vm_logs_over_the_control_socket_publishes_only_bounded_requests(tmp_path):
    """A real agent: `vm.logs` with a huge `since`, many times, from the control socket."""
    from .test_inventory_agent import call, start, submit, wait_until

    admin = nacl.signing.SigningKey.generate()
    ident = load_or_create(tmp_path / "s1")[0]
    doc = genesis(admin, {"m1": machine_entry(ident, ["server"])})
    doc["vms"]["web"] = vm_decl()
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            a1, _ = await start(n, cfg_for(tmp_path, 1))
            await submit(a1, doc, [], [admin], init=True)
            await wait_until(lambda: a1.vms is not None, "the VM service", 20)
            asked = []
            publish = a1.publish_record

            async def counting(kind, key, body):
                asked.append(kind)
                return await publish(kind, key, body)

            a1.publish_record = counting
            t0 = time.monotonic()
            for _ in range(30):
                assert await call(a1, "vm.logs", {"name": "web", "since": 2**62}) == {
                    "pending": True
                }
            # (gossip persists a record of ours in a worker thread: it lands shortly)
            await wait_until(
                lambda: a1.store.get(ident.public_key, "vm-logs-request", "web") is not None,
                "the request stored",
                5,
            )
            req = a1.store.get(ident.public_key, "vm-logs-request", "web")
            assert req.body["at"] <= time.time() + 1
            # 30 reads, at most one request per second per VM
            elapsed = time.monotonic() - t0
            assert 1 <= asked.count("vm-logs-request") <= int(elapsed) + 1
            assert a1.record_stats["own_refusals"] == 0
            n.cancel_scope.cancel()


def test_refusal_shapes():
    r = Refusal("vm-status", "not from its host")
    assert (r.kind, r.reason, r.transient, str(r)) == (
        "vm-status",
        "not from its host",
        False,
        "vm-status: not from its host",
    )
    t = Refusal("no inventory yet", transient=True)
    assert (t.kind, t.reason, t.transient) == ("", "no inventory yet", True)
    assert isinstance(t, ValueError)


async def test_an_export_for_a_role_its_machine_does_not_hold_is_not_taken(tmp_path):
    """m3 is a backup client: an export in its own name for backup.server is
    deferred (not stored, not scored: our inventory may be older than the one
    that gave it the role), while m2's, a server, is taken."""
    from clanagent.services.wiring import EXPORT_KIND, export_body

    agents, _made = await produce_every_kind(tmp_path)
    judge = agents[1]
    for i, ok in ((2, True), (3, False)):
        ident = agents[i].identity
        body = export_body("backup", "server", f"m{i}", {})
        rec = SignedRecord.create(ident, EXPORT_KIND, "backup.server", 7, body)
        if ok:
            judge.validate_record(rec)
        else:
            with pytest.raises(Refusal) as exc:
                judge.validate_record(rec)
            assert exc.value.transient and "does not hold backup.server" in str(exc.value)


async def test_a_steady_vm_status_is_republished_before_its_ttl_runs_out(tmp_path, autojump_clock):
    """vm-status is soft (held in memory, expired after its TTL): an unchanged
    status goes out again within its refresh interval, and not before."""
    from clanagent.records import spec
    from clanagent.vmhost.service import VM_STATUS_KIND

    _admin, _anchor, _version, agents = make_agents(tmp_path)
    host = agents[1]
    vms = vm_service(host)
    vms._errors = {"web": "no backend here"}

    async def versions() -> int:
        await vms._publish_status()
        return own(host, VM_STATUS_KIND, "web").version

    first = await versions()
    await trio.sleep(60)
    assert await versions() == first  # unchanged, not due: nothing new
    s = spec(VM_STATUS_KIND)
    assert s.refresh is not None and s.ttl is not None and s.refresh <= s.ttl / 2
    await trio.sleep(s.refresh)
    assert await versions() > first  # refreshed, well before the TTL
