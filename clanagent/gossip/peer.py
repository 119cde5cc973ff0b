"""Authenticated, encrypted peer sessions over WebSockets (the trio shell).

Owns: moving handshake messages and session frames between a `Handshake` /
`SessionCipher` and a trio-websocket connection, with a deadline on the
handshake, a lock that keeps frames in counter order, and the translation of
I/O failures into `PeerDisconnected`.  Model: trio-websocket `_impl.py`.
Also the listener (`PeerListener`): its own accept loop that asks the
admission table (admission.py) before a connection gets a task, the
handshake deadline of unauthenticated connections, and a fault boundary
around every connection (ours and the dialer's).

Must never: make a protocol decision (that is handshake.py / session.py),
send a byte outside a binary WebSocket message, let one bad peer stop the
server or hold a slot past the deadline, or put a key into a close reason
(reasons travel in the clear).
"""

from __future__ import annotations

import errno
import logging
import urllib.parse
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import NoReturn

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
    wrap_server_stream,
)

from clanagent._log import kv
from clanagent.fd_reserve import PROCESS, FdReserve
from clanagent.gossip.admission import AdmissionLimits, FaultLog, PendingTable, source_of
from clanagent.gossip.errors import LocalProtocolError, PeerDisconnected, RemoteProtocolError
from clanagent.gossip.handshake import Handshake, Role, SigningIdentity
from clanagent.gossip.session import DEFAULT_MAX_PLAINTEXT, TAG_BYTES, SessionCipher

__all__ = [
    "PeerListener",
    "PeerSession",
    "connect",
    "connect_stream",
    "open_peer_session",
    "serve_peers",
    "establish_session",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "HANDSHAKE_DEADLINE",
    "CLOSE_POLICY_VIOLATION",
]

log = logging.getLogger(__name__)

# Dialing: long enough for a Tor circuit round trip or two.
DEFAULT_HANDSHAKE_TIMEOUT = 20.0
# Accepting: an unauthenticated connection holds one of few pending slots, so
# it gets 5 s from accept to a finished handshake (a few round trips, even
# over Tor); a silent or slow one is closed.
HANDSHAKE_DEADLINE = 5.0
# How long a pending connection that failed may take to answer our close frame.
PENDING_CLOSE_TIMEOUT = 0.5
# At the descriptor limit accept fails until a connection ends: wait this long.
ACCEPT_BACKOFF = 0.1
_REFUSALS_LOGGED = 1024  # (source, reason) pairs remembered: each is logged once
_FD_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
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

# How a connection ends in the ordinary course of things: not a fault.
_EXPECTED = (*_IO_ERRORS, PeerDisconnected, RemoteProtocolError)

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


async def _close_ws(
    ws: WebSocketConnection, code: int, reason: str, timeout: float = CLOSE_TIMEOUT
) -> None:
    # Best effort: the link may already be gone, and a peer that never
    # answers our close frame must not hold us up.
    with trio.move_on_after(timeout):
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


class _HandshakeTimedOut(PeerDisconnected):
    """The handshake did not finish before its deadline."""


async def _handshake(
    ws: WebSocketConnection,
    hs: Handshake,
    deadline: float,
    *,
    close_timeout: float = CLOSE_TIMEOUT,
    worth_logging: Callable[[str], bool] | None = None,
) -> PeerSession:
    """Run `hs` over `ws` until it is done; close `ws` on any failure.

    On failure we tell the peer why and wait at most `close_timeout` for its
    answer to our close frame.  A refusal is logged at INFO when
    `worth_logging(reason)` says so (the listener: once per source and
    reason, so a flood of bad handshakes cannot flood the journal), else at
    DEBUG.
    """
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
        loud = worth_logging is None or worth_logging(exc.reason)
        log.log(
            logging.INFO if loud else logging.DEBUG,
            "peer handshake refused",
            extra=kv(
                role=hs.role.value,
                remote=remote,
                peer=hs.peer_node_id or "unknown",
                reason=exc.reason,
            ),
        )
        await _close_ws(ws, CLOSE_POLICY_VIOLATION, exc.reason, close_timeout)
        raise
    except trio.TooSlowError:
        await _close_ws(ws, CLOSE_POLICY_VIOLATION, "handshake timed out", close_timeout)
        raise _HandshakeTimedOut("handshake timed out") from None
    except _IO_ERRORS as exc:
        await _close_ws(ws, _CLOSE_NORMAL, "", close_timeout)
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


OpenStream = Callable[[], Awaitable[trio.abc.Stream]]


def _log_faults(faults: FaultLog, peer: str, exc: BaseException, what: str) -> None:
    """The fault boundary of one connection: count and log what it raised
    unexpectedly; re-raise only what is not an error (a cancellation)."""
    to_log, rest = faults.absorb(peer, exc, _EXPECTED)
    for err in to_log:
        log.error(
            f"{what} failed unexpectedly; closed that connection",
            extra=kv(peer=peer, error=type(err).__name__),
            exc_info=(type(err), err, err.__traceback__),
        )
    if rest is not None:
        raise rest


async def _run_client(
    open_stream: OpenStream,
    where: str,
    host_header: str,
    resource: str,
    identity: SigningIdentity,
    clan_id: bytes,
    admit: Admit,
    timeout: float,
    faults: FaultLog,
    *,
    task_status: trio.TaskStatus[PeerSession] = trio.TASK_STATUS_IGNORED,
) -> None:
    # Owns the connection for its whole life: trio-websocket needs a nursery
    # for its reader task, and this task is where that nursery lives.  We open
    # (and always close) the stream ourselves because trio-websocket's
    # client leaves it open when the server closes first.
    deadline = trio.current_time() + timeout
    hs = Handshake(Role.INITIATOR, identity, clan_id, admit)
    started = False
    session: PeerSession | None = None
    try:
        with trio.fail_at(deadline):
            stream = await open_stream()
    except trio.TooSlowError:
        raise PeerDisconnected(f"timed out connecting to {where}") from None
    except OSError as exc:
        raise PeerDisconnected(f"cannot connect to {where}: {exc.strerror or exc}") from None
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_at(deadline) as upgrade:
                ws = await wrap_client_stream(
                    nursery, stream, host_header, resource, max_message_size=_MAX_MESSAGE
                )
            if upgrade.cancelled_caught:
                nursery.cancel_scope.cancel()  # else the reader task keeps it open
                raise PeerDisconnected(f"timed out opening a WebSocket to {where}")
            session = await _handshake(ws, hs, deadline)
            task_status.started(session)
            started = True
            await session._wait_released()
            # A client waits for the server to drop TCP after the close
            # handshake; we close the stream below anyway, so stop waiting.
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        exc = _only_error(group)
        if not started:
            if isinstance(exc, _IO_ERRORS):
                raise _disconnected(exc, f"cannot connect to {where}") from None
            raise exc from None
        if isinstance(exc, _IO_ERRORS):
            # After start the session reports its own failures; a close that
            # goes wrong here must not take the caller's nursery down.
            log.debug("peer link closed uncleanly", extra=kv(url=where, error=type(exc).__name__))
        else:
            # The caller's nursery holds this task: nothing may escape it.
            _log_faults(faults, session.peer_node_id if session else where, group, "peer link")
    finally:
        if session is not None and started:
            session._mark_closed("connection ended")
            session._released.set()
        await trio.aclose_forcefully(stream)


async def connect_stream(
    nursery: trio.Nursery,
    open_stream: OpenStream,
    host_header: str,
    resource: str,
    identity: SigningIdentity,
    clan_id: bytes,
    admit: Admit,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    faults: FaultLog | None = None,
) -> PeerSession:
    """`connect` over a stream that `open_stream()` opens (e.g. through SOCKS).

    `timeout` covers opening the stream, the WebSocket upgrade and the
    handshake.  After the session is returned, an unexpected error of the
    connection's task is counted in `faults` and ends that session only.
    """
    if timeout <= 0:
        raise LocalProtocolError("timeout must be positive")
    return await nursery.start(
        _run_client,
        open_stream,
        host_header,
        host_header,
        resource,
        identity,
        clan_id,
        admit,
        timeout,
        faults if faults is not None else FaultLog(),
    )


async def connect(
    nursery: trio.Nursery,
    url: str,
    identity: SigningIdentity,
    clan_id: bytes,
    admit: Admit,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    faults: FaultLog | None = None,
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
    host, port, resource, host_header = _parse_url(url)
    return await nursery.start(
        _run_client,
        partial(trio.open_tcp_stream, host, port),
        url,
        host_header,
        resource,
        identity,
        clan_id,
        admit,
        timeout,
        faults if faults is not None else FaultLog(),
    )


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


# -- the listener ---------------------------------------------------------------


class _WatchedNursery:
    """A nursery for trio-websocket's reader task that calls `on_exit` when the
    reader ends: before the handshake is done, that means the connection is
    dead (garbage instead of HTTP, a reset), and nobody should wait for it."""

    def __init__(self, nursery: trio.Nursery, on_exit: Callable[[], None]) -> None:
        self._nursery = nursery
        self._on_exit = on_exit

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object, name=None) -> None:
        async def watched() -> None:
            try:
                await fn(*args)
            finally:
                self._on_exit()

        self._nursery.start_soon(watched, name=name or fn)


class _Conn:
    """One accepted TCP connection, from accept to close."""

    __slots__ = ("id", "stream", "remote", "deadline", "scope", "authenticated")

    def __init__(self, conn_id: int, stream: trio.SocketStream, remote: str, deadline: float):
        self.id = conn_id
        self.stream = stream
        self.remote = remote
        self.deadline = deadline
        self.scope = trio.CancelScope()
        self.authenticated = False


class PeerListener:
    """Accept peer sessions on (host, port) and run `handler(session)` for each.

    Our own accept loop, so that admission (`PendingTable`) decides before any
    task exists for a connection: a refused connection is closed at once, and
    making room for a newcomer closes an older pending one synchronously, so
    the listener never holds more than `limits.max_pending` unauthenticated
    connections.  Each admitted connection must finish the WebSocket upgrade
    and the handshake within `timeout` seconds of its accept, or it is closed.
    At the process's file descriptor limit (EMFILE/ENFILE) accept backs off
    for 0.1 s instead of spinning.

    Every connection runs inside a fault boundary: an unexpected exception
    (also inside an exception group) from the handshake, trio-websocket or
    `handler` ends that connection only, is counted (`internal_errors`) and
    logged once per (peer, exception type).  `PeerDisconnected` /
    `RemoteProtocolError` escaping `handler` end the session quietly.
    """

    def __init__(
        self,
        host: str,
        port: int,
        identity: SigningIdentity,
        clan_id: bytes,
        admit: Admit,
        handler: Callable[[PeerSession], Awaitable[None]],
        *,
        timeout: float = HANDSHAKE_DEADLINE,
        limits: AdmissionLimits | None = None,
        fd_reserve: FdReserve | None = None,
    ) -> None:
        if timeout <= 0:
            raise LocalProtocolError("timeout must be positive")
        self._fds = PROCESS if fd_reserve is None else fd_reserve
        self._host = host
        self._port = port
        self._identity = identity
        self._clan_id = clan_id
        self._admit = admit
        self._handler = handler
        self.timeout = timeout
        self._pending = PendingTable(limits)
        self._faults = FaultLog()
        self._conns: dict[int, _Conn] = {}
        self._next_id = 0
        self._accept_logged = False
        self._refusals: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.port: int | None = None
        self._counts = {
            "accepted": 0,
            "accept_errors": 0,
            "accept_deferred": 0,  # closed unread: the fd reserve was lent at the limit
            "handshake_timeouts": 0,
            "handshake_failures": 0,
            "sessions_accepted": 0,
        }

    def _first_refusal(self, remote: str, reason: str) -> bool:
        key = (source_of(remote)[0], reason)
        if key in self._refusals:
            return False
        self._refusals[key] = None
        while len(self._refusals) > _REFUSALS_LOGGED:
            self._refusals.popitem(last=False)
        return True

    @property
    def open_connections(self) -> int:
        """Accepted connections not closed yet (pending and authenticated)."""
        return len(self._conns)

    @property
    def pending(self) -> int:
        """Connections that have not finished the handshake yet."""
        return len(self._pending)

    def counters(self) -> dict[str, int]:
        return {
            **self._counts,
            **self._pending.counts,
            **self._faults.counts,
            "pending_connections": len(self._pending),
            "open_connections": len(self._conns),
        }

    async def run(
        self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener, nursery)
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)
        raise AssertionError("the accept loops returned")  # they only end by raising

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> NoReturn:
        async with listener:
            while True:
                while self._fds.lent:  # the control server serves root on those fds
                    await trio.sleep(ACCEPT_BACKOFF)
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    # EMFILE/ENFILE (out of descriptors), ENOBUFS/ENOMEM: a
                    # connection ending frees one; until then, don't spin.
                    self._counts["accept_errors"] += 1
                    if not self._accept_logged or exc.errno not in _FD_ERRNOS:
                        self._accept_logged = True
                        log.error(
                            "cannot accept peer connections; retrying",
                            extra=kv(error=errno.errorcode.get(exc.errno or 0, str(exc))),
                        )
                    await trio.sleep(ACCEPT_BACKOFF)
                    continue
                if self._fds.lent:  # lent while we waited to accept: not ours to take
                    stream.socket.close()
                    self._counts["accept_deferred"] += 1
                    continue
                self._counts["accepted"] += 1
                try:
                    self._admit_conn(stream, nursery)
                except Exception as exc:  # a bug here must not end the accept loop
                    stream.socket.close()
                    _log_faults(self._faults, "listener", exc, "admitting a connection")

    def _admit_conn(self, stream: trio.SocketStream, nursery: trio.Nursery) -> None:
        try:
            peer = stream.socket.getpeername()
        except OSError:  # already reset
            stream.socket.close()
            return
        remote = peer[0] if isinstance(peer, tuple) else str(peer)
        conn_id = self._next_id
        self._next_id += 1
        verdict = self._pending.admit(conn_id, remote)
        if verdict.evict is not None:
            old = self._conns.pop(verdict.evict, None)  # type: ignore[arg-type]
            if old is not None:
                old.scope.cancel()
                old.stream.socket.close()  # the descriptor is free now, not later
        if not verdict.admitted:
            stream.socket.close()
            return
        conn = _Conn(conn_id, stream, remote, trio.current_time() + self.timeout)
        self._conns[conn_id] = conn
        nursery.start_soon(self._serve_conn, conn, name=f"peer {remote}")

    async def _serve_conn(self, conn: _Conn) -> None:
        try:
            with conn.scope:
                await self._handshake_and_serve(conn)
        except BaseException as exc:
            _log_faults(self._faults, conn.remote, exc, "incoming peer connection")
        finally:
            self._pending.release(conn.id)
            self._conns.pop(conn.id, None)
            await trio.aclose_forcefully(conn.stream)

    async def _handshake_and_serve(self, conn: _Conn) -> None:
        # Build the WebSocket machinery only once the peer says something: an
        # idle connection (most of a flood) costs one waiting task, nothing more.
        with trio.move_on_at(conn.deadline) as idle:
            await trio.lowlevel.wait_readable(conn.stream.socket)
        if idle.cancelled_caught:
            self._counts["handshake_timeouts"] += 1
            return
        async with trio.open_nursery() as nursery:

            def reader_done() -> None:
                if not conn.authenticated:
                    nursery.cancel_scope.cancel()

            try:
                with trio.fail_at(conn.deadline):
                    request = await wrap_server_stream(
                        _WatchedNursery(nursery, reader_done),  # type: ignore[arg-type]
                        conn.stream,
                        max_message_size=_MAX_MESSAGE,
                    )
                    ws = await request.accept()
                hs = Handshake(Role.RESPONDER, self._identity, self._clan_id, self._admit)
                session = await _handshake(
                    ws,
                    hs,
                    conn.deadline,
                    close_timeout=PENDING_CLOSE_TIMEOUT,
                    worth_logging=partial(self._first_refusal, conn.remote),
                )
            except (trio.TooSlowError, _HandshakeTimedOut):
                self._counts["handshake_timeouts"] += 1
                log.debug("incoming peer too slow", extra=kv(remote=conn.remote))
                nursery.cancel_scope.cancel()
                return
            except (*_IO_ERRORS, RemoteProtocolError, PeerDisconnected) as exc:
                self._counts["handshake_failures"] += 1
                reason = getattr(exc, "reason", type(exc).__name__)
                log.debug("incoming peer dropped", extra=kv(remote=conn.remote, reason=reason))
                nursery.cancel_scope.cancel()
                return
            conn.authenticated = True
            self._pending.release(conn.id)
            self._counts["sessions_accepted"] += 1
            try:
                await self._handler(session)
            except (PeerDisconnected, RemoteProtocolError) as exc:
                log.debug(
                    "peer session ended", extra=kv(peer=session.peer_node_id, reason=exc.reason)
                )
            finally:
                await session.aclose()
            nursery.cancel_scope.cancel()
        if not conn.authenticated:
            # The reader ended before the handshake: not HTTP, or a reset.
            self._counts["handshake_failures"] += 1


async def serve_peers(
    host: str,
    port: int,
    identity: SigningIdentity,
    clan_id: bytes,
    admit: Admit,
    handler: Callable[[PeerSession], Awaitable[None]],
    *,
    timeout: float = HANDSHAKE_DEADLINE,
    limits: AdmissionLimits | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run a `PeerListener` (see there); `task_status.started(actual_port)`."""
    listener = PeerListener(
        host, port, identity, clan_id, admit, handler, timeout=timeout, limits=limits
    )
    await listener.run(task_status=task_status)
