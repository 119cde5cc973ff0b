"""QMP: the sans-IO framing (hypothesis over arbitrary chunking) and the trio client
against a fake QMP server on a unix socket."""

from __future__ import annotations

import json

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from clanagent.vmhost.qmp import (
    MAX_LINE,
    QmpCommandError,
    QmpDisconnected,
    QmpEvent,
    QmpMisuse,
    QmpProtocol,
    QmpProtocolError,
    QmpReply,
    open_qmp,
)

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\r\n"


def drain(p: QmpProtocol) -> list:
    out = []
    while (m := p.next_message()) is not None:
        out.append(m)
    return out


@given(cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_framing_is_independent_of_chunking(cuts):
    stream = (
        line(GREETING)
        + line({"event": "POWERDOWN", "timestamp": {}})
        + b"\r\n"
        + line({"return": {"status": "running"}, "id": 1})
        + line({"error": {"class": "GenericError", "desc": "no"}, "id": 2})
    )
    p = QmpProtocol()
    got = []
    prev = 0
    for c in sorted({min(c, len(stream)) for c in cuts} | {len(stream)}):
        p.receive_data(stream[prev:c])
        prev = c
        got += drain(p)
    assert p.state == "ready" and p.greeting == GREETING["QMP"]
    assert got == [
        QmpEvent("POWERDOWN", {}),
        QmpReply(1, True, {"status": "running"}),
        QmpReply(2, False, {"class": "GenericError", "desc": "no"}),
    ]


@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_errors(data):
    p = QmpProtocol()
    try:
        p.receive_data(data + b"\n")
        drain(p)
    except QmpProtocolError:
        pass


def test_protocol_rejects_bad_input():
    p = QmpProtocol()
    with pytest.raises(QmpMisuse):
        p.send_command("query-status")
    p.receive_data(line({"return": {}}))
    with pytest.raises(QmpProtocolError, match="not a greeting"):
        p.next_message()
    p = QmpProtocol()
    with pytest.raises(QmpProtocolError, match="longer than"):
        p.receive_data(b"x" * (MAX_LINE + 1))
    p = QmpProtocol()
    p.receive_data(line(GREETING) + b"x" * MAX_LINE)  # a long line still arriving is fine
    with pytest.raises(QmpProtocolError, match="longer than"):
        p.receive_data(b"x")
    p = QmpProtocol()
    p.receive_data(line(GREETING) + b"[1]\n")
    with pytest.raises(QmpProtocolError, match="not an object"):
        p.next_message()


def test_send_command_ids_increase():
    p = QmpProtocol()
    p.receive_data(line(GREETING))
    assert p.next_message() is None
    i1, d1 = p.send_command("qmp_capabilities")
    i2, d2 = p.send_command("human-monitor-command", {"command-line": "info"})
    assert (i1, i2) == (1, 2)
    assert json.loads(d1) == {"execute": "qmp_capabilities", "id": 1}
    assert json.loads(d2)["arguments"] == {"command-line": "info"}


class FakeQmp:
    """A scripted QMP server: records commands, answers from `replies`."""

    def __init__(self, path: str, replies: dict, events_before: int = 1, drop_on=None):
        self.path, self.replies, self.events_before, self.drop_on = (
            path,
            replies,
            events_before,
            drop_on,
        )
        self.commands: list[str] = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED):
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(self.path)
        sock.listen(4)
        task_status.started()
        with sock:
            while True:
                conn, _ = await sock.accept()
                await self._one(trio.SocketStream(conn))

    async def _one(self, stream):
        async with stream:
            await stream.send_all(line(GREETING))
            buf = b""
            while True:
                try:
                    data = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    msg = json.loads(raw)
                    cmd = msg["execute"]
                    self.commands.append(cmd)
                    if cmd == self.drop_on:
                        return
                    for _ in range(self.events_before):
                        await stream.send_all(line({"event": "X", "data": {"n": 1}}))
                    reply = self.replies.get(cmd, {})
                    if isinstance(reply, Exception):
                        body = {"error": {"class": "GenericError", "desc": str(reply)}}
                    else:
                        body = {"return": reply}
                    await stream.send_all(line({**body, "id": msg.get("id")}))


async def test_client_handshake_execute_and_events(tmp_path):
    path = str(tmp_path / "qmp.sock")
    fake = FakeQmp(path, {"query-status": {"status": "running", "running": True}})
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(fake.serve)
            async with open_qmp(path) as q:
                assert q.greeting["version"]["qemu"]["major"] == 7
                assert await q.query_status() == "running"
                await q.system_powerdown()
                assert [e.name for e in q.events] == ["X", "X", "X"]
            assert fake.commands == ["qmp_capabilities", "query-status", "system_powerdown"]
            n.cancel_scope.cancel()


async def test_client_error_reply_and_quit_disconnect(tmp_path):
    path = str(tmp_path / "qmp.sock")
    fake = FakeQmp(
        path, {"system_powerdown": RuntimeError("nope")}, events_before=0, drop_on="quit"
    )
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            await n.start(fake.serve)
            async with open_qmp(path) as q:
                with pytest.raises(QmpCommandError, match="system_powerdown: GenericError: nope"):
                    await q.system_powerdown()
                await q.quit()  # the server hangs up instead of answering: that is success
                with pytest.raises(QmpDisconnected):
                    await q.query_status()
            n.cancel_scope.cancel()


async def test_connect_to_missing_socket_is_a_disconnect(tmp_path):
    with trio.fail_after(5), pytest.raises(QmpDisconnected, match="QMP at"):
        async with open_qmp(str(tmp_path / "none.sock")):
            pass


async def test_silent_server_times_out(tmp_path):
    path = str(tmp_path / "q.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(1)
    with sock, trio.fail_after(5), pytest.raises(QmpDisconnected, match="no answer"):
        async with open_qmp(path, timeout=0.2):
            pass
