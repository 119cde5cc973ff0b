"""Interactive VM consoles: attach to a VM's serial console here or across the mesh.

Owns: the agent-to-agent console handshake and the byte plumbing of a console
session.  A session between machines is a TCP connection from the asking
agent to the hosting agent's overlay address (so it travels inside
WireGuard): one length-prefixed msgpack *hello* (the admin-signed console
request), one length-prefixed *answer* (``{"ok": true}`` or ``{"ok": false,
"error": "..."}``), then raw console bytes both ways until either side
closes.  The framing is the I/O-free `console_codec`; this module is the
trio side (it does the I/O): `ConsoleServer`, `open_remote` and `splice`.
Must never: attach a VM's console before the request is verified by the
caller-supplied `authorize`, read more than `MAX_FRAME` bytes of handshake,
or let one broken session touch the VM or other sessions.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from .._log import kv
from ..wire import WireError
from .console_codec import FrameReader, encode_frame
from .spec import VmHostLocalError

__all__ = [
    "MAX_SESSIONS",
    "HANDSHAKE_TIMEOUT",
    "PrefixedStream",
    "splice",
    "ConsoleServer",
    "ConsoleStats",
    "open_remote",
]

log = logging.getLogger("clanagent.vmhost.console")

HANDSHAKE_TIMEOUT = 5.0
MAX_SESSIONS = 32
_CHUNK = 16384


async def _read_frame(stream: trio.abc.ReceiveStream) -> tuple[dict[str, Any], bytes]:
    reader = FrameReader()
    while True:
        data = await stream.receive_some(_CHUNK)
        if not data:
            raise WireError("console handshake: connection closed early")
        body = reader.feed(data)
        if body is not None:
            return body, reader.rest


class PrefixedStream(trio.abc.Stream):
    """A stream that first yields bytes already read past a handshake."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


SEND_TIMEOUT = 10.0  # a side that takes longer than this to accept bytes is dropped
IDLE_TIMEOUT = 3600.0  # a session with no byte either way for this long ends


async def splice(
    a: trio.abc.Stream,
    b: trio.abc.Stream,
    *,
    send_timeout: float = SEND_TIMEOUT,
    idle_timeout: float = IDLE_TIMEOUT,
) -> str:
    """Copy bytes both ways until either side ends, breaks, stalls or idles.

    A console's guest blocks when its serial output cannot drain, so a side
    that stops reading ends the session instead of stalling the VM.  Returns
    why it ended ("closed", "stalled" or "idle")."""
    why = "closed"
    last = trio.current_time()

    async def copy(src: trio.abc.Stream, dst: trio.abc.Stream, done: trio.CancelScope) -> None:
        nonlocal why, last
        try:
            while True:
                data = await src.receive_some(_CHUNK)
                if not data:
                    break
                last = trio.current_time()
                with trio.fail_after(send_timeout):
                    await dst.send_all(data)
        except trio.TooSlowError:
            why = "stalled"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        done.cancel()

    async def watch_idle(done: trio.CancelScope) -> None:
        nonlocal why
        while True:
            await trio.sleep_until(last + idle_timeout)
            if trio.current_time() >= last + idle_timeout:
                why = "idle"
                done.cancel()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(copy, a, b, nursery.cancel_scope)
        nursery.start_soon(copy, b, a, nursery.cancel_scope)
        nursery.start_soon(watch_idle, nursery.cancel_scope)
    return why


@dataclass
class ConsoleStats:
    sessions: int = 0
    refused: int = 0
    bad_handshakes: int = 0


# authorize(hello) -> VM name, or raises WireError / VmHostLocalError with the reason
Authorize = Callable[[dict[str, Any]], Awaitable[str]]
Attach = Callable[[str], AbstractAsyncContextManager[trio.abc.Stream]]


class ConsoleServer:
    """Serves console sessions to other agents on this machine's overlay address."""

    def __init__(self, authorize: Authorize, attach: Attach) -> None:
        self.authorize = authorize
        self.attach = attach
        self.stats = ConsoleStats()
        self.port = 0
        # Sessions and handshakes in progress; more are closed at once (a peer
        # or a guest must not run the agent out of file descriptors).
        self._limiter = trio.CapacityLimiter(MAX_SESSIONS)

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # IP_FREEBIND: the overlay address may not be on the interface yet (the
        # mesh adds it), and binding it anyway spares a retry loop.
        sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        try:
            await sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise VmHostLocalError(
                    f"console port [{host}]:{port} is in use (set mesh.console_port)"
                ) from None
            raise
        sock.listen(16)
        self.port = sock.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._session, [trio.SocketListener(sock)])

    async def _session(self, stream: trio.SocketStream) -> None:
        if self._limiter.available_tokens == 0:
            self.stats.refused += 1  # too many at once: close at once, hold nothing
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        async with self._limiter:
            try:
                await self._one(stream)
            except Exception as exc:  # one broken session must never reach the agent
                self.stats.bad_handshakes += 1
                log.warning("console session failed", extra=kv(error=repr(exc)))
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _one(self, stream: trio.SocketStream) -> None:
        try:
            peer = stream.socket.getpeername()[0]
        except OSError:
            return  # reset before we looked: nothing to serve
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                hello, rest = await _read_frame(stream)
                vm = await self.authorize(hello)
        except (WireError, VmHostLocalError, trio.TooSlowError) as exc:
            self.stats.refused += 1
            why = "handshake timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
            log.warning("console session refused", extra=kv(peer=peer, reason=why))
            await self._answer(stream, {"ok": False, "error": why})
            await stream.aclose()
            return
        except (trio.BrokenResourceError, OSError):
            self.stats.bad_handshakes += 1
            await stream.aclose()
            return
        try:
            async with self.attach(vm) as console:
                self.stats.sessions += 1
                log.info("console session opened", extra=kv(vm=vm, peer=peer))
                await self._answer(stream, {"ok": True})
                if rest:
                    await console.send_all(rest)
                why = await splice(stream, console)
                if why != "closed":
                    log.info("console session dropped", extra=kv(vm=vm, peer=peer, reason=why))
        except VmHostLocalError as exc:
            self.stats.refused += 1
            await self._answer(stream, {"ok": False, "error": str(exc)})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            log.info("console session closed", extra=kv(vm=vm, peer=peer))
            with trio.CancelScope(shield=True):
                await stream.aclose()

    @staticmethod
    async def _answer(stream: trio.SocketStream, body: dict[str, Any]) -> None:
        try:
            await stream.send_all(encode_frame(body))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


@asynccontextmanager
async def open_remote(
    host: str, port: int, hello: dict[str, Any], *, timeout: float = HANDSHAKE_TIMEOUT
) -> AsyncIterator[trio.abc.Stream]:
    """A console session with the agent at [host]:port; VmHostLocalError says why not."""
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
    except (OSError, trio.TooSlowError) as exc:
        raise VmHostLocalError(
            f"cannot reach [{host}]:{port} over the mesh ({exc or 'timed out'}); "
            "is that machine online? see 'clanctl mesh status'"
        ) from None
    try:
        try:
            with trio.fail_after(timeout):
                await stream.send_all(encode_frame(hello))
                answer, rest = await _read_frame(stream)
        except (WireError, trio.TooSlowError, trio.BrokenResourceError, OSError) as exc:
            raise VmHostLocalError(
                f"console handshake with [{host}]:{port} failed: {exc or 'timed out'}"
            ) from None
        if answer.get("ok") is not True:
            err = answer.get("error")
            raise VmHostLocalError(str(err) if isinstance(err, str) else "refused by the host")
        yield PrefixedStream(stream, rest)
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()
