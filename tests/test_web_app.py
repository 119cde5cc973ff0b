"""The web console's ASGI app, driven directly: routes, checks and bad input.

No sockets: each test calls the app with ASGI messages, the way hypercorn
does, against a small stand-in agent.  The console in a real agent behind
hypercorn is in test_web_console.py; a real browser in test_web_browser.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from clanagent._eventbus import EventBus
from clanagent.control.api import ApiTable, handler
from clanagent.secrets import api as secrets_api
from clanagent.web.actions import AdminKeySource, ConsoleActions
from clanagent.web.app import (
    AUTH_TIMEOUT,
    CLOSE_BUSY,
    CLOSE_FORBIDDEN,
    CLOSE_UNAUTHORIZED,
    MAX_BODY,
    MAX_IN_FLIGHT,
    WebApp,
)
from clanagent.web.auth import LOGIN_TTL, Authenticator

PORT = 7780
ORIGIN = f"http://127.0.0.1:{PORT}"


class StandInAgent:
    """What the control API handlers used here call on the agent."""

    def __init__(self) -> None:
        self.events_bus = EventBus()
        self.rotated: list[str] = []
        self.gate = trio.Event()

    def status(self) -> dict[str, Any]:
        return {"name": "m1", "short_id": "abc", "version": "0", "clan": None, "capabilities": []}

    def whoami(self) -> dict[str, Any]:
        return {"name": "m1", "signing_key": b"\x01" * 32}

    def peers(self) -> list[dict[str, Any]]:
        return []

    async def events(self):
        async for event in self.events_bus.subscribe():
            yield event

    def inventory_show(self) -> dict[str, Any]:
        return {"clan": None, "doc": None, "leaves": [], "versions": 0, "conflicts": []}

    def machines(self) -> list[dict[str, Any]]:
        return [{"name": "m1", "node_key": b"\xab" * 32}]

    async def request_rotation(self, sid: str) -> dict[str, Any]:  # as SecretsService's
        if sid == "boom/bug":
            raise RuntimeError("a bug in a handler")
        if sid == "slow/one":
            await self.gate.wait()
        self.rotated.append(sid)
        return {"id": sid, "generation": 1}


def stand_in_api(agent: StandInAgent) -> ApiTable:
    """The agent's table, over the stand-in: the agent-wide methods, the
    inventory's two reads, the secrets part's methods and a terminal session."""

    async def show(params):
        return agent.inventory_show()

    async def machines(params):
        return agent.machines()

    table = ApiTable.of(agent)
    table.add(
        handler("inventory.show", "read", show, "stand-in"),
        handler("machines", "read", machines, "stand-in"),
        handler("vm.console", "write", machines, "stand-in", params=("request",), upgrade=True),
    )
    secrets_api.register(table, secrets=lambda: agent)
    return table


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def agent():
    return StandInAgent()


@pytest.fixture
def app(agent, clock, tmp_path):
    auth = Authenticator()
    api = stand_in_api(agent)
    ConsoleActions(api, AdminKeySource(str(tmp_path / "no-admin.key"))).register()
    a = WebApp(api, auth, max_message=4096, clock=clock)
    a.port = PORT
    return a


def headers(**kw: str) -> list[tuple[bytes, bytes]]:
    h = {"host": f"127.0.0.1:{PORT}", **{k.replace("_", "-"): v for k, v in kw.items()}}
    return [(k.encode(), v.encode()) for k, v in h.items() if v is not None]


async def http(
    app: WebApp, method: str, path: str, body: bytes = b"", **hdrs: Any
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {"type": "http", "method": method, "path": path, "headers": headers(**hdrs)}
    await app(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


async def login(app: WebApp, clock: Clock, signer=None) -> str:
    token = app.auth.mint_login(clock.now, signer=signer)
    status, _, body = await http(
        app,
        "POST",
        "/session",
        json.dumps({"token": token}).encode(),
        origin=ORIGIN,
        content_type="application/json",
    )
    assert status == 200, body
    return json.loads(body)["session"]


class Ws:
    """A browser's end of one WebSocket to the app."""

    def __init__(self, app: WebApp, path: str = "/api", **hdrs: Any) -> None:
        self.app = app
        self.scope = {"type": "websocket", "path": path, "headers": headers(**hdrs)}
        self.to_app, self._app_in = trio.open_memory_channel[dict](100)
        self._app_out, self.from_app = trio.open_memory_channel[dict](100)
        self.done = trio.Event()

    async def run(self) -> None:
        await self.to_app.send({"type": "websocket.connect"})
        try:
            await self.app(self.scope, self._app_in.receive, self._app_out.send)
        finally:
            self.done.set()

    async def send(self, value: Any) -> None:
        text = value if isinstance(value, str) else json.dumps(value)
        await self.to_app.send({"type": "websocket.receive", "text": text})

    async def next(self) -> dict[str, Any]:
        with trio.fail_after(5):
            return await self.from_app.receive()

    async def reply(self) -> dict[str, Any]:
        msg = await self.next()
        assert msg["type"] == "websocket.send", msg
        return json.loads(msg["text"])

    async def disconnect(self) -> None:
        await self.to_app.send({"type": "websocket.disconnect", "code": 1000})


async def open_ws(nursery: trio.Nursery, app: WebApp, session: str) -> Ws:
    ws = Ws(app, origin=ORIGIN)
    nursery.start_soon(ws.run)
    assert (await ws.next())["type"] == "websocket.accept"
    await ws.send({"auth": session})
    assert await ws.reply() == {"id": 0, "ok": True, "result": {"access": "write"}}
    return ws


# -- HTTP ----------------------------------------------------------------------------------


async def test_the_page_and_its_assets_ship_in_the_package(app):
    status, hdrs, body = await http(app, "GET", "/")
    assert status == 200 and b"/static/app.js" in body
    assert b"default-src 'self'" in hdrs[b"content-security-policy"]
    assert hdrs[b"referrer-policy"] == b"no-referrer"
    assert b"http" not in body.split(b"<body>")[0].replace(b"http-equiv", b"")  # no CDN
    for name, ctype in (("app.js", b"text/javascript"), ("app.css", b"text/css")):
        status, hdrs, body = await http(app, "GET", f"/static/{name}")
        assert status == 200 and hdrs[b"content-type"].startswith(ctype) and body
        assert b"https://" not in body  # nothing fetched from elsewhere
    status, _, body = await http(app, "GET", "/login")
    assert status == 200 and b"app.js" in body


@pytest.mark.parametrize(
    "path", ["/static/../auth.py", "/static/", "/static/%2e%2e/x", "/nope", "/static/app.py"]
)
async def test_only_packaged_assets_are_served(app, path):
    status, _, _ = await http(app, "GET", path)
    assert status == 404


@pytest.mark.parametrize("host", ["evil.example", "evil.example:7780", "127.0.0.1:1", None])
async def test_a_foreign_host_is_refused_everywhere(app, clock, host):
    status, _, body = await http(app, "GET", "/", host=host)
    assert status == 403 and b"rebinding" in body
    token = app.auth.mint_login(clock.now)
    status, _, _ = await http(
        app,
        "POST",
        "/session",
        json.dumps({"token": token}).encode(),
        host=host,
        origin=ORIGIN,
        content_type="application/json",
    )
    assert status == 403
    assert app.auth.counts["login_tokens"] == 1  # the token is still unused


async def test_login_exchanges_a_token_once(app, clock):
    token = app.auth.mint_login(clock.now)
    body = json.dumps({"token": token}).encode()
    post = dict(origin=ORIGIN, content_type="application/json")
    status, hdrs, reply = await http(app, "POST", "/session", body, **post)
    assert status == 200 and json.loads(reply)["session"]
    assert b"set-cookie" not in hdrs  # no cookie: see auth.py
    status, _, reply = await http(app, "POST", "/session", body, **post)
    assert status == 401 and "already used" in json.loads(reply)["error"]


async def test_an_expired_token_is_refused(app, clock):
    token = app.auth.mint_login(clock.now)
    clock.now += LOGIN_TTL + 1
    status, _, reply = await http(
        app,
        "POST",
        "/session",
        json.dumps({"token": token}).encode(),
        origin=ORIGIN,
        content_type="application/json",
    )
    assert status == 401 and "clanctl ui" in json.loads(reply)["error"]


@pytest.mark.parametrize(
    "body, hdrs, want",
    [
        (b'{"token": "x"}', {"content_type": "application/json"}, 403),  # no Origin
        (
            b'{"token": "x"}',
            {"origin": "http://evil.example", "content_type": "application/json"},
            403,
        ),
        (b'{"token": "x"}', {"origin": ORIGIN, "content_type": "text/plain"}, 415),
        (b"{not json", {"origin": ORIGIN, "content_type": "application/json"}, 400),
        (b"[1]", {"origin": ORIGIN, "content_type": "application/json"}, 400),
        (b"x" * (MAX_BODY + 1), {"origin": ORIGIN, "content_type": "application/json"}, 400),
        (b'{"token": "forged"}', {"origin": ORIGIN, "content_type": "application/json"}, 401),
        (b'{"token": 5}', {"origin": ORIGIN, "content_type": "application/json"}, 401),
    ],
)
async def test_bad_logins_get_clear_errors(app, clock, body, hdrs, want):
    app.auth.mint_login(clock.now)
    status, _, reply = await http(app, "POST", "/session", body, **hdrs)
    assert status == want
    assert json.loads(reply)["error"]


async def test_logout_ends_the_session(app, clock):
    session = await login(app, clock)
    status, _, _ = await http(
        app,
        "POST",
        "/logout",
        json.dumps({"session": session}).encode(),
        origin=ORIGIN,
        content_type="application/json",
    )
    assert status == 200 and app.auth.counts["sessions"] == 0


# -- WebSocket -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, hdrs",
    [
        ("/api", {"origin": "http://evil.example"}),
        ("/api", {"origin": None}),
        ("/api", {"origin": ORIGIN, "host": "evil.example:7780"}),
        ("/other", {"origin": ORIGIN}),
    ],
)
async def test_websockets_from_elsewhere_are_refused_before_accept(app, path, hdrs):
    ws = Ws(app, path, **hdrs)
    async with trio.open_nursery() as n:
        n.start_soon(ws.run)
        msg = await ws.next()
    assert msg == {"type": "websocket.close", "code": CLOSE_FORBIDDEN}
    assert app.stats.refused == 1


@pytest.mark.parametrize(
    "first", ['{"auth": "forged"}', '{"id": 1, "method": "status"}', "garbage", '{"auth": 7}']
)
async def test_a_socket_must_authenticate_first(app, first):
    ws = Ws(app, origin=ORIGIN)
    async with trio.open_nursery() as n:
        n.start_soon(ws.run)
        assert (await ws.next())["type"] == "websocket.accept"
        await ws.send(first)
        err = await ws.reply()
        assert err["ok"] is False and err["error"]["code"] == "permission_denied"
        assert err["error"]["message"]
        close = await ws.next()
        assert close["type"] == "websocket.close" and close["code"] == CLOSE_UNAUTHORIZED


async def test_a_silent_socket_is_closed(app, autojump_clock):
    ws = Ws(app, origin=ORIGIN)
    async with trio.open_nursery() as n:
        n.start_soon(ws.run)
        assert (await ws.next())["type"] == "websocket.accept"
        await trio.sleep(AUTH_TIMEOUT + 1)
        close = await ws.next()
        assert close["code"] == CLOSE_UNAUTHORIZED


async def test_an_expired_session_cannot_open_a_socket(app, clock):
    session = await login(app, clock)
    clock.now += app.auth.session_idle + 1
    ws = Ws(app, origin=ORIGIN)
    async with trio.open_nursery() as n:
        n.start_soon(ws.run)
        await ws.next()
        await ws.send({"auth": session})
        assert (await ws.reply())["error"]["code"] == "permission_denied"


async def test_requests_run_through_the_control_api_table(app, agent, clock):
    session = await login(app, clock)
    async with trio.open_nursery() as n:
        ws = await open_ws(n, app, session)
        await ws.send({"id": 1, "method": "status"})
        assert (await ws.reply()) == {"id": 1, "ok": True, "result": agent.status()}
        await ws.send({"id": 2, "method": "whoami"})
        assert (await ws.reply())["result"]["signing_key"] == "01" * 32  # bytes as hex
        await ws.send({"id": 3, "method": "secrets.rotate", "params": {"id": "a/b"}})
        assert (await ws.reply())["result"] == {"id": "a/b", "generation": 1}
        assert agent.rotated == ["a/b"]
        # the control API's own parameter checks apply
        await ws.send({"id": 4, "method": "secrets.rotate", "params": {"id": 5}})
        err = await ws.reply()
        assert err["id"] == 4 and err["error"]["code"] == "invalid_params"
        await ws.send({"id": 5, "method": "status", "params": {"x": 1}})
        assert (await ws.reply())["error"]["message"] == "unknown parameter(s): ['x']"
        await ws.send({"id": 6, "method": "no.such"})
        err = await ws.reply()
        assert (
            err["error"]["code"] == "unknown_method" and "secrets.rotate" in err["error"]["message"]
        )
        await ws.send({"id": 7, "method": "status", "v": 9})
        assert (await ws.reply())["error"]["code"] == "unsupported_version"
        await ws.disconnect()


async def test_bad_input_earns_an_error_and_the_socket_lives_on(app, agent, clock):
    session = await login(app, clock)
    async with trio.open_nursery() as n:
        ws = await open_ws(n, app, session)
        for bad, code in (
            ("{", "bad_request"),
            ("[]", "bad_request"),
            ('{"id": 1, "method": "status", "oops": 1}', "bad_request"),
            ('{"id": 1, "method": "status", "params": {"n": 1e999}}', "bad_request"),
            (json.dumps({"id": 1, "method": "x", "params": {"s": "y" * 5000}}), "too_large"),
            ('{"auth": "again"}', "bad_request"),
        ):
            await ws.send(bad)
            err = await ws.reply()
            assert err["ok"] is False and err["error"]["code"] == code, (bad, err)
        # a handler that fails: an internal error, and the next request works
        await ws.send({"id": 8, "method": "secrets.rotate", "params": {"id": "boom/bug"}})
        err = await ws.reply()
        assert err["id"] == 8 and err["error"]["code"] == "internal"
        assert "a bug in a handler" in err["error"]["message"]
        # a terminal session (a VM's serial console) is not for a browser
        await ws.send({"id": 10, "method": "vm.console", "params": {"request": {}}})
        err = await ws.reply()
        assert err["id"] == 10 and err["error"]["code"] == "invalid_params"
        assert "clanctl vm console" in err["error"]["message"]
        await ws.send({"id": 9, "method": "status"})
        assert (await ws.reply())["ok"] is True
        await ws.disconnect()
    assert app.stats.errors["bad_request"] >= 4 and app.stats.errors["internal"] == 1


async def test_in_flight_requests_are_bounded(app, agent, clock):
    session = await login(app, clock)
    async with trio.open_nursery() as n:
        ws = await open_ws(n, app, session)
        for i in range(MAX_IN_FLIGHT):
            await ws.send({"id": i + 1, "method": "secrets.rotate", "params": {"id": "slow/one"}})
        await ws.send({"id": 99, "method": "status"})
        err = await ws.reply()
        assert err["id"] == 99 and err["error"]["code"] == "unavailable"
        agent.gate.set()
        ids = {(await ws.reply())["id"] for _ in range(MAX_IN_FLIGHT)}
        assert ids == set(range(1, MAX_IN_FLIGHT + 1))
        await ws.disconnect()


async def test_events_stream_until_cancelled(app, agent, clock):
    session = await login(app, clock)
    async with trio.open_nursery() as n:
        ws = await open_ws(n, app, session)
        await ws.send({"id": 5, "method": "events"})
        while not agent.events_bus.subscribers:
            await trio.sleep(0.01)
        agent.events_bus.publish("member.alive", name="m2", key=b"\x02")
        ev = await ws.reply()
        assert (
            ev["id"] == 5 and ev["event"]["type"] == "member.alive" and ev["event"]["key"] == "02"
        )
        # requests still work while a stream runs
        await ws.send({"id": 6, "method": "status"})
        assert (await ws.reply())["id"] == 6
        await ws.send({"id": 5, "cancel": True})
        assert await ws.reply() == {"id": 5, "end": True}
        while agent.events_bus.subscribers:
            await trio.sleep(0.01)
        await ws.disconnect()


async def test_a_session_ended_elsewhere_stops_the_socket(app, clock):
    session = await login(app, clock)
    async with trio.open_nursery() as n:
        ws = await open_ws(n, app, session)
        app.auth.end(session)
        await ws.send({"id": 1, "method": "status"})
        assert (await ws.reply())["error"]["code"] == "permission_denied"
        assert (await ws.next())["code"] == CLOSE_UNAUTHORIZED
        with trio.fail_after(5):
            await ws.done.wait()


async def test_a_listening_socket_is_closed_when_its_session_ends(app, agent, clock):
    """A socket that only streams events and never sends is closed on logout too."""
    app.session_check = 0.05
    session = await login(app, clock)
    async with trio.open_nursery() as n:
        ws = await open_ws(n, app, session)
        await ws.send({"id": 1, "method": "events"})
        app.auth.end(session)  # logged out in another tab
        with trio.fail_after(5):
            while True:
                msg = await ws.next()
                if msg.get("code") == CLOSE_UNAUTHORIZED:
                    break
            await ws.done.wait()


async def test_a_read_only_session_cannot_change_state(app, agent, clock):
    token = app.auth.mint_login(clock.now, access="read")
    session = app.auth.redeem(token, clock.now)
    async with trio.open_nursery() as n:
        ws = Ws(app, origin=ORIGIN)
        n.start_soon(ws.run)
        await ws.next()
        await ws.send({"auth": session})
        assert (await ws.reply())["result"] == {"access": "read"}
        await ws.send({"id": 1, "method": "secrets.rotate", "params": {"id": "a/b"}})
        err = await ws.reply()
        assert err["error"]["code"] == "permission_denied" and agent.rotated == []
        await ws.send({"id": 2, "method": "console.vm", "params": {"name": "x", "action": "stop"}})
        assert (await ws.reply())["error"]["code"] == "permission_denied"
        await ws.disconnect()


async def test_console_actions_without_an_admin_key_say_why(app, clock, tmp_path):
    # a session without a key says how to get one
    session = await login(app, clock)
    async with trio.open_nursery() as n:
        ws = await open_ws(n, app, session)
        await ws.send({"id": 1, "method": "console.session"})
        res = (await ws.reply())["result"]
        assert res["admin_key"]["available"] is False
        assert "this session has no admin key" in res["admin_key"]["reason"]
        await ws.disconnect()
    # a session whose key file is missing names it
    session = await login(app, clock, signer=(str(tmp_path / "no-admin.key"), None))
    async with trio.open_nursery() as n:
        ws = await open_ws(n, app, session)
        await ws.send({"id": 1, "method": "console.session"})
        res = (await ws.reply())["result"]
        assert res["admin_key"]["available"] is False
        assert "no-admin.key" in res["admin_key"]["reason"]
        assert "clanctl ui --admin-key" in res["admin_key"]["reason"]
        await ws.send({"id": 2, "method": "console.vm", "params": {"name": "v", "action": "stop"}})
        err = await ws.reply()
        assert err["error"]["code"] == "permission_denied"
        assert err["error"]["message"].startswith("cannot sign here: no admin key at")
        await ws.send({"id": 3, "method": "console.vm", "params": {"name": "v", "action": "boom"}})
        assert (await ws.reply())["error"]["code"] == "invalid_params"
        await ws.send({"id": 4, "method": "console.nope"})
        assert (await ws.reply())["error"]["code"] == "unknown_method"
        await ws.disconnect()


# -- limits and faults (issue 12; the same over real sockets: test_web_limits.py) ----------


async def test_a_bug_under_a_route_answers_500_counted(app, monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("a bug in the login route")

    monkeypatch.setattr(app.auth, "redeem", broken)
    for _ in range(2):
        status, _, body = await http(
            app,
            "POST",
            "/session",
            b'{"token": "t"}',
            origin=ORIGIN,
            content_type="application/json",
        )
        assert status == 500 and b"internal error" in body
    assert app.faults.counters["internal_errors"] == 2
    status, _, _ = await http(app, "GET", "/")
    assert status == 200


async def test_a_slow_body_gets_408(app, autojump_clock):
    async def receive() -> dict[str, Any]:
        await trio.sleep_forever()

    sent: list[dict[str, Any]] = []

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/session",
        "headers": headers(origin=ORIGIN, content_type="application/json"),
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 408 and app.stats.timeouts == 1


async def test_a_slot_is_taken_only_once_authenticated(app, clock, monkeypatch):
    monkeypatch.setattr(app, "_connections", trio.CapacityLimiter(1))
    session = await login(app, clock)
    async with trio.open_nursery() as n:
        silent = Ws(app, origin=ORIGIN)
        n.start_soon(silent.run)
        assert (await silent.next())["type"] == "websocket.accept"
        first = await open_ws(n, app, session)  # the silent one holds no slot
        assert app.stats.websockets_open == 1
        second = Ws(app, origin=ORIGIN)
        n.start_soon(second.run)
        await second.next()
        await second.send({"auth": session})
        assert (await second.reply())["error"]["code"] == "unavailable"
        assert (await second.next())["code"] == CLOSE_BUSY
        assert app.stats.websockets_busy == 1
        await first.disconnect()
        await silent.disconnect()
