"""Full agents gossiping over real WebSocket sessions on loopback."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from clanagent.agent import Agent
from clanagent.config import Config, ControlConfig, GossipSection, MeshSection

pytestmark = pytest.mark.integration


def make_cfg(tmp_path, i: int, join: list[str], **gossip) -> Config:
    return Config(
        state_dir=str(tmp_path / f"s{i}"),
        control=ControlConfig(socket=str(tmp_path / f"c{i}.sock")),
        # loopback only: no mDNS on the host's LAN, no WireGuard interface per agent
        mesh=MeshSection(wireguard=False, mdns=False),
        gossip=GossipSection(
            listen="127.0.0.1:0", join=join, profile="local", name=f"m{i}", **gossip
        ),
    )


async def start_agent(nursery, cfg) -> tuple[Agent, trio.CancelScope]:
    agent = Agent(cfg)
    scope = trio.CancelScope()

    async def run(task_status=trio.TASK_STATUS_IGNORED):
        with scope:
            await agent.run(task_status=task_status)

    await nursery.start(run)
    return agent, scope


async def wait_until(pred, what: str, timeout: float = 20.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.05)


def alive_peers(agent: Agent) -> set[str]:
    return {p["name"] for p in agent.node.peers() if p["state"] == "alive"}


async def test_three_agents_find_each_other_spread_records_and_detect_a_crash(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            a1, _ = await start_agent(n, make_cfg(tmp_path, 1, []))
            seed = a1.gossip.addr
            events: list[dict] = []

            async def collect():
                async for ev in a1.node.events():
                    events.append(ev)

            n.start_soon(collect)  # what `clanctl events` streams
            a2, _ = await start_agent(n, make_cfg(tmp_path, 2, [seed]))
            a3, s3 = await start_agent(n, make_cfg(tmp_path, 3, [seed]))
            agents = [a1, a2, a3]
            await wait_until(
                lambda: all(len(alive_peers(a)) == 2 for a in agents), "everyone sees 2 peers"
            )
            assert alive_peers(a2) == {"m1", "m3"}
            # each agent's node-info record reaches every store
            await wait_until(lambda: all(len(a.store) >= 3 for a in agents), "node-info records")
            # a new record published on one agent reaches the others, verified and durable
            # (a kind the agent knows: records of unknown kinds are refused)
            from clanagent.mesh.candidates import endpoints_body

            a2.gossip._publish("endpoints", "", endpoints_body(["127.0.0.1:1"], [], None))
            origin = a2.identity.public_key
            await wait_until(
                lambda: all(a.store.get(origin, "endpoints", "") for a in agents), "new record"
            )
            peers = {p["name"]: p for p in a1.node.peers()}
            assert peers["m2"]["incarnation"] >= 1 and peers["m2"]["addr"] == a2.gossip.addr
            # crash agent 3 (no graceful leave): the others declare it dead
            s3.cancel()
            await wait_until(
                lambda: all(
                    {p["name"]: p["state"] for p in a.node.peers()}.get("m3") == "dead"
                    for a in (a1, a2)
                ),
                "m3 declared dead",
                timeout=30,
            )
            assert a1.node.status()["members"]["alive"] == 2
            kinds = [(e["type"], e.get("name")) for e in events]
            assert ("member.joined", "m2") in kinds and ("member.joined", "m3") in kinds
            assert ("member.dead", "m3") in kinds or ("member.suspect", "m3") in kinds
            assert any(e["type"] == "record.accepted" and e["kind"] == "endpoints" for e in events)
            n.cancel_scope.cancel()
    # the record survived on disk: a fresh store over agent 1's state dir holds it
    from clanagent.store import Store

    held = Store.open(tmp_path / "s1" / "records").get(origin, "endpoints", "")
    assert held.body == endpoints_body(["127.0.0.1:1"], [], None)


async def test_wrong_clan_and_unadmitted_keys_are_refused(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            a1, _ = await start_agent(n, make_cfg(tmp_path, 1, [], clan_id="aa" * 16))
            seed = a1.gossip.addr
            other_clan, _ = await start_agent(n, make_cfg(tmp_path, 2, [seed], clan_id="bb" * 16))
            cfg3 = make_cfg(tmp_path, 3, [seed], clan_id="aa" * 16)
            a3, _ = await start_agent(n, cfg3)
            await wait_until(lambda: alive_peers(a1) == {"m3"}, "same-clan peer joins")
            await trio.sleep(2)
            assert alive_peers(other_clan) == set()
            assert "m2" not in {p["name"] for p in a1.node.peers()}
            assert other_clan.gossip.stats["dial_failures"] >= 1
            n.cancel_scope.cancel()
        # an agent that admits only itself and a1 refuses a stranger's key
        async with trio.open_nursery() as n:
            a4, _ = await start_agent(n, make_cfg(tmp_path, 4, []))
            a5, _ = await start_agent(n, make_cfg(tmp_path, 5, [a4.gossip.addr]))
            await wait_until(lambda: alive_peers(a4) == {"m5"}, "open clan joins")
            restricted = dataclasses.replace(
                make_cfg(tmp_path, 6, [a4.gossip.addr]),
            )
            restricted = dataclasses.replace(
                restricted,
                gossip=dataclasses.replace(
                    restricted.gossip, admitted_keys=[a5.identity.public_key.hex()]
                ),
            )
            a6, _ = await start_agent(n, restricted)
            await trio.sleep(3)
            assert alive_peers(a6) == set()  # a4 is not admitted by a6
            n.cancel_scope.cancel()


async def test_a_session_closed_under_the_writer_ends_only_that_link():
    """Sending on a session closed meanwhile (a dropped link, a stop) must end that
    link quietly; raised inside the link's nursery it took the whole agent down."""
    from types import SimpleNamespace

    from clanagent.gossip.errors import PeerDisconnected
    from clanagent.gossip.service import GossipService

    class ClosedSession:
        peer_node_id = "x" * 52

        async def send(self, data: bytes) -> None:
            raise PeerDisconnected("session is closed: closed locally")

    send, recv = trio.open_memory_channel(4)
    link = SimpleNamespace(recv=recv, session=ClosedSession(), in_flight=0)
    await send.send(b"gossip")
    svc = GossipService.__new__(GossipService)  # _writer needs no other state
    with trio.CancelScope() as scope:
        await svc._writer(link, scope)
    assert scope.cancel_called and link.in_flight == 0


def test_a_datagram_for_a_link_whose_writer_ended_is_dropped_not_raised():
    """Regression (found by the full suite, 2026-12-07): the writer of a
    link closes its receiving end as it ends, a moment before `_serve_link`
    takes the link out of the table; a datagram sent in that moment raised
    BrokenResourceError out of the timer loop and stopped the agent."""
    from clanagent.gossip.messages import SendTo
    from clanagent.gossip.service import GossipService, _Link

    class Session:
        peer_node_id = "y" * 52
        closed = False

    svc = GossipService.__new__(GossipService)
    svc.stats = {"dropped": 0}
    forgotten = []
    svc._forget = forgotten.append
    svc._by_addr = {}
    link = _Link(Session())
    svc._links = {Session.peer_node_id: link}
    link.recv.close()  # the writer ended
    svc._send(SendTo(Session.peer_node_id, "10.0.0.9:7946", b"ping"))
    assert svc.stats["dropped"] == 1 and link.dropped == 1
    assert forgotten == [link.session]


# -- issue 12: a fault in one peer's connection never stops the agent ----------------


def fail_once(real, exc: Exception):
    """`real`, except that its first call raises `exc`."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return real(*args, **kwargs)

    wrapper.calls = calls
    return wrapper


async def join_and_exchange(n, tmp_path, a1, prepare=None) -> Agent:
    """A second agent joins `a1`: both see each other and a record crosses."""
    a2, _ = await start_agent(n, make_cfg(tmp_path, 2, [a1.gossip.addr]))
    if prepare is not None:
        prepare(a2)  # before its first dial has finished the handshake
    await wait_until(lambda: alive_peers(a1) == {"m2"} and alive_peers(a2) == {"m1"}, "join")
    from clanagent.mesh.candidates import endpoints_body

    a2.gossip._publish("endpoints", "", endpoints_body(["192.0.2.2:7946"], [], None))
    await wait_until(
        lambda: (
            (r := a1.store.get(a2.identity.public_key, "endpoints", "")) is not None
            and "192.0.2.2:7946" in repr(r.body)
        ),
        "record",
        20,
    )
    return a2


async def test_a_fault_in_the_incoming_handler_ends_only_that_connection(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            a1, _ = await start_agent(n, make_cfg(tmp_path, 1, []))
            svc = a1.gossip
            svc._add_link = fail_once(svc._add_link, RuntimeError("bug on accept"))
            await join_and_exchange(n, tmp_path, a1)
            assert svc._add_link.calls and svc.counters()["internal_errors"] == 1
            n.cancel_scope.cancel()


async def test_a_fault_while_handling_a_peers_bytes_ends_only_that_session(tmp_path):
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            a1, _ = await start_agent(n, make_cfg(tmp_path, 1, []))
            node = a1.gossip.node
            # Raised inside the link's nursery: it arrives as an ExceptionGroup.
            node.receive = fail_once(node.receive, TypeError("unhashable type: 'list'"))
            await join_and_exchange(n, tmp_path, a1)
            assert node.receive.calls and a1.gossip.counters()["internal_errors"] == 1
            n.cancel_scope.cancel()


async def test_a_fault_in_the_dialer_ends_only_that_dial(tmp_path, monkeypatch):
    from clanagent.gossip import service

    monkeypatch.setattr(service, "connect", fail_once(service.connect, KeyError("bug in dial")))
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            a1, _ = await start_agent(n, make_cfg(tmp_path, 1, []))

            def prepare(a2):
                # ...and then its first new session (dialed or accepted) fails.
                a2.gossip._add_link = fail_once(a2.gossip._add_link, RuntimeError("bug"))

            a2 = await join_and_exchange(n, tmp_path, a1, prepare)  # a2's first dial fails
            c = a2.gossip.counters()
            assert c["internal_errors"] == 2 and c["dial_failures"] >= 1
            n.cancel_scope.cancel()


async def test_at_most_two_sessions_per_peer(tmp_path):
    from clanagent.gossip.errors import PeerDisconnected
    from clanagent.gossip.peer import open_peer_session
    from clanagent.identity import Identity

    carol = Identity.generate()
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            a1, _ = await start_agent(n, make_cfg(tmp_path, 1, []))
            url = f"ws://{a1.gossip.addr}/"
            clan = a1.gossip.clan
            async with (
                open_peer_session(url, carol, clan, lambda k: True) as s1,
                open_peer_session(url, carol, clan, lambda k: True) as s2,
            ):
                await wait_until(lambda: a1.gossip.counters()["sessions"] == 2, "two", 5)
                async with open_peer_session(url, carol, clan, lambda k: True):
                    # The third session with the same node closes its oldest.
                    with trio.fail_after(3), pytest.raises(PeerDisconnected):
                        while True:
                            await s1.receive()
                    assert not s2.closed
                    c = a1.gossip.counters()
                    assert c["sessions"] == 2 and c["sessions_evicted"] == 1
            n.cancel_scope.cancel()


async def test_outgoing_dials_are_capped(tmp_path, monkeypatch):
    from clanagent.gossip import service
    from clanagent.gossip.node import SendTo

    async def hang(*args, **kwargs):
        await trio.sleep_forever()

    monkeypatch.setattr(service, "connect", hang)
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            a1, _ = await start_agent(n, make_cfg(tmp_path, 1, []))
            svc = a1.gossip
            for i in range(service.MAX_DIALS + 6):
                svc._send(SendTo(None, f"192.0.2.{i % 250}:{7000 + i}", b"ping"))
            c = svc.counters()
            assert c["dials_in_progress"] == service.MAX_DIALS
            assert c["dials_refused"] == 6
            n.cancel_scope.cancel()


async def test_counters_merge_the_service_listener_and_node(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            a1, _ = await start_agent(n, make_cfg(tmp_path, 1, []))
            svc = a1.gossip
            svc.node.counters = lambda: {"records_refused": 3, "dropped": 1}
            svc.stats["dropped"] = 2
            c = svc.counters()
            assert c["records_refused"] == 3 and c["dropped"] == 3
            for key in (
                "dial_failures",
                "persist_failures",
                "internal_errors",
                "accept_errors",
                "handshake_timeouts",
                "pending_connections",
                "dials_refused",
                "sessions",
            ):
                assert c[key] == 0, key
            assert all(isinstance(v, int) for v in c.values())
            n.cancel_scope.cancel()


async def test_misbehaviour_warnings_are_one_per_peer_a_minute(caplog, autojump_clock):
    """A datagram of thousands of bad records must not write thousands of
    journal lines: one warning per peer a minute, saying how many were held."""
    import logging

    from clanagent.gossip.node import PeerMisbehaved
    from clanagent.gossip.service import GossipService

    svc = GossipService.__new__(GossipService)  # _log_misbehaved needs only its table
    svc._misbehaved_log = {}
    caplog.set_level(logging.WARNING, logger="clanagent.gossip")
    for _ in range(500):
        svc._log_misbehaved(PeerMisbehaved("mallory", "127.0.0.1:1", "refused record", -5))
    svc._log_misbehaved(PeerMisbehaved("other", "127.0.0.1:2", "malformed", -5))
    warned = [r for r in caplog.records if r.getMessage() == "peer misbehaved"]
    assert len(warned) == 2
    await trio.sleep(61)
    svc._log_misbehaved(PeerMisbehaved("mallory", "127.0.0.1:1", "refused record", -5))
    warned = [r for r in caplog.records if r.getMessage() == "peer misbehaved"]
    assert len(warned) == 3 and warned[-1].kv["held_back"] == 499


async def test_a_gossip_service_runs_on_explicit_hooks_without_an_agent(tmp_path):
    """What the service uses it is given: identity, store, name, config, and
    the hooks; each hook hears what it is for."""
    from clanagent.gossip.service import GossipService
    from clanagent.identity import Identity
    from clanagent.mesh.candidates import endpoints_body
    from clanagent.store import Store

    idents = [Identity.generate() for _ in range(3)]
    members = {idents[0].public_key, idents[1].public_key}  # idents[2] is a stranger
    heard: dict[int, dict[str, list]] = {}

    def service(i: int, join: list[str], state_path=None) -> GossipService:
        h = heard[i] = {"admit": [], "checked": [], "stored": [], "members": [], "events": []}

        class Events:
            def publish(self, topic, **fields):
                h["events"].append(topic)

        def admit_peer(key):
            h["admit"].append(key)
            return key in members

        return GossipService(
            GossipSection(listen="127.0.0.1:0", join=join, profile="local", name=f"g{i}"),
            identity=idents[i],
            store=Store.open(None),
            name=f"g{i}",
            state_path=state_path,
            admit_peer=admit_peer,
            admit_record=lambda rec: rec.origin in members,
            validate=lambda rec: h["checked"].append(rec.kind),
            on_record=lambda rec: h["stored"].append((rec.origin, rec.kind)),
            on_member_changed=lambda node_id: h["members"].append(node_id),
            events=Events(),
        )

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            g0 = service(0, [], state_path=tmp_path)
            await n.start(g0.run)
            g1 = service(1, [g0.addr])
            await n.start(g1.run)
            g2 = service(2, [g0.addr])
            await n.start(g2.run)
            await wait_until(lambda: g0.node.membership.alive_count() == 2, "g1 joined g0")
            g1.publish("endpoints", "", endpoints_body(["127.0.0.1:1"], [], None))
            origin = idents[1].public_key
            await wait_until(lambda: (origin, "endpoints") in heard[0]["stored"], "g0 hears g1")
            assert "endpoints" in heard[0]["checked"]  # checked before it was stored
            assert {"member.joined", "record.accepted"} <= set(heard[0]["events"])
            assert heard[0]["members"]
            # The stranger asked and was refused, by g0's own admit_peer.
            await wait_until(lambda: idents[2].public_key in heard[0]["admit"], "g2 tried")
            assert g0.node.member_state(idents[2].node_id) is None
            assert idents[2].public_key not in {o for o, _ in heard[0]["stored"]}
            await g0.leave()
            n.cancel_scope.cancel()
    # The peer book lives in the state dir it was given, and nowhere without one.
    assert g0._book_path is not None and g0._book_path.parent == tmp_path
    assert g1._book_path is None
