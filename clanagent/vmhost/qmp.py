"""QMP (the QEMU Machine Protocol): a sans-IO core and a small trio client.

Owns: framing of QMP's newline-delimited JSON, the greeting -> capabilities ->
command handshake, matching replies to commands by `id`, and keeping async
events aside.  `QmpProtocol` takes bytes and returns messages and bytes to send;
it must never do I/O.  `QmpClient` only moves bytes over a unix socket; it must
never interpret VM state (that is the backend's job).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from clanagent.vmhost.spec import VmHostLocalError, VmHostRemoteError

__all__ = [
    "MAX_LINE",
    "QmpClient",
    "QmpCommandError",
    "QmpDisconnected",
    "QmpEvent",
    "QmpMisuse",
    "QmpProtocol",
    "QmpProtocolError",
    "QmpReply",
    "open_qmp",
]

# QMP replies we ask for are small; query-* on a microvm stays far below this.
# A longer line means a broken or hostile peer, not a big answer.
MAX_LINE = 1 << 20


class QmpProtocolError(VmHostRemoteError):
    """QEMU sent something that is not QMP (bad JSON, overlong line, no greeting)."""


class QmpDisconnected(VmHostRemoteError):
    """The QMP socket closed or could not be reached."""


class QmpCommandError(VmHostRemoteError):
    """A command got an `error` reply."""

    def __init__(self, command: str, klass: str, desc: str) -> None:
        self.command, self.klass, self.desc = command, klass, desc
        super().__init__(f"{command}: {klass}: {desc}")


class QmpMisuse(VmHostLocalError):
    """The protocol object was driven out of order."""


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class QmpReply:
    id: Any
    ok: bool
    value: Any  # the `return` value, or the `error` object when not ok


class QmpProtocol:
    """Sans-IO QMP: feed bytes with receive_data(), pull messages with next_message().

    States: "greeting" (waiting for the banner) -> "ready".  The capabilities
    negotiation is just the first command; the caller sends it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._next_id = 0
        self.state = "greeting"
        self.greeting: Mapping[str, Any] | None = None

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        # the unterminated tail is the line still coming in
        if len(self._buf) - (self._buf.rfind(b"\n") + 1) > MAX_LINE:
            raise QmpProtocolError(f"QMP line longer than {MAX_LINE} bytes")

    def next_message(self) -> QmpEvent | QmpReply | None:
        """The next complete message, or None when more bytes are needed."""
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return None
            line = bytes(self._buf[:nl]).strip()
            del self._buf[: nl + 1]
            if not line:
                continue
            if len(line) > MAX_LINE:
                raise QmpProtocolError(f"QMP line longer than {MAX_LINE} bytes")
            try:
                msg = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise QmpProtocolError(f"QMP sent bad JSON: {line[:80]!r}") from None
            if not isinstance(msg, dict):
                raise QmpProtocolError("QMP message is not an object")
            if self.state == "greeting":
                if "QMP" not in msg:
                    raise QmpProtocolError("first QMP message is not a greeting")
                self.greeting = msg["QMP"]
                self.state = "ready"
                continue
            if "event" in msg:
                data = msg.get("data")
                return QmpEvent(str(msg["event"]), data if isinstance(data, dict) else {})
            if "return" in msg:
                return QmpReply(msg.get("id"), True, msg["return"])
            if "error" in msg:
                return QmpReply(msg.get("id"), False, msg["error"])
            raise QmpProtocolError(f"unknown QMP message keys {sorted(msg)[:5]}")

    def send_command(
        self, command: str, arguments: Mapping[str, Any] | None = None
    ) -> tuple[int, bytes]:
        """Encode a command with a fresh id; returns (id, bytes to send)."""
        if self.state != "ready":
            raise QmpMisuse("QMP command before the greeting")
        self._next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        return self._next_id, json.dumps(msg).encode() + b"\n"


class QmpClient:
    """One QMP connection over trio (use `open_qmp(path)`); commands are serialised.

    Async events seen while waiting for replies are kept, newest last, in
    `events` (bounded: a long-lived connection must not grow without limit).
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._proto = QmpProtocol()
        self.events: deque[QmpEvent] = deque(maxlen=256)
        self._lock = trio.Lock()

    async def _fill(self) -> None:
        try:
            data = await self._stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            raise QmpDisconnected("QMP connection lost") from None
        if not data:
            raise QmpDisconnected("QMP connection closed")
        self._proto.receive_data(data)

    async def _next(self) -> QmpEvent | QmpReply:
        while True:
            msg = self._proto.next_message()
            if msg is not None:
                return msg
            await self._fill()

    async def _handshake(self) -> None:
        while self._proto.state == "greeting":
            await self._fill()
            msg = self._proto.next_message()
            if isinstance(msg, QmpEvent):
                self.events.append(msg)
            elif msg is not None:
                raise QmpProtocolError("QMP reply before any command")
        await self.execute("qmp_capabilities")

    @property
    def greeting(self) -> Mapping[str, Any] | None:
        return self._proto.greeting

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one command; return its `return` value, raise QmpCommandError on `error`."""
        async with self._lock:
            cid, data = self._proto.send_command(command, arguments)
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise QmpDisconnected("QMP connection lost") from None
            while True:
                msg = await self._next()
                if isinstance(msg, QmpEvent):
                    self.events.append(msg)
                    continue
                if msg.id != cid:
                    # A reply to another id cannot happen on our own connection;
                    # skipping it would desynchronise every later call.
                    raise QmpProtocolError(f"QMP reply id {msg.id!r} != {cid}")
                if msg.ok:
                    return msg.value
                err = msg.value if isinstance(msg.value, dict) else {}
                raise QmpCommandError(command, str(err.get("class")), str(err.get("desc")))

    async def query_status(self) -> str:
        """The VM run state: "running", "paused", "shutdown", ..."""
        return str((await self.execute("query-status"))["status"])

    async def system_powerdown(self) -> None:
        await self.execute("system_powerdown")

    async def quit(self) -> None:
        """Ask QEMU to exit; the connection may drop before the reply arrives."""
        try:
            await self.execute("quit")
        except QmpDisconnected:
            pass

    async def aclose(self) -> None:
        await self._stream.aclose()


@asynccontextmanager
async def open_qmp(path: str, timeout: float = 5.0) -> AsyncIterator[QmpClient]:
    """Connect to a QMP unix socket, read the greeting and negotiate capabilities."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(path)
            client = QmpClient(stream)
            try:
                await client._handshake()
            except BaseException:
                await stream.aclose()
                raise
    except trio.TooSlowError:
        raise QmpDisconnected(f"QMP at {path}: no answer in {timeout}s") from None
    except OSError as e:
        raise QmpDisconnected(f"QMP at {path}: {e.strerror or e}") from None
    try:
        yield client
    finally:
        await client.aclose()
