"""Floods and exhaustion on each listener of a real clan (issue 12, item 7).

The gossip port gets a handshake flood (thousands of HELLOs with the right
clan tag, from many connections and sources at once); the control socket
is held by unprivileged users taking every connection they may; the web
console gets hundreds of idle connections.  Throughout, every agent stays
up, root's `status` answers within 1 s, and a genuine peer or admin still
gets in within seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from .. import _as_user
from .attacker import Mallory, tcp_connections
from .conftest import MACHINES, STATUS_DEADLINE, call, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FLOOD = 2000  # HELLOs per agent
FLOOD_CONCURRENCY = 32  # connections at once, per agent
FLOOD_SECONDS = 15  # none started after: 3 agents and 3 attackers share the test box's cores
FLOOD_SOURCES = [f"127.0.0.{i}" for i in range(2, 10)]
GENUINE_HANDSHAKE = 5.0
HOLD_GROUP = "clanhostile-read"  # the read_group of the clan's control sockets
HOLDERS = 8  # local users, each trying to hold HOLD_EACH control connections of m1
HOLD_EACH = 16
WEB_IDLE = 300  # idle connections to m1's web console


def clan_setup() -> tuple[str, bool]:
    """Local users in the read group may connect to the control sockets
    (so they can try to hold them all); the clan lives where they can reach."""
    if not _as_user.have_root():
        return "", False
    _as_user.ensure_group(HOLD_GROUP)
    return f'read_group = "{HOLD_GROUP}"\n', True


@pytest.fixture(scope="module", autouse=True)
def _hold_group():
    yield
    if _as_user.have_root():
        for i in range(HOLDERS):
            _as_user.remove_user(f"clanhold{i}")
        _as_user.remove_group(HOLD_GROUP)  # seconds a member's handshake may take under the flood


def _flood_process(addr: str, clan_id: bytes) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tests.hostile.attacker", "flood", addr, clan_id.hex()]
    argv += [str(FLOOD), str(FLOOD_CONCURRENCY), str(FLOOD_SECONDS), *FLOOD_SOURCES]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


async def test_a_handshake_flood_stops_no_agent_and_a_member_still_gets_in(clan):
    m = Mallory(clan.mallory, clan.clan_id)
    floods = {x: _flood_process(clan.gossip[x], clan.clan_id) for x in MACHINES}
    handshakes: dict[str, list[float]] = {x: [] for x in MACHINES}
    statuses: dict[str, list[float]] = {x: [] for x in MACHINES}

    async def genuine(x: str) -> float:
        t0 = time.monotonic()
        try:
            with trio.fail_after(10):
                async with m.session(clan.gossip[x]):
                    pass
        except Exception as exc:  # noqa: BLE001 -- a failed handshake is the finding
            print(f"genuine handshake with {x} failed: {exc!r}")
            return float("inf")
        return time.monotonic() - t0

    try:
        with trio.fail_after(120):
            while any(p.poll() is None for p in floods.values()):
                for x in MACHINES:
                    handshakes[x].append(await genuine(x))
                    statuses[x].append(await trio.to_thread.run_sync(clan.status_time, x))
                await trio.sleep(0.2)
    finally:
        for p in floods.values():
            if p.poll() is None:
                p.kill()
    results = {x: json.loads(p.communicate()[0]) for x, p in floods.items()}
    for x in results:
        r = results[x]
        print(
            f"{x}: {r['sent']} HELLOs in {r['seconds']} s ({r}); genuine handshake "
            f"max {max(handshakes[x]):.2f} s over {len(handshakes[x])}, "
            f"status max {max(statuses[x]) * 1000:.0f} ms"
        )
    for x in results:
        r = results[x]
        assert r["answered"] + r["refused"] + r["silent"] == r["sent"]
        # A flood is what the agents' CPU makes of it: on a shared 2-core box
        # the three together took 300-600 each in 15 s (one alone, 2,000 in 25 s).
        assert r["sent"] >= 100, f"the attacker got only {r['sent']} HELLOs out"
        assert len(handshakes[x]) >= 2, "the flood ended before we could measure"
        assert max(handshakes[x]) < GENUINE_HANDSHAKE, (x, handshakes[x])
        assert max(statuses[x]) < STATUS_DEADLINE, (x, statuses[x])
    clan.assert_healthy()
    seen = {x: sorted(clan.members_alive(x)) for x in MACHINES}
    print(f"members each agent saw alive as the flood ended: {seen}")
    t0 = time.monotonic()
    wait_for(
        lambda: all(clan.members_alive(x) == set(MACHINES) for x in MACHINES),
        30,
        "every agent to see the whole clan alive after the flood",
    )
    print(f"every member alive everywhere {time.monotonic() - t0:.1f} s after the flood")


async def test_local_users_holding_the_control_socket_do_not_lock_root_out(clan):
    _as_user.skip_unless_root()
    sock = clan.socks["m1"]
    users = [_as_user.ensure_user(f"clanhold{i}", (HOLD_GROUP,)) for i in range(HOLDERS)]
    holders: list[_as_user.Holder] = []
    try:
        for u in users:
            holders.append(await trio.to_thread.run_sync(_as_user.Holder, u, sock, HOLD_EACH))
        await trio.sleep(0.5)  # the agent has taken (or refused) every one of them
        held = [(await trio.to_thread.run_sync(h.check))[0] for h in holders]
        assert sum(held) > 0, "no user could connect: the test would prove nothing"
        # root keeps its reserved slots: its status answers while they are held
        took = [clan.status_time("m1") for _ in range(5)]
        print(
            f"{HOLDERS} users tried {HOLD_EACH} control connections each and hold {held} "
            f"({sum(held)} in all); root's status: max {max(took) * 1000:.0f} ms"
        )
        assert max(took) < STATUS_DEADLINE, took
        counters = call(sock, "status")["counters"]["control"]
        assert counters.get("refused_slots", 0) > 0, counters
    finally:
        for h in holders:
            await trio.to_thread.run_sync(h.close)
    clan.assert_healthy()


def _request(port: int, method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if method == "POST":
        head += f"Origin: http://127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(body)}\r\n"
    return (head + "Connection: close\r\n\r\n").encode() + body


async def _exchange(port: int, raw: bytes) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return (int(head.split()[1]) if head else 0), body


async def test_idle_connections_to_the_web_console_lock_nobody_out(clan):
    sock = clan.socks["m1"]
    opened = call(sock, "ui.open", {"admin_key": ""})
    port = opened["port"]
    held = tcp_connections(f"127.0.0.1:{port}", WEB_IDLE)
    try:
        assert len(held) >= 100, f"only {len(held)} connections opened"
        await trio.sleep(0.5)
        took = [clan.status_time("m1") for _ in range(5)]
        # a real login, from the link `clanctl ui` prints, while they are held
        token = call(sock, "ui.open", {"admin_key": ""})["url"].split("token=", 1)[1]
        t0 = time.monotonic()
        with trio.fail_after(10):
            page = await _exchange(port, _request(port, "GET", f"/login?token={token}"))
            login = await _exchange(
                port, _request(port, "POST", "/session", json.dumps({"token": token}).encode())
            )
        login_s = time.monotonic() - t0
        print(
            f"{len(held)} idle web connections held: status max {max(took) * 1000:.0f} ms, "
            f"login page + session {login_s * 1000:.0f} ms"
        )
        assert page[0] == 200, page
        assert login[0] == 200 and json.loads(login[1]).get("session"), login
        assert max(took) < STATUS_DEADLINE, took
        assert login_s < 1.0, login_s
    finally:
        for s in held:
            s.close()
    clan.assert_healthy()
