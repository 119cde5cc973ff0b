"""QMP (the QEMU Machine Protocol): the small trio client.

Owns: moving bytes (with trio) between a QMP unix socket and the I/O-free `QmpProtocol`
(in `qmp_codec.py`, re-exported here), one command at a time, with timeouts.
Must never: interpret QMP itself (the codec does) or VM state (the backend does).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from .qmp_codec import (  # noqa: F401 (re-exported: the I/O-free core)
    MAX_LINE,
    QmpCommandError,
    QmpDisconnected,
    QmpEvent,
    QmpMisuse,
    QmpProtocol,
    QmpProtocolError,
    QmpReply,
)

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
