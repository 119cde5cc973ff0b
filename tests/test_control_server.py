"""The control server over a real unix socket, with a small fake agent."""

from __future__ import annotations

import os
import socket
import stat
import struct

import pytest
import trio

from clanagent._eventbus import EventBus
from clanagent.config import ControlConfig
from clanagent.control import api
from clanagent.control.client import AgentNotRunning, ClientError, ControlClient
from clanagent.control.server import ControlServer, PeerCred, authorize
from clanagent.wire import pack

from .conftest import requires_root


class FakeAgent:
    def __init__(self) -> None:
        self.bus = EventBus(buffer=4)

    def status(self):
        return {"node_id": "n1", "capabilities": []}

    def whoami(self):
        return {"node_id": "n1"}

    def peers(self):
        return [{"node_id": "n2", "state": "alive"}]

    async def events(self):
        async for ev in self.bus.subscribe():
            yield ev


async def start_server(nursery, tmp_path, **kw) -> tuple[ControlServer, FakeAgent]:
    agent = FakeAgent()
    cfg = kw.pop("cfg", ControlConfig(socket=str(tmp_path / "ctl.sock"), max_request=4096))
    server = ControlServer(tmp_path / "ctl.sock", agent, cfg, **kw)
    await nursery.start(server.serve)
    return server, agent


async def call(path, method, params=None, version=1):
    def run():
        with ControlClient(path, timeout=5) as c:
            return c.call(method, params, version=version)

    return await trio.to_thread.run_sync(run)


async def raw_exchange(path, payload: bytes, read=True) -> bytes:
    def run():
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while read:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        s.close()
        return out

    return await trio.to_thread.run_sync(run)


def decode_replies(data: bytes) -> list[dict]:
    from clanagent.wire import unpack

    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(unpack(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def frame(msg) -> bytes:
    body = pack(msg)
    return struct.pack(">I", len(body)) + body


async def test_read_handlers(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path)
            assert (await call(server.path, "status"))["node_id"] == "n1"
            assert (await call(server.path, "whoami"))["node_id"] == "n1"
            assert (await call(server.path, "peers"))[0]["state"] == "alive"
            names = {m["name"] for m in await call(server.path, "methods")}
            assert {"status", "whoami", "peers", "events"} <= names
            n.cancel_scope.cancel()


async def test_socket_mode_and_cleanup(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path)
            mode = stat.S_IMODE(os.stat(server.path).st_mode)
            assert mode == 0o660
            n.cancel_scope.cancel()
    assert not server.path.exists()


async def test_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "ctl.sock"))
    stale.close()  # the file stays, nobody listens: like a crashed agent
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path)
            assert (await call(server.path, "whoami"))["node_id"] == "n1"
            second = ControlServer(server.path, FakeAgent(), server.cfg)
            with pytest.raises(RuntimeError, match="already listening"):
                await n.start(second.serve)
            n.cancel_scope.cancel()


async def test_errors_get_replies_and_the_connection_survives(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path)
            payload = (
                frame({"id": 1, "method": "nope"})
                + frame({"id": 2, "method": "status", "v": 99})
                + struct.pack(">I", 2)
                + b"\xc1\xc1"
                + frame({"id": 4, "method": "status", "params": {"x": 1}})
                + frame({"id": 5, "method": "status"})
            )
            replies = decode_replies(await raw_exchange(server.path, payload))
            codes = [(r["id"], r.get("error", {}).get("code")) for r in replies]
            assert codes == [
                (1, "unknown_method"),
                (2, "unsupported_version"),
                (-1, "bad_request"),
                (4, "invalid_params"),
                (5, None),
            ]
            assert replies[-1]["ok"] is True
            assert "known: " in replies[0]["error"]["message"]
            assert server.counters()["error_unknown_method"] == 1
            n.cancel_scope.cancel()


async def test_oversized_request_closes_that_client_only(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path)
            replies = decode_replies(
                await raw_exchange(server.path, struct.pack(">I", 10**9) + b"x" * 100)
            )
            assert replies[0]["error"]["code"] == "too_large"
            # garbage, then an abrupt close mid-frame: the server shrugs
            await raw_exchange(server.path, b"\x00\x00\x01\x00partial", read=False)
            assert (await call(server.path, "status"))["node_id"] == "n1"
            n.cancel_scope.cancel()


async def test_handler_crash_is_an_internal_error(tmp_path, monkeypatch):
    def boom():
        raise KeyError("kaput")

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, agent = await start_server(n, tmp_path)
            monkeypatch.setattr(agent, "status", boom)
            with pytest.raises(ClientError) as exc:
                await call(server.path, "status")
            assert exc.value.code == "internal"
            assert (await call(server.path, "whoami"))["node_id"] == "n1"
            n.cancel_scope.cancel()


async def test_refused_caller_gets_a_clear_error(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(
                n, tmp_path, authorizer=lambda cred: (None, "permission denied: go away")
            )
            with pytest.raises(ClientError) as exc:
                await call(server.path, "status")
            assert exc.value.code == "permission_denied"
            assert "go away" in exc.value.message
            assert server.counters()["refused_group"] == 1
            n.cancel_scope.cancel()


async def test_read_only_caller_cannot_write(tmp_path):
    async def poke(params):
        return "poked"

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path, authorizer=lambda c: ("read", "test"))
            server.api.add(api.handler("poke", "write", poke, "test"))
            assert (await call(server.path, "status"))["node_id"] == "n1"
            with pytest.raises(ClientError) as exc:
                await call(server.path, "poke")
            assert exc.value.code == "permission_denied"
            assert "read-only" in exc.value.message
            n.cancel_scope.cancel()
        async with trio.open_nursery() as n:
            (tmp_path / "ctl.sock").unlink(missing_ok=True)
            server, _ = await start_server(n, tmp_path, authorizer=lambda c: ("write", "test"))
            server.api.add(api.handler("poke", "write", poke, "test"))
            assert await call(server.path, "poke") == "poked"
            n.cancel_scope.cancel()


async def test_events_stream_and_unsubscribe(tmp_path):
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, agent = await start_server(n, tmp_path)
            got = []

            def consume():
                with ControlClient(server.path, timeout=5) as c:
                    for ev in c.stream("events", timeout=5):
                        got.append(ev)
                        if len(got) == 3:
                            return

            async def publish():
                while agent.bus.subscribers == 0:
                    await trio.sleep(0.01)
                for i in range(3):
                    agent.bus.publish("test.event", i=i)

            n.start_soon(publish)
            await trio.to_thread.run_sync(consume)
            assert [e["i"] for e in got] == [0, 1, 2]
            assert all(e["type"] == "test.event" for e in got)
            while agent.bus.subscribers:  # the client left: the server unsubscribes
                await trio.sleep(0.01)
            n.cancel_scope.cancel()


async def test_slow_subscriber_is_told_what_it_lost():
    bus = EventBus(buffer=2)
    gen = bus.subscribe()
    async with trio.open_nursery() as n:
        got = []

        async def read():
            async for ev in gen:
                got.append(ev)
                if ev["type"] == "events.dropped":
                    return

        n.start_soon(read)
        while bus.subscribers == 0:
            await trio.sleep(0)
        for i in range(5):
            bus.publish("e", i=i)  # never blocks, even with a full buffer
    received = [e["i"] for e in got[:-1]]
    assert received == list(range(len(received)))  # in order, the oldest kept
    assert got[-1]["count"] == 5 - len(received) > 0  # and told exactly how many were lost


def test_client_says_when_no_agent_runs(tmp_path):
    with pytest.raises(AgentNotRunning) as exc:
        ControlClient(tmp_path / "none.sock").connect()
    assert "clanagent is not running (no socket at" in exc.value.message
    assert "systemctl start clanagent" in exc.value.message


# -- authorisation ---------------------------------------------------------

CFG = ControlConfig(group="ops", read_group="viewers")
GIDS = {"ops": 1000, "viewers": 1001}


def auth(cred, groups=()):
    cred = PeerCred(cred.pid, cred.uid, cred.gid, frozenset(groups))
    return authorize(cred, CFG, agent_uid=500, gid_of=lambda name: GIDS.get(name))


def test_authorize_table():
    assert auth(PeerCred(1, 0, 0))[0] == "write"
    assert auth(PeerCred(1, 500, 500))[0] == "write"
    assert auth(PeerCred(1, 777, 1000))[0] == "write"  # primary group
    assert auth(PeerCred(1, 777, 777), groups=[5, 1000])[0] == "write"  # supplementary
    assert auth(PeerCred(1, 777, 1001))[0] == "read"
    access, why = auth(PeerCred(1, 777, 777))
    assert access is None
    assert "uid 777" in why and "group 'ops'" in why and "'viewers'" in why


def test_authorize_without_groups_configured():
    access, why = authorize(PeerCred(1, 777, 777), ControlConfig(), agent_uid=500)
    assert access is None and "root or the agent's user" in why


@requires_root
async def test_real_peer_credentials_of_another_user():
    """A process running as nobody is refused by SO_PEERCRED even when the file mode lets it in."""
    import grp
    import pwd
    import shutil
    import tempfile
    from pathlib import Path

    # pytest's tmp_path sits under a 0700 directory nobody cannot traverse.
    tmp_path = Path(tempfile.mkdtemp(prefix="clanctl-"))
    tmp_path.chmod(0o755)

    nobody = pwd.getpwnam("nobody")
    nogroup = grp.getgrgid(nobody.pw_gid).gr_name
    sock_path = str(tmp_path / "ctl.sock")

    def as_nobody_blocking() -> str:
        # fork, not exec: a fresh interpreter as nobody could not read root's Python.
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: drop privileges, ask for status, report, exit
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(nobody.pw_gid)
                os.setuid(nobody.pw_uid)
                try:
                    with ControlClient(sock_path, timeout=5) as c:
                        out = "OK " + c.call("status")["node_id"]
                except ClientError as e:
                    out = f"ERR {e.code} {e.message}"
                os.write(w, out.encode())
            finally:
                os._exit(0)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        os.waitpid(pid, 0)
        return b"".join(chunks).decode()

    async def as_nobody() -> str:
        return await trio.to_thread.run_sync(as_nobody_blocking)

    with trio.fail_after(20):
        tmp_path.chmod(0o755)
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path)
            os.chmod(server.path, 0o666)  # let the connect through; peercred must still refuse
            out = await as_nobody()
            assert out.startswith("ERR permission_denied"), out
            assert f"uid {nobody.pw_uid}" in out
            n.cancel_scope.cancel()
        (tmp_path / "ctl.sock").unlink(missing_ok=True)
        async with trio.open_nursery() as n:
            cfg = ControlConfig(socket=str(tmp_path / "ctl.sock"), group=nogroup)
            server, _ = await start_server(n, tmp_path, cfg=cfg)
            assert grp.getgrgid(os.stat(server.path).st_gid).gr_name == nogroup
            out = await as_nobody()  # now its group is the control group: mode 0660 is enough
            assert out == "OK n1", out
            n.cancel_scope.cancel()
    shutil.rmtree(tmp_path)


# -- fault isolation ----------------------------------------------------------


async def test_a_fault_outside_any_handler_ends_that_connection_only(tmp_path):
    """A bug while admitting one caller (here: its group lookup) must not stop the server."""
    calls = []

    def flaky(cred):
        calls.append(cred.uid)
        if len(calls) == 1:
            raise RuntimeError("injected: group database fell over")
        return "write", "test"

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path, authorizer=flaky)
            with pytest.raises(ClientError) as exc:
                await call(server.path, "status")
            assert exc.value.code == "internal"  # told, not just hung up on
            assert (await call(server.path, "status"))["node_id"] == "n1"
            assert server.counters()["internal_errors"] == 1
            n.cancel_scope.cancel()


async def test_a_fault_while_accepting_drops_that_caller_only(tmp_path, monkeypatch):
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path)
            acquire = server.slots.acquire
            calls = []

            def flaky(uid, privileged):
                calls.append(uid)
                if len(calls) == 1:
                    raise RuntimeError("injected: slot table bug")
                return acquire(uid, privileged)

            monkeypatch.setattr(server.slots, "acquire", flaky)
            with pytest.raises(ClientError) as exc:
                await call(server.path, "status")
            assert exc.value.code == "disconnected"
            assert (await call(server.path, "status"))["node_id"] == "n1"
            assert server.counters()["internal_errors"] == 1
            n.cancel_scope.cancel()


async def test_a_handler_fault_is_logged_once_per_uid_and_counted_each_time(
    tmp_path, monkeypatch, caplog
):
    def boom():
        raise KeyError("kaput")

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, agent = await start_server(n, tmp_path)
            monkeypatch.setattr(agent, "status", boom)
            for _ in range(3):
                with pytest.raises(ClientError) as exc:
                    await call(server.path, "status")
                assert exc.value.code == "internal"
                assert "KeyError" in exc.value.message
            assert (await call(server.path, "whoami"))["node_id"] == "n1"
            assert server.counters()["internal_errors"] == 3
            n.cancel_scope.cancel()
    logged = [r for r in caplog.records if "control request failed" in r.getMessage()]
    assert len(logged) == 1
    assert logged[0].exc_info is not None and logged[0].exc_info[0] is KeyError


async def test_a_broken_event_source_ends_that_stream_with_an_error(tmp_path, monkeypatch):
    async def events():
        yield {"type": "first"}
        raise ValueError("injected: event source broke")

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, agent = await start_server(n, tmp_path)
            monkeypatch.setattr(agent, "events", events)
            got = []

            def consume():
                with ControlClient(server.path, timeout=5) as c:
                    for ev in c.stream("events", timeout=5):
                        got.append(ev)

            with pytest.raises(ClientError) as exc:
                await trio.to_thread.run_sync(consume)
            assert exc.value.code == "internal"
            assert got == [{"type": "first"}]
            assert (await call(server.path, "status"))["node_id"] == "n1"
            assert server.counters()["internal_errors"] == 1
            n.cancel_scope.cancel()


# -- clanctl status ----------------------------------------------------------


async def test_clanctl_status_shows_the_counters(tmp_path, monkeypatch, capsys):
    from clanagent.cli import clanctl

    status = {
        "name": "m1",
        "short_id": "abc",
        "node_id": "n1",
        "version": "0.1",
        "pid": 1,
        "uptime_s": 5,
        "state_dir": "/s",
        "records": 3,
        "capabilities": [],
        "counters": {
            "control": {"accepted": 12, "internal_errors": 0, "refused_slots": 2},
            "gossip": {f"counter_{i:02d}": i for i in range(12)},
        },
    }
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, agent = await start_server(n, tmp_path)
            monkeypatch.setattr(agent, "status", lambda: status)
            rc = await trio.to_thread.run_sync(
                clanctl.main, ["--socket", str(server.path), "status"]
            )
            n.cancel_scope.cancel()
    assert rc == 0
    out = capsys.readouterr().out
    head = "\ncounters (those not 0; --json shows all)\n"
    section = out[out.index(head) :].splitlines()[2:]
    assert section[0].split() == ["control", "accepted", "12,", "refused_slots", "2"]
    assert section[1].startswith("  gossip   counter_01 1, counter_02 2")
    assert len(section) > 2 and all(len(line) <= 96 for line in section)  # wrapped
    assert "counter_11 11" in " ".join(section)
