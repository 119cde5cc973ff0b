"""Authenticated, encrypted peer sessions over WebSockets (the trio shell).

Owns: moving handshake messages and session frames between a `Handshake` /
`SessionCipher` and a trio-websocket connection, with a deadline on the
handshake, a lock that keeps frames in counter order, and the translation of
I/O failures into `PeerDisconnected`.  Model: trio-websocket `_impl.py`.

Must never: make a protocol decision (that is handshake.py / session.py),
send a byte outside a binary WebSocket message, let one bad peer stop the
server, or put a key into a close reason (reasons travel in the clear).
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import NoReturn

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
    wrap_client_stream,
)

from clanagent._log import kv
from clanagent.gossip.errors import LocalProtocolError, PeerDisconnected, RemoteProtocolError
from clanagent.gossip.handshake import Handshake, Role, SigningIdentity
from clanagent.gossip.session import DEFAULT_MAX_PLAINTEXT, TAG_BYTES, SessionCipher

__all__ = [
    "PeerSession",
    "connect",
    "open_peer_session",
    "serve_peers",
    "establish_session",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "CLOSE_POLICY_VIOLATION",
]

log = logging.getLogger(__name__)

# Long enough for a Tor circuit round trip or two, short enough that a silent
# peer cannot pin a server slot for long.
DEFAULT_HANDSHAKE_TIMEOUT = 20.0
# How long we wait for the peer to answer our close frame before we drop the
# TCP connection anyway.
CLOSE_TIMEOUT = 5.0
CLOSE_POLICY_VIOLATION = 1008  # RFC 6455: "a message that violates its policy"
_CLOSE_NORMAL = 1000
_MAX_CLOSE_REASON = 123  # RFC 6455 limit for the reason, in UTF-8 bytes
# The largest WebSocket message we accept: one full frame.  Handshake
# messages are far smaller and are bounded again by the handshake's limits.
_MAX_MESSAGE = DEFAULT_MAX_PLAINTEXT + TAG_BYTES

# Everything trio-websocket (and the stream under it) raises when the link is
# gone; each becomes PeerDisconnected.
_IO_ERRORS = (
    ConnectionClosed,
    HandshakeError,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)

Admit = Callable[[bytes], bool]


def _close_reason(reason: str) -> str:
    raw = reason.encode("utf-8")[:_MAX_CLOSE_REASON]
    return raw.decode("utf-8", "ignore")


def _disconnected(exc: BaseException, what: str) -> PeerDisconnected:
    if isinstance(exc, ConnectionClosed) and exc.reason is not None:
        code, why = exc.reason.code, exc.reason.reason
        text = f"{what}: connection closed with code {code}"
        return PeerDisconnected(f"{text} ({why})" if why else text, code=code)
    return PeerDisconnected(f"{what}: {type(exc).__name__}")


def _remote_of(ws: WebSocketConnection) -> str:
    # trio-websocket asks the socket each time, which fails once it is closed.
    try:
        return str(ws.remote)
    except OSError:
        return "unknown"


async def _close_ws(ws: WebSocketConnection, code: int, reason: str) -> None:
    # Best effort: the link may already be gone, and a peer that never
    # answers our close frame must not hold us up.
    with trio.move_on_after(CLOSE_TIMEOUT):
        try:
            await ws.aclose(code, _close_reason(reason))
        except _IO_ERRORS:
            pass


class PeerSession:
    """An established session: frames in, frames out, in order.

    Created by `connect` / `open_peer_session` / `serve_peers`, never
    directly.  `send` may be called from several tasks (a lock keeps each
    frame's nonce counter in step with the order on the wire); `receive` is
    serialised the same way.  Every I/O failure is `PeerDisconnected`; a bad
    frame is `RemoteProtocolError`, after which the link is closed with code
    1008 and the session is dead.
    """

    def __init__(
        self,
        ws: WebSocketConnection,
        cipher: SessionCipher,
        peer_public_key: bytes,
        peer_node_id: str,
        version: int,
    ) -> None:
        self._ws = ws
        self._cipher = cipher
        self.peer_public_key = peer_public_key
        self.peer_node_id = peer_node_id
        self.version = version
        self.remote = _remote_of(ws)  # the peer's address, for logs
        self._send_lock = trio.Lock()
        self._recv_lock = trio.Lock()
        self._closed_reason: str | None = None
        # Set once nothing more will travel over the WebSocket (closed by
        # us, or gone); the task that owns the connection then tears it down.
        self._released = trio.Event()

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    async def send(self, data: bytes) -> None:
        """Seal `data` as the next frame and send it."""
        async with self._send_lock:
            self._check_open()
            frame = self._cipher.seal(data)
            sent = False
            try:
                await self._ws.send_message(frame)
                sent = True
            except _IO_ERRORS as exc:
                err = _disconnected(exc, "send failed")
                self._mark_closed(err.reason)
                self._released.set()
                raise err from None
            finally:
                if not sent and not self.closed:
                    # Cancelled mid-send: the counter has moved on but the
                    # frame may be half on the wire, so no later frame can
                    # ever authenticate.  End the session rather than let
                    # the peer find out with a confusing error.
                    self._mark_closed("a send was cancelled")

    async def receive(self) -> bytes:
        """Wait for the next frame and return its plaintext."""
        async with self._recv_lock:
            self._check_open()
            try:
                message = await self._ws.get_message()
            except _IO_ERRORS as exc:
                err = _disconnected(exc, "receive failed")
                self._mark_closed(err.reason)
                self._released.set()
                raise err from None
            try:
                if not isinstance(message, bytes):
                    raise RemoteProtocolError("text message on a peer link")
                return self._cipher.open(message)
            except RemoteProtocolError as exc:
                self._mark_closed(exc.reason)
                log.warning(
                    "peer sent a bad frame; closing",
                    extra=kv(peer=self.peer_node_id, reason=exc.reason),
                )
                try:
                    await _close_ws(self._ws, CLOSE_POLICY_VIOLATION, exc.reason)
                finally:
                    self._released.set()
                raise

    async def aclose(self) -> None:
        """Close the session (idempotent)."""
        self._mark_closed("closed locally")
        try:
            await _close_ws(self._ws, _CLOSE_NORMAL, "")
        finally:
            self._released.set()

    async def __aenter__(self) -> PeerSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if self._closed_reason is not None:
            raise PeerDisconnected(f"session is closed: {self._closed_reason}")

    def _mark_closed(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
        self._cipher.close()

    async def _wait_released(self) -> None:
        await self._released.wait()


async def _handshake(ws: WebSocketConnection, hs: Handshake, deadline: float) -> PeerSession:
    """Run `hs` over `ws` until it is done; close `ws` on any failure."""
    remote = _remote_of(ws)
    try:
        with trio.fail_at(deadline):
            if hs.role is Role.INITIATOR:
                await ws.send_message(hs.start())
            while not hs.done:
                message = await ws.get_message()
                if not isinstance(message, bytes):
                    raise RemoteProtocolError("text message during the handshake")
                reply = hs.receive(message)
                if reply is not None:
                    await ws.send_message(reply)
    except RemoteProtocolError as exc:
        log.info(
            "peer handshake refused",
            extra=kv(
                role=hs.role.value,
                remote=remote,
                peer=hs.peer_node_id or "unknown",
                reason=exc.reason,
            ),
        )
        await _close_ws(ws, CLOSE_POLICY_VIOLATION, exc.reason)
        raise
    except trio.TooSlowError:
        await _close_ws(ws, CLOSE_POLICY_VIOLATION, "handshake timed out")
        raise PeerDisconnected("handshake timed out") from None
    except _IO_ERRORS as exc:
        await _close_ws(ws, _CLOSE_NORMAL, "")
        raise _disconnected(exc, "handshake failed") from None
    assert hs.peer_public_key is not None and hs.peer_node_id is not None
    assert hs.version is not None
    return PeerSession(ws, hs.cipher, hs.peer_public_key, hs.peer_node_id, hs.version)


def _parse_url(url: str) -> tuple[str, int, str, str]:
    """(host, port, resource, Host header) of a ws:// URL.

    Only plain ws://: the handshake already authenticates and encrypts, so
    TLS would add a second, weaker layer of trust (the WebPKI) and nothing else.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port or 80
    except ValueError as exc:
        raise LocalProtocolError(f"bad peer URL {url!r}: {exc}") from None
    if parts.scheme != "ws" or not parts.hostname:
        raise LocalProtocolError(f"peer URL must be ws://host[:port]/path, not {url!r}")
    host = parts.hostname
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    shown = f"[{host}]" if ":" in host else host
    return host, port, resource, shown if port == 80 else f"{shown}:{port}"


def _only_error(group: BaseExceptionGroup) -> BaseException:
    """The one error that matters in a nursery's group.

    Our nurseries hold a trio-websocket reader task and our own code; at most
    one of them fails for real, the rest can only be Cancelled.
    """
    real = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
    if len(real) == 1:
        return real[0]
    if not real:
        return group.exceptions[0]
    return group


async def establish_session(
    ws: WebSocketConnection,
    role: Role,
    identity: SigningIdentity,
    clan_id: bytes,
    admit: Admit,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> PeerSession:
    """Run the handshake over a WebSocket that is already open.

    For transports other than TCP (the in-memory network of the simulation,
    a stream over Tor): the caller owns `ws` and its nursery.  On failure
    `ws` is closed (code 1008 when we refuse the peer) and the error raised.
    """
    if timeout <= 0:
        raise LocalProtocolError("timeout must be positive")
    hs = Handshake(role, identity, clan_id, admit)
    return await _handshake(ws, hs, trio.current_time() + timeout)


async def _run_client(
    url: str,
    identity: SigningIdentity,
    clan_id: bytes,
    admit: Admit,
    timeout: float,
    *,
    task_status: trio.TaskStatus[PeerSession] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Owns the connection for its whole life: trio-websocket needs a nursery
    # for its reader task, and this task is where that nursery lives.  We open
    # (and always close) the TCP stream ourselves because trio-websocket's
    # client leaves it open when the server closes first.
    host, port, resource, host_header = _parse_url(url)
    deadline = trio.current_time() + timeout
    hs = Handshake(Role.INITIATOR, identity, clan_id, admit)
    started = False
    try:
        with trio.fail_at(deadline):
            stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise PeerDisconnected(f"timed out connecting to {url}") from None
    except OSError as exc:
        raise PeerDisconnected(f"cannot connect to {url}: {exc.strerror or exc}") from None
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_at(deadline) as upgrade:
                ws = await wrap_client_stream(
                    nursery, stream, host_header, resource, max_message_size=_MAX_MESSAGE
                )
            if upgrade.cancelled_caught:
                nursery.cancel_scope.cancel()  # else the reader task keeps it open
                raise PeerDisconnected(f"timed out opening a WebSocket to {url}")
            session = await _handshake(ws, hs, deadline)
            task_status.started(session)
            started = True
            await session._wait_released()
            # A client waits for the server to drop TCP after the close
            # handshake; we close the stream below anyway, so stop waiting.
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        exc = _only_error(group)
        if isinstance(exc, _IO_ERRORS):
            if not started:
                raise _disconnected(exc, f"cannot connect to {url}") from None
            # After start the session reports its own failures; a close that
            # goes wrong here must not take the caller's nursery down.
            log.debug("peer link closed uncleanly", extra=kv(url=url, error=type(exc).__name__))
        else:
            raise exc from None
    finally:
        await trio.aclose_forcefully(stream)


async def connect(
    nursery: trio.Nursery,
    url: str,
    identity: SigningIdentity,
    clan_id: bytes,
    admit: Admit,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> PeerSession:
    """Dial `url`, run the handshake, and return the session.

    The connection's background task lives in `nursery` until the session is
    closed (call `aclose()`).  Raises `RemoteProtocolError` if we refuse the
    peer (it is told why with close code 1008), and `PeerDisconnected` if the
    link fails, the deadline passes, or the peer refuses us (then `code` is
    1008 and `reason` carries the peer's reason).
    """
    if timeout <= 0:
        raise LocalProtocolError("timeout must be positive")
    return await nursery.start(_run_client, url, identity, clan_id, admit, timeout)


@asynccontextmanager
async def open_peer_session(
    url: str,
    identity: SigningIdentity,
    clan_id: bytes,
    admit: Admit,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
) -> AsyncIterator[PeerSession]:
    """`connect` with its own nursery: the session is closed on exit.

    Errors come out bare (not in an ExceptionGroup), like `connect`'s.
    """
    try:
        async with trio.open_nursery() as nursery:
            session = await connect(nursery, url, identity, clan_id, admit, timeout=timeout)
            try:
                yield session
            finally:
                await session.aclose()
    except BaseExceptionGroup as group:
        # The nursery holds only the connection task, which never raises
        # after start, so the group has exactly one member: the error of
        # connect or of the caller's block.  Unwrap it so callers can write
        # `except PeerDisconnected`.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def serve_peers(
    host: str,
    port: int,
    identity: SigningIdentity,
    clan_id: bytes,
    admit: Admit,
    handler: Callable[[PeerSession], Awaitable[None]],
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Accept peer sessions on (host, port) and run `handler(session)` for each.

    Calls `task_status.started(actual_port)` once listening (so port 0
    works).  A peer that fails or is refused in the handshake is logged and
    dropped; `PeerDisconnected` / `RemoteProtocolError` escaping `handler`
    end only that session.  Any other exception from `handler` is a bug and
    propagates.  The session is closed when `handler` returns.
    """

    async def on_request(request: WebSocketRequest) -> None:
        deadline = trio.current_time() + timeout
        try:
            ws = await request.accept()
        except _IO_ERRORS:
            return
        remote = _remote_of(ws)
        hs = Handshake(Role.RESPONDER, identity, clan_id, admit)
        try:
            session = await _handshake(ws, hs, deadline)
        except (RemoteProtocolError, PeerDisconnected) as exc:
            log.debug("incoming peer dropped", extra=kv(remote=remote, reason=exc.reason))
            return
        try:
            await handler(session)
        except (PeerDisconnected, RemoteProtocolError) as exc:
            log.debug("peer session ended", extra=kv(peer=session.peer_node_id, reason=exc.reason))
        finally:
            await session.aclose()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                serve_websocket,
                on_request,
                host,
                port,
                None,
                max_message_size=_MAX_MESSAGE,
                connect_timeout=timeout,
                disconnect_timeout=CLOSE_TIMEOUT,
            )
        )
        task_status.started(server.port)
    raise AssertionError("serve_websocket returned")  # it only ever ends by raising
