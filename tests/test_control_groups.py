"""control.group and control.read_group with real users over a real socket."""

from __future__ import annotations

import errno
import grp
import os
import shutil
import socket
import stat

import pytest
import trio

from clanagent.config import ControlConfig
from clanagent.control.api import ApiTable, handler
from clanagent.control.protocol import encode_frame
from clanagent.control.server import ControlServer, peer_groups
from clanagent.wire import unpack

from . import _as_user
from .test_control_server import FakeAgent

VIEW, OPS = "cactl-view", "cactl-ops"
READER, WRITER, OUTSIDER = "cactl-reader", "cactl-writer", "cactl-outsider"


def groups_api() -> ApiTable:
    """The fake agent's methods plus one write method, `invite`."""

    async def invite(params):
        return {"token": f"for-{params['machine']}"}

    table = ApiTable.of(FakeAgent())
    table.add(handler("invite", "write", invite, "a join token", params=("machine",)))
    return table


def _request(rid: int, method: str, **params) -> bytes:
    return encode_frame({"id": rid, "v": 1, "method": method, "params": params})


def _replies(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        assert word == "REPLY", lines
        out.append(unpack(bytes.fromhex(rest)))
    return out


@pytest.fixture(scope="module")
def users():
    _as_user.skip_unless_root()
    _as_user.ensure_group(VIEW)
    _as_user.ensure_group(OPS)
    made = {
        READER: _as_user.ensure_user(READER, (VIEW,)),
        WRITER: _as_user.ensure_user(WRITER, (OPS,)),
        OUTSIDER: _as_user.ensure_user(OUTSIDER),
    }
    yield made
    for name in made:
        _as_user.remove_user(name)
    _as_user.remove_group(VIEW)
    _as_user.remove_group(OPS)


async def test_read_group_members_connect_and_read_but_never_write(users):
    """The reader's read group is only a supplementary group: SO_PEERGROUPS finds it."""
    where = _as_user.shared_dir("clanctl-groups-")
    path = where / "ctl.sock"
    cfg = ControlConfig(socket=str(path), group=OPS, read_group=VIEW)
    server = ControlServer(path, groups_api(), cfg)

    async def as_user(name: str, *frames: bytes) -> list[dict]:
        lines = await trio.to_thread.run_sync(_as_user.call_as, users[name], path, *frames)
        return _replies(lines)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                await n.start(server.serve)
                st = os.stat(path)
                assert stat.S_IMODE(st.st_mode) == 0o666  # read-group members must reach it
                assert st.st_gid == grp.getgrnam(OPS).gr_gid

                status, invite = await as_user(
                    READER, _request(1, "status"), _request(2, "invite", machine="m1")
                )
                assert status == {"id": 1, "ok": True, "result": FakeAgent().status()}
                assert invite["ok"] is False
                assert invite["error"]["code"] == "permission_denied"
                message = invite["error"]["message"]
                assert "read-only" in message and f"group '{OPS}'" in message, message
                assert f"uid {users[READER].pw_uid}" in message

                (invite,) = await as_user(WRITER, _request(3, "invite", machine="m1"))
                assert invite["result"] == {"token": "for-m1"}

                (refused,) = await as_user(OUTSIDER, _request(4, "status"))
                assert refused["error"]["code"] == "permission_denied"
                message = refused["error"]["message"]
                assert f"uid {users[OUTSIDER].pw_uid} may not use" in message
                assert f"members of group '{OPS}'" in message
                assert f"(read-only: group '{VIEW}')" in message

                counters = server.counters()
                assert counters["denied_write"] == 1
                assert counters["refused_group"] == 1
                n.cancel_scope.cancel()

            # Without a read group the file mode keeps everyone but the control
            # group out, before any credentials are looked at.
            cfg = ControlConfig(socket=str(path), group=OPS)
            server = ControlServer(path, groups_api(), cfg)
            async with trio.open_nursery() as n:
                await n.start(server.serve)
                assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
                lines = await trio.to_thread.run_sync(
                    _as_user.call_as, users[READER], path, _request(1, "status")
                )
                assert lines == [f"CONNERR {errno.EACCES}"]
                assert (await as_user(WRITER, _request(2, "status")))[0]["ok"] is True
                n.cancel_scope.cancel()
    finally:
        shutil.rmtree(where, ignore_errors=True)


async def test_socket_mode_follows_the_read_group(tmp_path):
    mine = grp.getgrgid(os.getgid()).gr_name
    for read_group, mode in ((mine, 0o666), ("no-such-group-cactl", 0o660), ("", 0o660)):
        path = tmp_path / "ctl.sock"
        cfg = ControlConfig(socket=str(path), read_group=read_group)
        server = ControlServer(path, FakeAgent(), cfg)
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                await n.start(server.serve)
                assert stat.S_IMODE(os.stat(path).st_mode) == mode, read_group
                n.cancel_scope.cancel()


def test_peer_groups_from_the_kernel_and_from_the_user_database():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_groups(a, os.getuid(), os.getgid()) == set(os.getgroups()) | {os.getgid()}

    class OldKernel:
        def getsockopt(self, *args):
            raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    import pwd

    me = pwd.getpwuid(os.getuid())
    assert peer_groups(OldKernel(), me.pw_uid, me.pw_gid) == set(
        os.getgrouplist(me.pw_name, me.pw_gid)
    )
    unnamed = 2**31 - 7  # a uid with no passwd entry (e.g. from a container)
    assert peer_groups(OldKernel(), unnamed, 4242) == {4242}


async def test_write_refusal_without_a_write_group_says_how_to_get_one(tmp_path, monkeypatch):
    from clanagent.control.client import ClientError

    from .test_control_server import call

    cfg = ControlConfig(socket=str(tmp_path / "ctl.sock"), read_group="viewers")
    server = ControlServer(
        tmp_path / "ctl.sock", groups_api(), cfg, authorizer=lambda c: ("read", "test")
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(server.serve)
            with pytest.raises(ClientError) as exc:
                await call(server.path, "invite", {"machine": "m1"})
            assert exc.value.code == "permission_denied"
            assert "control.group" in exc.value.message
            assert "(group 'viewers')" in exc.value.message
            n.cancel_scope.cancel()
