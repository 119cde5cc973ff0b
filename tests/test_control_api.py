"""The one control API table (issue 14 item 1): clanctl and the web console
dispatch through the same handlers with the same access levels.

A method registered once is answered on the control socket and in a web
session; a read-only caller of either is refused it the same way.  The
console's own `console.*` methods join that table for web sessions only,
and `ui.open` stays clanctl's.  The agent's table keeps every method name
and access level clanctl knows.
"""

from __future__ import annotations

import pytest
import trio

from clanagent.config import Config, ControlConfig
from clanagent.control.api import ApiTable, handler
from clanagent.control.client import ClientError
from clanagent.control.protocol import ControlError
from clanagent.control.server import ControlServer
from clanagent.web.actions import AdminKeySource, ConsoleActions
from clanagent.web.app import WebApp
from clanagent.web.auth import Authenticator

from .test_control_server import call
from .test_web_app import ORIGIN, PORT, Clock, StandInAgent, Ws, login

# The control API as clanctl knows it (version 1): name -> access, in order.
CLANCTL_METHODS = {
    "status": "read",
    "whoami": "read",
    "peers": "read",
    "events": "read",
    "methods": "read",
    "inventory.show": "read",
    "inventory.history": "read",
    "inventory.conflicts": "read",
    "inventory.submit": "write",
    "inventory.endpoints": "write",
    "machines": "read",
    "invite": "write",
    "services": "read",
    "vm.list": "read",
    "vm.logs": "read",
    "vm.request": "write",
    "vm.console": "write",
    "secrets.list": "read",
    "secrets.rotate": "write",
    "path": "read",
    "topology": "read",
    "ui.open": "write",
    "metrics": "read",
}


def poke_table() -> tuple[ApiTable, list[dict]]:
    """The stand-in agent's methods plus one write method, registered once."""
    poked: list[dict] = []

    async def poke(params):
        poked.append(params)
        return {"poked": len(poked)}

    table = ApiTable.of(StandInAgent())
    table.add(handler("test.poke", "write", poke, "a write method", params=("n",)))
    return table, poked


async def web_call(app: WebApp, session: str, method: str, params: dict) -> dict:
    """One request in a new web session's socket: its reply (ok or error)."""
    async with trio.open_nursery() as n:
        ws = Ws(app, origin=ORIGIN)
        n.start_soon(ws.run)
        await ws.next()
        await ws.send({"auth": session})
        await ws.reply()
        await ws.send({"id": 1, "method": method, "params": params})
        reply = await ws.reply()
        await ws.disconnect()
    return reply


def web_app(table: ApiTable, clock: Clock) -> WebApp:
    app = WebApp(table, Authenticator(), max_message=4096, clock=clock)
    app.port = PORT
    return app


async def test_a_method_registered_once_answers_clanctl_and_the_console_alike(tmp_path):
    table, poked = poke_table()
    clock = Clock()
    app = web_app(table, clock)
    path = tmp_path / "ctl.sock"
    with trio.fail_after(20):
        # clanctl with read access: refused, nothing ran
        async with trio.open_nursery() as n:
            server = ControlServer(
                path, table, ControlConfig(socket=str(path)), authorizer=lambda c: ("read", "t")
            )
            await n.start(server.serve)
            assert server.api is table
            with pytest.raises(ClientError) as exc:
                await call(path, "test.poke", {"n": 1})
            assert exc.value.code == "permission_denied" and "read-only" in exc.value.message
            n.cancel_scope.cancel()
        # a read-only web session: refused the same way, nothing ran
        read_only = app.auth.redeem(app.auth.mint_login(clock.now, access="read"), clock.now)
        reply = await web_call(app, read_only, "test.poke", {"n": 2})
        assert reply["error"]["code"] == "permission_denied"
        assert "read-only" in reply["error"]["message"]
        assert poked == []
        # with write access both reach the one handler, with the same parameter checks
        async with trio.open_nursery() as n:
            server = ControlServer(
                path, table, ControlConfig(socket=str(path)), authorizer=lambda c: ("write", "t")
            )
            await n.start(server.serve)
            assert await call(path, "test.poke", {"n": 3}) == {"poked": 1}
            with pytest.raises(ClientError) as exc:
                await call(path, "test.poke", {"x": 1})
            socket_refusal = (exc.value.code, exc.value.message)
            n.cancel_scope.cancel()
        session = await login(app, clock)
        assert (await web_call(app, session, "test.poke", {"n": 4}))["result"] == {"poked": 2}
        reply = await web_call(app, session, "test.poke", {"x": 1})
        assert (reply["error"]["code"], reply["error"]["message"]) == socket_refusal
    assert poked == [{"n": 3}, {"n": 4}]


async def test_console_methods_join_the_table_for_web_sessions_only(tmp_path):
    table, _ = poke_table()
    table.add(handler("ui.open", "write", lambda p: None, "clanctl's", surfaces=("socket",)))
    ConsoleActions(table, AdminKeySource(str(tmp_path / "no.key"))).register()
    console = {h.name: h for h in table.handlers(1, "web") if h.name.startswith("console.")}
    assert {n: h.access for n, h in console.items()} == {
        "console.session": "read",
        "console.vm": "write",
        "console.inventory_text": "read",
        "console.inventory_diff": "read",
        "console.inventory_apply": "write",
    }
    # the socket never offers them (they sign with the web session's key) ...
    for name in console:
        with pytest.raises(ControlError) as exc:
            table.lookup(1, name, "socket")
        assert exc.value.code == "unknown_method"
    assert not [h for h in table.handlers(1, "socket") if h.name.startswith("console.")]
    # ... and the browser never gets clanctl's ui.open
    clock = Clock()
    app = web_app(table, clock)
    session = await login(app, clock)
    with trio.fail_after(10):
        reply = await web_call(app, session, "ui.open", {})
        assert reply["error"]["code"] == "permission_denied"
        assert "not for the browser" in reply["error"]["message"]
        # a console method runs in a web session, through the same table
        reply = await web_call(app, session, "console.session", {})
        assert reply["result"]["admin_key"]["available"] is False
    # one name, one handler: a second registration is a bug, found at start-up
    with pytest.raises(ValueError):
        ConsoleActions(table, AdminKeySource()).register()


def test_the_agents_table_keeps_every_method_clanctl_knows(tmp_path):
    from clanagent.agent import Agent

    agent = Agent(Config(state_dir=str(tmp_path / "s")))
    got = {h.name: h.access for h in agent.api.handlers(1, "socket")}
    assert list(got.items()) == list(CLANCTL_METHODS.items())
    # the console's methods arrive with the console, into this same table
    from clanagent.web import WebConsole

    WebConsole(agent.cfg, agent.api)
    assert "console.vm" in {h.name for h in agent.api.handlers(1, "web")}
    assert {h.name for h in agent.api.handlers(1, "socket")} == set(CLANCTL_METHODS)
