"""The web console under a hostile local user, over real sockets.

A WebConsole (hypercorn's connections under our listener) bound to
127.0.0.1 in front of the stand-in agent of test_web_app.py.  Issue 12: a
POST loop must not leave sockets in CLOSE-WAIT (nor use up fds), idle and
slow connections are closed soon, at the connection cap idle connections
(and WebSockets still to authenticate) make room for newcomers, the
never-authenticated first, and only requests in flight at every slot make
it answer 503 (the console serves again once they leave), an unauthenticated WebSocket
holds no slot, and a bug under one request or connection ends that one only.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionClosed, connect_websocket_url

from clanagent.config import Config, WebSection
from clanagent.web import WebConsole, _listener
from clanagent.web import app as web_app
from clanagent.web import server as web_server
from clanagent.web._listener import KEEP_ALIVE, MAX_WEB_CONNECTIONS
from clanagent.web.app import AUTH_TIMEOUT, CLOSE_BUSY, CLOSE_UNAUTHORIZED, MAX_CONNECTIONS

from .test_web_app import StandInAgent, stand_in_api

pytestmark = pytest.mark.integration

TCP_CLOSE_WAIT = "08"


@asynccontextmanager
async def console(tmp_path):
    agent = StandInAgent()
    cfg = Config(web=WebSection(port=0, admin_key=str(tmp_path / "no-admin.key")))
    web = WebConsole(cfg, stand_in_api(agent))
    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            port = await web.ensure_running(n)
            yield web, port
            n.cancel_scope.cancel()


def sockets_in_state(port: int, state: str) -> int:
    """Sockets on local port `port` in TCP state `state` (hex, as /proc/net/tcp says)."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                count += 1
    return count


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def request(port: int, method: str, path: str, body: bytes | None = None, **headers: str) -> bytes:
    hdrs = {"Host": f"127.0.0.1:{port}", **headers}
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
        hdrs.setdefault("Content-Length", str(len(body)))
    head = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + (body or b"")


async def read_response(stream: trio.SocketStream) -> tuple[int, bytes]:
    """(status, body) of one response; (0, b"") if the server closed without one."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return 0, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(body) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body


async def exchange(port: int, raw: bytes) -> tuple[int, bytes]:
    """One request on a fresh connection, which the client closes after the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(raw)
        return await read_response(stream)


def post(port: int, path: str, value: dict) -> bytes:
    return request(
        port, "POST", path, json.dumps(value).encode(), Origin=f"http://127.0.0.1:{port}"
    )


async def login(web: WebConsole, port: int) -> str:
    token = web.auth.mint_login(web.app.clock())
    status, body = await exchange(port, post(port, "/session", {"token": token}))
    assert status == 200, body
    return json.loads(body)["session"]


async def open_ws(nursery: trio.Nursery, port: int):
    return await connect_websocket_url(
        nursery,
        f"ws://127.0.0.1:{port}/api",
        extra_headers=[("Origin", f"http://127.0.0.1:{port}")],
    )


async def authenticate(ws, session: str) -> dict:
    await ws.send_message(json.dumps({"auth": session}))
    return json.loads(await ws.get_message())


async def wait_until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


# -- sockets are let go ---------------------------------------------------------------


async def test_a_post_loop_leaves_no_socket_behind(tmp_path):
    async with console(tmp_path) as (web, port):
        base_fds = open_fds()
        most_fds = base_fds

        async def client(rounds: int) -> None:
            nonlocal most_fds
            for _ in range(rounds):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(post(port, "/logout", {"session": "nope"}))
                    assert (await read_response(stream))[0] == 200
                    # the server is back to waiting for the next request when we close
                    await trio.sleep(0.02)
                most_fds = max(most_fds, open_fds())

        async with trio.open_nursery() as n:
            for _ in range(10):
                n.start_soon(client, 50)
        await trio.sleep(1.0)
        # hypercorn alone kept each one for its keep-alive time (5 s): hundreds in
        # CLOSE-WAIT, an fd each
        assert sockets_in_state(port, TCP_CLOSE_WAIT) == 0
        assert most_fds - base_fds < 40, (base_fds, most_fds)
        assert open_fds() - base_fds < 5
        c = web.counters()
        assert c["accepted"] == 500 and c["connections"] == 0 and c["refused"] == 0


async def test_idle_and_slow_connections_are_closed_soon(tmp_path):
    async with console(tmp_path) as (web, port):
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        await slow.send_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends its headers
        kept = await trio.open_tcp_stream("127.0.0.1", port)  # keep-alive after an answer
        await kept.send_all(request(port, "GET", "/"))
        assert (await read_response(kept))[0] == 200
        with trio.fail_after(KEEP_ALIVE + 1.5):
            for stream in (idle, slow, kept):
                assert await stream.receive_some(65536) == b""
        for stream in (idle, slow, kept):
            await stream.aclose()
        await wait_until(lambda: web.counters()["connections"] == 0)
        assert web.counters()["idle_closed"] == 3


async def test_a_body_must_arrive_in_time(tmp_path, monkeypatch):
    monkeypatch.setattr(web_app, "BODY_TIMEOUT", 0.5)
    async with console(tmp_path) as (web, port):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            raw = post(port, "/session", {"token": "x" * 40})
            await stream.send_all(raw[:-10])  # all but the last bytes of its body
            with trio.fail_after(3):
                status, body = await read_response(stream)
            assert status == 408 and b"took over" in body
            assert await stream.receive_some(100) == b""  # and the connection is closed
        assert web.counters()["timeouts"] == 1


# -- the connection cap -----------------------------------------------------------------


async def hold_idle(held: AsyncExitStack, port: int, count: int) -> list[trio.SocketStream]:
    """`count` connections that never send a byte (a local user's slot holders)."""
    streams = []
    for _ in range(count):
        streams.append(
            await held.enter_async_context(await trio.open_tcp_stream("127.0.0.1", port))
        )
    return streams


async def closed_by_server(stream: trio.SocketStream) -> bool:
    """Whether the server has closed `stream` (EOF or reset), without waiting long."""
    with trio.move_on_after(0.5):
        try:
            return await stream.receive_some(100) == b""
        except trio.BrokenResourceError:
            return True
    return False


async def test_at_the_cap_an_idle_connection_makes_room_for_the_admin(tmp_path, monkeypatch):
    # idle holders stay as long as the test likes (a local user reconnecting every
    # ~2 s keeps them as full as this)
    monkeypatch.setattr(web_server, "KEEP_ALIVE", 30.0)
    async with console(tmp_path) as (web, port), AsyncExitStack() as held:
        holders = await hold_idle(held, port, MAX_WEB_CONNECTIONS)
        await wait_until(lambda: web.counters()["connections"] == MAX_WEB_CONNECTIONS)
        start = trio.current_time()
        with trio.fail_after(1):
            session = await login(web, port)
        elapsed = trio.current_time() - start
        c = web.counters()
        assert c["evicted"] == 1 and c["refused"] == 0, c
        # the login's connection is closed by now, or will be: a slot for this one,
        # or another eviction
        assert (await exchange(port, request(port, "GET", "/")))[0] == 200
        c = web.counters()
        assert c["evicted"] in (1, 2) and c["refused"] == 0, c
        assert c["connections"] <= MAX_WEB_CONNECTIONS
        # the oldest holder made room
        assert [await closed_by_server(s) for s in holders[:3]] == [True, c["evicted"] == 2, False]
        print(f"login with {MAX_WEB_CONNECTIONS} idle holders: {elapsed * 1000:.0f} ms")
        async with trio.open_nursery() as n:
            ws = await open_ws(n, port)
            assert (await authenticate(ws, session))["ok"] is True
            await ws.aclose()


async def test_an_authenticated_idle_connection_is_evicted_last(tmp_path, monkeypatch):
    monkeypatch.setattr(web_server, "KEEP_ALIVE", 30.0)
    async with console(tmp_path) as (web, port), AsyncExitStack() as held:
        # the admin's keep-alive connection: logged in on it, now idle (the oldest)
        admin = await held.enter_async_context(await trio.open_tcp_stream("127.0.0.1", port))
        token = web.auth.mint_login(web.app.clock())
        await admin.send_all(post(port, "/session", {"token": token}))
        assert (await read_response(admin))[0] == 200
        holders = await hold_idle(held, port, MAX_WEB_CONNECTIONS - 1)
        await wait_until(lambda: web.counters()["connections"] == MAX_WEB_CONNECTIONS)
        for _ in range(5):  # newcomers that stay (keep-alive)
            stream = await held.enter_async_context(await trio.open_tcp_stream("127.0.0.1", port))
            await stream.send_all(request(port, "GET", "/"))
            assert (await read_response(stream))[0] == 200
        assert web.counters()["evicted"] == 5
        assert [await closed_by_server(s) for s in holders[:6]] == [True] * 5 + [False]
        # the admin's connection is still there and serves
        await admin.send_all(request(port, "GET", "/"))
        with trio.fail_after(1):
            assert (await read_response(admin))[0] == 200


async def test_unauthenticated_websockets_make_room_not_authenticated_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(web_app, "AUTH_TIMEOUT", 30.0)
    async with console(tmp_path) as (web, port):
        session = await login(web, port)
        async with trio.open_nursery() as n:
            admin = await open_ws(n, port)
            assert (await authenticate(admin, session))["ok"] is True
            silent = [await open_ws(n, port) for _ in range(MAX_WEB_CONNECTIONS - 1)]
            await wait_until(lambda: web.counters()["connections"] == MAX_WEB_CONNECTIONS)
            with trio.fail_after(1):
                session2 = await login(web, port)
                second = await open_ws(n, port)
                assert (await authenticate(second, session2))["ok"] is True
            assert web.counters()["evicted"] == 2 and web.counters()["refused"] == 0
            for ws in (admin, second):  # both authenticated sockets serve on
                await ws.send_message(json.dumps({"id": 1, "method": "status", "params": {}}))
                assert json.loads(await ws.get_message())["result"]["name"] == "m1"
            for ws in (admin, second, *silent):
                await ws.aclose()


async def test_the_cap_answers_503_when_every_connection_has_a_request_in_flight(tmp_path):
    async with console(tmp_path) as (web, port):
        async with AsyncExitStack() as held:
            raw = post(port, "/session", {"token": "x" * 40})
            for _ in range(MAX_WEB_CONNECTIONS):
                stream = await held.enter_async_context(
                    await trio.open_tcp_stream("127.0.0.1", port)
                )
                await stream.send_all(raw[:-10])  # headers sent, the body pending
            await wait_until(lambda: web.counters()["http_requests"] == MAX_WEB_CONNECTIONS)
            for _ in range(3):
                status, body = await exchange(port, request(port, "GET", "/"))
                assert status == 503 and b"busy" in body
            c = web.counters()
            assert c["refused"] == 3 and c["evicted"] == 0, c
        await wait_until(lambda: web.counters()["connections"] == 0)
        # the holders are gone: an admin logs in and uses the API
        session = await login(web, port)
        async with trio.open_nursery() as n:
            ws = await open_ws(n, port)
            assert (await authenticate(ws, session))["ok"] is True
            await ws.send_message(json.dumps({"id": 1, "method": "status", "params": {}}))
            assert json.loads(await ws.get_message())["result"]["name"] == "m1"
            await ws.aclose()
        assert web.counters()["connections"] <= 1


async def test_unauthenticated_websockets_hold_no_slot(tmp_path):
    async with console(tmp_path) as (web, port):
        session = await login(web, port)
        async with trio.open_nursery() as n:
            silent = [await open_ws(n, port) for _ in range(MAX_CONNECTIONS + 8)]
            # more silent sockets than slots, and still an admin gets in
            admin = await open_ws(n, port)
            assert (await authenticate(admin, session)) == {
                "id": 0,
                "ok": True,
                "result": {"access": "write"},
            }
            assert web.counters()["websockets_open"] == 1
            # the silent ones are closed after the authentication deadline
            with trio.fail_after(AUTH_TIMEOUT + 2):
                for ws in silent:
                    with pytest.raises(ConnectionClosed) as closed:
                        await ws.get_message()
                    assert closed.value.reason.code == CLOSE_UNAUTHORIZED
            assert web.counters()["timeouts"] == len(silent)
            await admin.aclose()


async def test_authenticated_websockets_are_capped(tmp_path):
    async with console(tmp_path) as (web, port):
        session = await login(web, port)
        async with trio.open_nursery() as n:
            sockets = [await open_ws(n, port) for _ in range(MAX_CONNECTIONS + 1)]
            for ws in sockets[:-1]:
                assert (await authenticate(ws, session))["ok"] is True
            busy = await authenticate(sockets[-1], session)
            assert busy["ok"] is False and busy["error"]["code"] == "unavailable"
            with pytest.raises(ConnectionClosed) as closed:
                await sockets[-1].get_message()
            assert closed.value.reason.code == CLOSE_BUSY
            assert web.counters()["websockets_busy"] == 1
            for ws in sockets[:-1]:
                await ws.aclose()


# -- fault isolation --------------------------------------------------------------------


async def test_a_bug_in_a_route_is_a_500_and_the_console_serves_on(tmp_path, monkeypatch, caplog):
    async with console(tmp_path) as (web, port):

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in the login route")

        monkeypatch.setattr(web.auth, "redeem", broken)
        with caplog.at_level(logging.DEBUG, logger="clanagent.web"):
            for _ in range(3):
                status, body = await exchange(port, post(port, "/session", {"token": "t"}))
                assert status == 500 and b"internal error" in body
        faults = [r for r in caplog.records if r.getMessage().startswith("web console fault:")]
        assert len(faults) == 1 and faults[0].exc_info is not None  # logged once
        assert web.counters()["internal_errors"] == 3
        assert (await exchange(port, request(port, "GET", "/")))[0] == 200
        monkeypatch.undo()
        await login(web, port)


async def test_a_bug_in_a_websocket_closes_it_with_1011(tmp_path, monkeypatch):
    async with console(tmp_path) as (web, port):
        session = await login(web, port)

        def broken(*args, **kwargs):
            raise KeyError("a bug in the session check")

        async with trio.open_nursery() as n:
            with monkeypatch.context() as m:
                m.setattr(web.auth, "check", broken)
                ws = await open_ws(n, port)
                await ws.send_message(json.dumps({"auth": session}))
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == 1011
            assert web.counters()["internal_errors"] == 1
            ws = await open_ws(n, port)
            assert (await authenticate(ws, session))["ok"] is True
            await ws.aclose()


async def test_a_bug_under_one_connection_ends_that_connection_only(tmp_path, monkeypatch):
    async with console(tmp_path) as (web, port):
        original = _listener._Connection._read_data

        async def broken(self):
            raise RuntimeError("a bug in the connection server")

        monkeypatch.setattr(_listener._Connection, "_read_data", broken)
        for _ in range(2):
            assert (await exchange(port, request(port, "GET", "/"))) == (0, b"")
        monkeypatch.setattr(_listener._Connection, "_read_data", original)
        assert web.running
        assert (await exchange(port, request(port, "GET", "/")))[0] == 200
        assert web.counters()["internal_errors"] == 2
        await wait_until(lambda: web.counters()["connections"] == 0)


async def test_counters_are_plain_ints(tmp_path):
    async with console(tmp_path) as (web, port):
        await exchange(port, request(port, "GET", "/"))
        c = web.counters()
        assert all(type(v) is int for v in c.values())
        for key in ("connections", "accepted", "refused", "evicted", "internal_errors", "timeouts"):
            assert key in c
        assert c["http_requests"] == 1
