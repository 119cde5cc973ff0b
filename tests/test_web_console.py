"""The web console inside a running agent, behind hypercorn, over real sockets.

`ui.open` over the control socket starts it and mints the login URL; the
login, the WebSocket API, the inventory editor (diff, then sign with the
admin key the agent may read), and what happens with a port in use or an
oversized message.  Also `clanctl ui`.
"""

from __future__ import annotations

import base64
import json
import socket
import time
import urllib.error
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path

import nacl.signing
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from clanagent.cli import clanctl
from clanagent.config import Config, ControlConfig, GossipSection, MeshSection, WebSection
from clanagent.control.client import ClientError
from clanagent.identity import load_or_create
from clanagent.inventory import make_version

from .test_inventory_agent import call, genesis, machine_entry, start

pytestmark = pytest.mark.integration


def cfg_for(tmp_path, *, enabled: bool = False, port: int = 0) -> Config:
    return Config(
        state_dir=str(tmp_path / "s1"),
        runtime_dir=str(tmp_path / "run1"),
        control=ControlConfig(socket=str(tmp_path / "c1.sock")),
        gossip=GossipSection(listen="127.0.0.1:0", profile="local", name="m1"),
        mesh=MeshSection(wireguard=False, mdns=False),
        web=WebSection(enabled=enabled, port=port),
    )


def write_key(path, key: nacl.signing.SigningKey) -> str:
    path.write_text(base64.b64encode(bytes(key)).decode() + "\n")
    path.chmod(0o600)
    return str(path)


@asynccontextmanager
async def founded_agent(tmp_path, **kw):
    admin = nacl.signing.SigningKey.generate()
    ident = load_or_create(tmp_path / "s1")[0]
    doc = genesis(admin, {"m1": machine_entry(ident, ["server"])})
    version = make_version(doc, [], int(time.time()), "founded", [admin])
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            agent, _ = await start(n, cfg_for(tmp_path, **kw))
            await call(agent, "inventory.submit", {"version": version.to_wire(), "init": True})
            yield agent, admin
            n.cancel_scope.cancel()


def _post(url: str, body: dict, **headers: str) -> tuple[int, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"text": raw.decode()}


async def login(url: str) -> tuple[str, str]:
    """(base URL, session) from a login URL, as the page's script does it."""
    base, _, token = url.partition("/login?token=")
    status, reply = await trio.to_thread.run_sync(
        lambda: _post(f"{base}/session", {"token": token}, Origin=base)
    )
    assert status == 200, reply
    return base, reply["session"]


class Api:
    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = 0

    async def call(self, method: str, params: dict | None = None) -> dict:
        self.ids += 1
        await self.ws.send_message(
            json.dumps({"id": self.ids, "method": method, "params": params or {}})
        )
        while True:
            msg = json.loads(await self.ws.get_message())
            if msg.get("id") == self.ids:
                return msg


@asynccontextmanager
async def api(base: str, session: str):
    ws_url = base.replace("http://", "ws://") + "/api"
    async with open_websocket_url(ws_url, extra_headers=[("Origin", base)]) as ws:
        await ws.send_message(json.dumps({"auth": session}))
        assert json.loads(await ws.get_message())["ok"] is True
        yield Api(ws)


async def test_ui_open_logs_in_and_serves_the_api(tmp_path):
    async with founded_agent(tmp_path) as (agent, admin):
        caps = {c["name"]: c for c in (await call(agent, "status"))["capabilities"]}
        assert caps["web"]["available"] is False and "clanctl ui" in caps["web"]["reason"]
        opened = await call(agent, "ui.open")
        assert opened["url"].startswith("http://127.0.0.1:")
        assert opened["admin_key"]["available"] is False
        caps = {c["name"]: c for c in (await call(agent, "status"))["capabilities"]}
        assert caps["web"]["available"] and str(opened["port"]) in caps["web"]["reason"]
        base, session = await login(opened["url"])
        # the same link does not work twice
        token = opened["url"].rpartition("=")[2]
        status, reply = await trio.to_thread.run_sync(
            lambda: _post(f"{base}/session", {"token": token}, Origin=base)
        )
        assert status == 401 and "clanctl ui" in reply["error"]
        # a foreign Host (DNS rebinding) gets nothing, even with a valid token
        token2 = (await call(agent, "ui.open"))["url"].rpartition("=")[2]
        status, reply = await trio.to_thread.run_sync(
            lambda: _post(f"{base}/session", {"token": token2}, Origin=base, Host="evil.example:80")
        )
        assert status == 403
        async with api(base, session) as a:
            topo = (await a.call("topology"))["result"]
            assert [m["name"] for m in topo["machines"]] == ["m1"] and topo["self"] == "m1"
            assert (await a.call("machines"))["result"][0]["node_key"] == (
                agent.identity.public_key.hex()
            )
            sess = (await a.call("console.session"))["result"]
            assert sess["node"] == "m1" and sess["admin_key"]["available"] is False
        # a WebSocket from another origin is refused by the real server too
        ws_url = base.replace("http://", "ws://") + "/api"
        with pytest.raises(ConnectionRejected):
            async with open_websocket_url(
                ws_url, extra_headers=[("Origin", "http://evil.example")]
            ):
                pass


async def test_the_inventory_editor_signs_only_with_the_admin_key(tmp_path):
    async with founded_agent(tmp_path) as (agent, admin):
        base, session = await login((await call(agent, "ui.open"))["url"])
        async with api(base, session) as a:
            shown = (await a.call("console.inventory_text"))["result"]
            assert 'tags = ["server"]' in shown["toml"]
            edited = shown["toml"].replace('tags = ["server"]', 'tags = ["server", "web"]')
            diff = (await a.call("console.inventory_diff", {"text": edited}))["result"]
            assert diff["errors"] == [] and "machines.m1.tags" in diff["diff"]
            bad = (await a.call("console.inventory_diff", {"text": edited + "\n[oops"}))["result"]
            assert bad["errors"] and "TOML" in bad["errors"][0] and bad["changes"] == []
            apply = {"text": edited, "leaves": diff["leaves"], "message": "tag m1"}
            err = (await a.call("console.inventory_apply", apply))["error"]
            assert err["code"] == "permission_denied" and "no admin key" in err["message"]
        # a key that is not the clan's admin key is not offered for signing
        # (each login has its own key: the one `clanctl ui` named for it)
        other = write_key(tmp_path / "other.key", nacl.signing.SigningKey.generate())
        base, session = await login((await call(agent, "ui.open", {"admin_key": other}))["url"])
        async with api(base, session) as a:
            sess = (await a.call("console.session"))["result"]
            assert not sess["admin_key"]["available"]
            assert "not an admin key of this clan" in sess["admin_key"]["reason"]
        # the real admin key, readable by the agent
        opened = await call(agent, "ui.open", {"admin_key": write_key(tmp_path / "a.key", admin)})
        assert opened["admin_key"]["available"] is True
        base, session = await login(opened["url"])
        async with api(base, session) as a:
            stale = {**apply, "leaves": ["00" * 32]}
            err = (await a.call("console.inventory_apply", stale))["error"]
            assert "changed since this diff was shown" in err["message"]
            done = await a.call("console.inventory_apply", apply)
            assert done["ok"], done
            assert done["result"]["status"] == "accepted"
            again = (await a.call("console.inventory_apply", apply))["error"]
            assert "changed since" in again["message"] or "nothing to apply" in again["message"]
            # VM orders are signed here and go through vm.request: its checks answer
            err = (await a.call("console.vm", {"name": "ghost", "action": "stop"}))["error"]
            assert err["code"] == "invalid_params" and "no VM 'ghost'" in err["message"]
        shown = await call(agent, "inventory.show")
        assert shown["doc"]["machines"]["m1"]["tags"] == ["server", "web"]
        assert (await call(agent, "inventory.history"))[0]["message"] == "tag m1"


async def test_an_oversized_message_closes_only_that_socket(tmp_path):
    async with founded_agent(tmp_path) as (agent, _):
        base, session = await login((await call(agent, "ui.open"))["url"])
        limit = agent.cfg.control.max_request
        async with api(base, session) as a:
            too_big = json.dumps({"id": 1, "method": "status", "params": {"x": "y" * (limit + 10)}})
            await a.ws.send_message(too_big)
            reply = json.loads(await a.ws.get_message())
            assert reply["error"]["code"] == "too_large" and str(limit) in reply["error"]["message"]
            assert (await a.call("status"))["ok"]  # the socket lives on
        async with api(base, session) as a:
            with pytest.raises(ConnectionClosed) as closed:
                await a.ws.send_message("x" * (4 * limit + 10))
                await a.ws.get_message()
            assert closed.value.reason.code == 1009  # hypercorn's own limit
        async with api(base, session) as a:
            assert (await a.call("status"))["ok"]
        assert (await call(agent, "status"))["name"] == "m1"


async def test_enabled_in_config_and_a_port_in_use(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    try:
        async with founded_agent(tmp_path, enabled=True, port=port) as (agent, _):
            caps = {c["name"]: c for c in (await call(agent, "status"))["capabilities"]}
            assert caps["web"]["available"] is False
            assert f"cannot listen on 127.0.0.1:{port}" in caps["web"]["reason"]
            assert "web.port" in caps["web"]["reason"]
            with pytest.raises(ClientError) as exc:
                await call(agent, "ui.open")
            assert exc.value.code == "unavailable" and "web.port" in exc.value.message
            with pytest.raises(ClientError) as exc:
                await call(agent, "ui.open", {"admin_key": "relative/admin.key"})
            assert "absolute path" in exc.value.message
            blocker.close()
            opened = await call(agent, "ui.open")  # free now: it starts
            assert opened["port"] == port
    finally:
        blocker.close()


async def test_enabled_in_config_serves_from_the_start(tmp_path):
    async with founded_agent(tmp_path, enabled=True) as (agent, _):
        caps = {c["name"]: c for c in (await call(agent, "status"))["capabilities"]}
        assert caps["web"]["available"] and caps["web"]["reason"].startswith("console at http://")


async def test_clanctl_ui_prints_the_url(tmp_path, capsys, monkeypatch):
    async with founded_agent(tmp_path) as (agent, admin):
        sock = agent.cfg.control.socket
        monkeypatch.chdir(tmp_path)
        write_key(tmp_path / "admin.key", admin)
        code = await trio.to_thread.run_sync(
            clanctl.main, ["--socket", sock, "ui", "--admin-key", "admin.key"]
        )
        out = capsys.readouterr().out
        assert code == 0
        assert "web console: http://127.0.0.1:" in out and "/login?token=" in out
        assert "open it in a browser" in out and "read-only" not in out
        signers = [sig for _, _, sig in agent.web.auth._logins.values()]
        assert (str(tmp_path / "admin.key"), None) in signers  # made absolute; root: any owner
        code = await trio.to_thread.run_sync(
            clanctl.main, ["--socket", sock, "--json", "ui", "--admin-key", "missing.key"]
        )
        shown = json.loads(capsys.readouterr().out)
        assert code == 0 and shown["admin_key"]["available"] is False
        assert "missing.key" in shown["admin_key"]["reason"]
        url = shown["url"]
        base, session = await login(url)
        assert session


async def test_a_control_group_member_signs_only_with_a_key_of_their_own(tmp_path):
    """The agent runs as root: `clanctl ui` by someone else must not lend them
    root's (or anyone's) admin key, by default path, by naming it, or by a symlink."""
    import os

    from clanagent.control.server import CURRENT_PEER, PeerCred
    from clanagent.web.actions import SIGNER
    from clanagent.web.api import signer_for

    async def ui_open(admin_key: str):
        return await agent.api.call("ui.open", {"admin_key": admin_key})

    async with founded_agent(tmp_path) as (agent, admin):
        roots_key = tmp_path / "root-admin.key"
        write_key(roots_key, admin)  # owned by root (uid 0), like the agent
        opened = await ui_open(str(roots_key))  # root itself: fine
        assert opened["admin_key"]["available"] is True
        nobody = 65534
        CURRENT_PEER.set(PeerCred(pid=1, uid=nobody, gid=nobody))
        # no key named: no key at all (no fallback on the agent's default path)
        assert signer_for("", agent.web.keys) is None
        opened = await ui_open("")
        assert opened["admin_key"]["available"] is False
        assert "no admin key" in opened["admin_key"]["reason"]
        # naming root's key: refused when it is read (it is not theirs)
        opened = await ui_open(str(roots_key))
        assert opened["admin_key"]["available"] is False
        assert "is not yours" in opened["admin_key"]["reason"]
        # a key file that is theirs works
        theirs = tmp_path / "their-admin.key"
        write_key(theirs, admin)
        os.chown(theirs, nobody, nobody)
        opened = await ui_open(str(theirs))
        assert opened["admin_key"]["available"] is True
        # a symlink of theirs pointing at root's key is not followed
        link = tmp_path / "link.key"
        link.symlink_to(roots_key)
        SIGNER.set((str(link), nobody))
        key, why = agent.web.keys.load()
        assert key is None and "cannot read" in why
        SIGNER.set((str(link), None))
        key, why = agent.web.keys.load()
        assert key is None  # not even for root: the console never follows a link


def test_the_console_reads_only_small_regular_key_files(tmp_path):
    """The agent (root) opens a path someone else named: a FIFO must not block it,
    a device or directory is refused, a huge or binary file is a clear error."""
    import os

    from clanagent.web.actions import SIGNER, AdminKeySource

    keys = AdminKeySource()
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    big = tmp_path / "big.key"
    big.write_bytes(b"A" * 100_000)
    big.chmod(0o600)
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    binary.chmod(0o600)
    loose = tmp_path / "loose.key"
    write_key(loose, nacl.signing.SigningKey.generate())
    loose.chmod(0o644)
    for path, why in (
        (fifo, "not a regular file"),
        (tmp_path, "not a regular file"),
        ("/dev/null", "not a regular file"),
        (big, "too large"),
        (binary, "not an admin key"),
        (loose, "chmod 600"),
    ):
        SIGNER.set((str(path), None))
        key, reason = keys.load()  # returns at once: no blocking open
        assert key is None and why in reason, (path, reason)
    good = tmp_path / "good.key"
    admin = nacl.signing.SigningKey.generate()
    write_key(good, admin)
    SIGNER.set((str(good), None))
    key, reason = keys.load()
    assert key is not None and bytes(key.verify_key) == bytes(admin.verify_key), reason


async def test_the_browser_cannot_mint_logins(tmp_path):
    async with founded_agent(tmp_path) as (agent, _):
        opened = await call(agent, "ui.open")
        base, session = await login(opened["url"])
        async with api(base, session) as a:
            reply = await a.call("ui.open", {})
        assert reply["ok"] is False and reply["error"]["code"] == "permission_denied"
        assert "clanctl" in reply["error"]["message"]


def test_clanctl_ui_open_keeps_the_token_off_command_lines(monkeypatch):
    """`--open` hands the browser a private redirect file, not the URL itself
    (a browser's argv is readable by every local user in /proc)."""
    import os
    import stat
    import webbrowser

    from clanagent.cli._ui_cmds import _open_privately

    url = "http://127.0.0.1:7780/login?token=SECRET-TOKEN"
    seen = {}

    def fake_open(arg):
        seen["arg"] = arg
        path = arg.removeprefix("file://")
        seen["mode"] = stat.S_IMODE(os.stat(path).st_mode)
        seen["dir_mode"] = stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)
        seen["body"] = Path(path).read_text()
        seen["path"] = path
        return True

    monkeypatch.setattr(webbrowser, "open", fake_open)
    monkeypatch.setattr("time.sleep", lambda s: None)
    assert _open_privately(url) is True
    assert "SECRET-TOKEN" not in seen["arg"] and seen["arg"].startswith("file://")
    assert seen["mode"] == 0o600 and seen["dir_mode"] == 0o700
    assert "SECRET-TOKEN" in seen["body"] and "refresh" in seen["body"]
    assert not os.path.exists(seen["path"])  # removed after the browser read it


async def test_an_edit_keeps_sealed_endpoints_and_no_thread_calls_back_into_the_loop(
    tmp_path, monkeypatch
):
    """The console signs with inventory/edit.py: it asks the agent for the endpoints
    only the agent can open (on the loop), then seals and signs in a worker thread
    that only computes -- a thread calling back into trio fails this test."""
    from clanagent.inventory.sealing import reseal_doc

    def no_callback(*a, **k):
        raise AssertionError("a worker thread called back into the trio loop")

    monkeypatch.setattr(trio.from_thread, "run", no_callback)
    monkeypatch.setattr(trio.from_thread, "run_sync", no_callback)
    admin = nacl.signing.SigningKey.generate()
    ident = load_or_create(tmp_path / "s1")[0]
    doc = genesis(admin, {"m1": machine_entry(ident, ["server"], ["198.51.100.7:7946"])})
    doc = reseal_doc(doc, {})
    version = make_version(doc, [], int(time.time()), "founded", [admin])
    key = write_key(tmp_path / "a.key", admin)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            agent, _ = await start(n, cfg_for(tmp_path))
            await call(agent, "inventory.submit", {"version": version.to_wire(), "init": True})
            base, session = await login((await call(agent, "ui.open", {"admin_key": key}))["url"])
            async with api(base, session) as a:
                shown = (await a.call("console.inventory_text"))["result"]
                assert "198.51.100.7" not in shown["toml"]  # sealed in the document
                edited = shown["toml"].replace('tags = ["server"]', 'tags = ["server", "web"]')
                diff = (await a.call("console.inventory_diff", {"text": edited}))["result"]
                apply = {"text": edited, "leaves": diff["leaves"], "message": "tag m1"}
                done = await a.call("console.inventory_apply", apply)
                assert done["ok"], done
            shown = await call(agent, "inventory.show")
            assert shown["doc"]["machines"]["m1"]["tags"] == ["server", "web"]
            assert (
                shown["doc"]["machines"]["m1"]["sealed_endpoints"]
                != doc["machines"]["m1"]["sealed_endpoints"]
            )  # resealed, with the endpoints the agent opened
            opened = await call(agent, "inventory.endpoints")
            assert opened["m1"] == ["198.51.100.7:7946"]
            n.cancel_scope.cancel()
