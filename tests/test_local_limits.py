"""Local users cannot lock the admin out of the control socket.

Connection slots (a reserve only root and the agent's user may take, a cap
per user), the deadlines of a connection, and `clanctl status` still
answering when the agent is out of file descriptors.  Real unix sockets,
real other users (see _as_user.py), a real subprocess at a lowered
RLIMIT_NOFILE.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from clanagent.config import ControlConfig
from clanagent.control.client import ControlClient
from clanagent.control.protocol import encode_frame
from clanagent.control.server import ControlServer, Slots
from clanagent.wire import unpack

from . import _as_user
from .test_control_server import FakeAgent, call

FILL = "cactl-fill"
FILLERS = [f"cactl-f{i}" for i in range(8)]
REPO = Path(__file__).resolve().parent.parent


# -- the slot rules ------------------------------------------------------------


def test_slot_rules():
    slots = Slots(total=64, reserved=8, per_uid=8)
    for _ in range(8):
        assert slots.acquire(1000, privileged=False) is None
    assert "already holds 8" in slots.acquire(1000, privileged=False)
    for uid in range(1001, 1007):  # six more users: 56 slots taken by others
        for _ in range(8):
            assert slots.acquire(uid, privileged=False) is None
    assert slots.others == 56
    why = slots.acquire(2000, privileged=False)
    assert "56 control connections open to users other than root" in why
    for _ in range(8):  # the reserve is root's (or the agent user's)
        assert slots.acquire(0, privileged=True) is None
    assert "all 64" in slots.acquire(0, privileged=True)
    slots.release(1000, privileged=False)
    assert slots.acquire(2000, privileged=False) is None
    assert slots.by_uid[2000] == 1 and slots.in_use == 64
    for uid in (0,) * 8:
        slots.release(uid, privileged=True)
    assert 0 not in slots.by_uid
    with pytest.raises(ValueError):
        slots.release(0, privileged=True)


def test_slot_limits_come_from_the_config():
    server = ControlServer(
        Path("/nonexistent/ctl.sock"),
        FakeAgent(),
        ControlConfig(max_connections=10, reserved_connections=3, max_connections_per_user=2),
    )
    assert (server.slots.total, server.slots.reserved, server.slots.per_uid) == (10, 3, 2)
    defaults = ControlConfig()
    assert (defaults.max_connections, defaults.reserved_connections) == (64, 8)
    assert defaults.max_connections_per_user == 8


def test_bad_slot_settings_are_refused_with_the_key():
    from clanagent.config import ConfigError, load_config

    missing = Path("/nonexistent/agent.toml")
    for key, value, words in (
        ("control.reserved_connections", 64, "below control.max_connections (64)"),
        ("control.reserved_connections", -1, "0 or more"),
        ("control.max_connections_per_user", 0, "at least 1"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as exc:
            load_config(missing, overrides={key: value})
        assert words in str(exc.value)
    cfg = load_config(missing, overrides={"control.max_connections": 16})
    assert cfg.control.max_connections == 16


# -- real users holding every slot they may --------------------------------------


@pytest.fixture(scope="module")
def fillers():
    _as_user.skip_unless_root()
    _as_user.ensure_group(FILL)
    users = [_as_user.ensure_user(name, (FILL,)) for name in FILLERS]
    yield users
    for name in FILLERS:
        _as_user.remove_user(name)
    _as_user.remove_group(FILL)


async def _settled(server: ControlServer, total: int) -> None:
    """Wait until the server has taken in (or refused) `total` connections."""
    while True:
        c = server.counters()
        if c["accepted"] + c["refused_slots"] >= total:
            return
        await trio.sleep(0.01)


async def test_local_users_holding_every_slot_they_may_cannot_lock_root_out(fillers):
    where = _as_user.shared_dir("clanctl-slots-")
    path = where / "ctl.sock"
    cfg = ControlConfig(socket=str(path), read_group=FILL)  # defaults: 64 slots, 8 reserved
    server = ControlServer(path, FakeAgent(), cfg)
    holders: list[_as_user.Holder] = []
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                await n.start(server.serve)
                # Seven users take 8 each (one more each is refused): 56 slots, all
                # that users other than root may hold.  An eighth user gets none.
                for i, user in enumerate(fillers):
                    holder = await trio.to_thread.run_sync(_as_user.Holder, user, path, 9)
                    holders.append(holder)
                    await _settled(server, 9 * (i + 1))
                for i, holder in enumerate(holders):
                    held, refused = await trio.to_thread.run_sync(holder.check)
                    messages = [unpack(r)["error"]["message"] for r in refused]
                    if i < 7:
                        assert (held, len(refused)) == (8, 1)
                        assert "already holds 8 control connections" in messages[0]
                    else:
                        assert (held, len(refused)) == (0, 9)
                        assert all("other than root" in m for m in messages), messages
                assert server.counters()["active"] == 56
                assert server.counters()["refused_slots"] == 7 + 9

                def root_status() -> float:
                    start = time.monotonic()
                    with ControlClient(path, timeout=1) as c:
                        assert c.call("status")["node_id"] == "n1"
                    return time.monotonic() - start

                for _ in range(3):
                    assert await trio.to_thread.run_sync(root_status) < 1.0
                for holder in holders:
                    await trio.to_thread.run_sync(holder.close)
                holders.clear()
                while server.counters()["active"]:  # every slot comes back
                    await trio.sleep(0.01)
                n.cancel_scope.cancel()
    finally:
        for holder in holders:
            holder.close()
        shutil.rmtree(where, ignore_errors=True)


# -- deadlines -----------------------------------------------------------------


class BigAgent(FakeAgent):
    def status(self):
        return {"node_id": "n1", "blob": ["x" * 10_000] * 20}


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(str(path))
    return s


def _read_until_eof(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return out
        out += chunk


async def test_idle_slow_and_stalled_connections_are_closed(tmp_path):
    path = tmp_path / "ctl.sock"
    server = ControlServer(
        path,
        BigAgent(),
        ControlConfig(socket=str(path)),
        idle_timeout=0.5,
        request_timeout=0.5,
        send_timeout=0.5,
    )

    def idle() -> float:
        start = time.monotonic()
        with _connect(path) as s:
            assert _read_until_eof(s) == b""
        return time.monotonic() - start

    def dribble() -> tuple[float, bytes]:
        # One byte every 0.1 s: never idle, but the request is never whole.
        start = time.monotonic()
        with _connect(path) as s:
            data = struct.pack(">I", 1000) + b"\x80" * 1000
            for byte in data:
                try:
                    s.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                time.sleep(0.1)
            return time.monotonic() - start, _read_until_eof(s)

    def stall() -> None:
        # Ask for many large replies and read none of them.
        with _connect(path) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            request = encode_frame({"id": 1, "v": 1, "method": "status", "params": {}})
            try:
                s.sendall(request * 30)
            except (BrokenPipeError, ConnectionResetError):
                pass
            deadline = time.monotonic() + 5
            while server.counters()["timeouts"] < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            _read_until_eof(s)  # the server gave up on us: the stream ends

    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            await n.start(server.serve)
            took = await trio.to_thread.run_sync(idle)
            assert 0.4 < took < 3
            assert server.counters()["idle_closed"] == 1

            took, reply = await trio.to_thread.run_sync(dribble)
            assert took < 3  # the idle deadline alone would never end it
            assert unpack(reply[4:])["error"]["code"] == "timeout"
            assert server.counters()["timeouts"] == 1

            async with trio.open_nursery() as stalled:
                stalled.start_soon(trio.to_thread.run_sync, stall)
                while server.counters()["timeouts"] < 2:
                    # meanwhile everyone else is served
                    assert (await call(path, "status"))["node_id"] == "n1"
                    await trio.sleep(0.05)
            assert server.counters()["timeouts"] == 2
            while server.counters()["active"]:
                await trio.sleep(0.01)
            n.cancel_scope.cancel()


# -- at the fd limit ---------------------------------------------------------------

# A control server in its own process, at a low RLIMIT_NOFILE, that then takes
# every fd left and any that frees up, as a flood on another listener would.
_SERVER = r"""
import json, os, resource, sys
from pathlib import Path

import trio

from clanagent.config import ControlConfig
from clanagent.control.server import ControlServer

path, nofile, extra = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])


class Agent:
    server = None

    def status(self):
        return {"node_id": "n1", "counters": {"control": self.server.counters()}}


async def main():
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    agent = Agent()
    agent.server = server = ControlServer(Path(path), agent, ControlConfig(socket=path, **extra))
    async with trio.open_nursery() as n:
        await n.start(server.serve)
        hog = []

        def grab():
            while True:
                try:
                    hog.append(os.open(os.devnull, os.O_RDONLY))
                except OSError:
                    return

        grab()
        print("ready", len(hog), flush=True)
        while True:  # and keeps taking any fd that frees up
            await trio.sleep(0.02)
            grab()


trio.run(main)
"""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_status_answers_at_the_fd_limit_and_the_accept_loop_does_not_spin(request):
    root = _as_user.have_root()
    where = _as_user.shared_dir("clanctl-fds-")
    path = where / "ctl.sock"
    extra = {}
    if root:
        users = request.getfixturevalue("fillers")
        extra = {"read_group": FILL}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(path), "128", __import__("json").dumps(extra)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        word, hogged = proc.stdout.readline().split()
        assert word == "ready" and int(hogged) > 0

        def status(timeout: float = 1.0) -> dict:
            start = time.monotonic()
            with ControlClient(path, timeout=timeout) as c:
                st = c.call("status")
            assert time.monotonic() - start < 1.0
            return st

        for _ in range(5):  # the reserve comes back after each answer
            st = status()
        # (a call arriving while the reserve is still lent to the one before
        # is accepted on it without meeting EMFILE)
        assert st["counters"]["control"]["accept_errors"] >= 1

        if root:  # another user is told why, and the spare comes back for root
            lines = _as_user.call_as(
                users[0], path, encode_frame({"id": 1, "v": 1, "method": "status", "params": {}})
            )
            word, _, reply = lines[0].partition(" ")
            assert word == "REPLY", lines
            assert "out of file descriptors" in unpack(bytes.fromhex(reply))["error"]["message"]
            assert status()["counters"]["control"]["refused_fds"] == 1

        # Root holds the connection made on the spare fd: the next client waits in
        # the backlog, and the accept loop backs off instead of spinning.
        held = ControlClient(path, timeout=2)
        held.connect()
        held.call("status")
        with ControlClient(path, timeout=2) as waiting:
            waiting.connect()
            before = _cpu_seconds(proc.pid)
            time.sleep(1.0)
            assert _cpu_seconds(proc.pid) - before < 0.3
            held.close()  # its fd frees: the waiting client is answered
            start = time.monotonic()
            assert waiting.call("status")["node_id"] == "n1"
            assert time.monotonic() - start < 1.0
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        shutil.rmtree(where, ignore_errors=True)
