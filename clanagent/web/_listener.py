"""The console's HTTP listener: hypercorn's per-connection server, with the limits
hypercorn itself lacks.

Owns: accepting on the console's socket, the cap on connections at once (at it,
a newcomer takes the slot of the connection worth least: an idle one, or a
WebSocket still to authenticate, that never carried an authenticated request,
the longest idle first; only when every one has a request in flight, a short 503
and close), closing a connection as soon as its client has closed
(hypercorn keeps it until its keep-alive timer ends: CLOSE-WAIT for seconds, so a
local POST loop could use up the agent's fds), and the error boundary around each
connection.  HTTP and WebSocket parsing stay hypercorn's (h11 and wsproto).
Must never: let one connection's fault reach the listener or the agent, keep a
socket its client has closed, hold more than `max_connections` (plus a few
being refused or closing) at once, or let idle sockets keep a request out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio
from hypercorn.events import Updated
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from .._log import kv
from ..fd_reserve import PROCESS, FdReserve
from ._faults import Faults

__all__ = ["Listener", "Slot", "slot_of", "MAX_WEB_CONNECTIONS", "KEEP_ALIVE"]

log = logging.getLogger("clanagent.web")

MAX_WEB_CONNECTIONS = 64  # HTTP connections (WebSockets included) at once
KEEP_ALIVE = 2.0  # seconds an idle keep-alive connection (or one sending headers) may stay
MAX_REFUSING = 16  # connections being answered 503 at once; beyond, closed unanswered
REFUSE_LINGER = 0.5  # seconds a refused client has to read its 503
CAP_LOG_INTERVAL = 60.0  # seconds between log lines about the cap (per kind: evict, refuse)
SLOT_KEY = "clanagent.slot"  # the connection's Slot, in each request's scope["state"]

_BUSY_BODY = b"the web console is busy: too many connections; try again\n"
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n\r\n" + _BUSY_BODY
)


@dataclass(eq=False)
class Slot:
    """What the listener knows of one open connection, to choose whom to evict.

    `idle`: no request in flight (waiting for the first request head, or for the
    next one on keep-alive); `since`: when it last became idle.  The app sets
    `authenticated` once the connection carried a valid login or session, and
    `awaiting_auth` while a WebSocket waits for its authentication message (it
    holds no app slot yet, so it may be evicted like an idle one).
    """

    since: float
    idle: bool = True
    authenticated: bool = False
    awaiting_auth: bool = False
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def evictable(self) -> bool:
        return self.idle or self.awaiting_auth


def slot_of(scope: dict[str, Any]) -> Slot | None:
    """The Slot of the connection a request came on (None outside the listener)."""
    state = scope.get("state")
    slot = state.get(SLOT_KEY) if isinstance(state, dict) else None
    return slot if isinstance(slot, Slot) else None


class _Connection(TCPServer):
    """hypercorn's TCPServer, closing as soon as its client has closed.

    hypercorn's keep-alive timer task stays in the connection's task group after
    the client's EOF, so the socket lingers in CLOSE-WAIT until the timer ends.
    Once reading has ended (EOF, error, or the server closed it), nothing else will
    use the connection: stop the timer, and do not let a request finishing later
    start it again.
    """

    _reading_done = False
    counters: dict[str, int]
    slot: Slot

    async def _initiate_server_close(self) -> None:
        # the keep-alive timer ran out: idle between requests, or headers too slow
        if not self.context.terminated.is_set():
            self.counters["idle_closed"] += 1
        await super()._initiate_server_close()

    async def _read_data(self) -> None:
        await super()._read_data()
        self._reading_done = True
        await self.idle_task.stop()

    async def protocol_send(self, event: Any) -> None:
        if isinstance(event, Updated):
            if self._reading_done and event.idle:
                return
            # a request head has arrived (idle=False), or its answer is done (idle=True)
            self.slot.idle = event.idle
            if event.idle:
                self.slot.since = trio.current_time()
        await super().protocol_send(event)


class Listener:
    """Serves an ASGI app on hypercorn's config's binds; `counters` live across restarts."""

    def __init__(
        self,
        app: Any,
        *,
        max_connections: int = MAX_WEB_CONNECTIONS,
        fd_reserve: FdReserve | None = None,
    ) -> None:
        self.max_connections = max_connections
        self._fds = PROCESS if fd_reserve is None else fd_reserve
        self.counters: dict[str, int] = {
            "connections": 0,  # open now
            "accepted": 0,
            "refused": 0,  # at the cap with every request in flight: 503 (or closed unanswered)
            "evicted": 0,  # idle (or unauthenticated WebSocket) closed to make room at the cap
            "internal_errors": 0,
            "idle_closed": 0,  # no request within KEEP_ALIVE (or headers not done by then)
            "refused_fds": 0,  # closed unread: the fd reserve was lent at the fd limit
        }
        self.faults = Faults(self.counters)
        self._app = app
        self._refusing = 0
        self._slots: set[Slot] = set()  # open connections, evicted ones removed at once
        self._quiet_until: dict[str, float] = {}

    async def serve(
        self,
        config: Any,
        shutdown_trigger: Callable[[], Awaitable[Any]],
        *,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """hypercorn's `worker_serve`, minus what the console does not use (TLS, QUIC,
        lifespan, worker recycling), with our connection handler."""
        app = wrap_app(self._app, config.wsgi_max_body_size, "asgi")
        context = WorkerContext(None)
        sockets = config.create_sockets()
        listeners = []
        binds = []
        for sock in sockets.insecure_sockets:
            sock.listen(config.backlog)
            listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
            binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")

        async def handle(stream: trio.SocketStream) -> None:
            await self._handle(app, config, context, stream)

        async with trio.open_nursery() as connections:
            try:
                async with trio.open_nursery() as accepting:
                    serve = partial(trio.serve_listeners, handler_nursery=connections)
                    await accepting.start(serve, handle, listeners)
                    task_status.started(binds)
                    await shutdown_trigger()
                    accepting.cancel_scope.cancel()
            finally:
                await context.terminated.set()  # ends keep-alive waits: close when idle
                connections.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

    def _log_burst(self, kind: str, message: str, **fields: Any) -> None:
        """One line per burst (per kind), not one per connection."""
        now = trio.current_time()
        if now >= self._quiet_until.get(kind, float("-inf")):
            self._quiet_until[kind] = now + CAP_LOG_INTERVAL
            log.warning(message, extra=kv(limit=self.max_connections, **fields))

    def _evict_one(self) -> bool:
        """Close the open connection worth least, if one is idle; False if none is.

        Never-authenticated before authenticated, then the longest idle first.
        Its slot is free at once: its socket closes as its task unwinds.
        """
        candidates = [s for s in self._slots if s.evictable]
        if not candidates:
            return False
        victim = min(candidates, key=lambda s: (s.authenticated, s.since))
        self._slots.discard(victim)
        self.counters["connections"] -= 1
        self.counters["evicted"] += 1
        victim.scope.cancel()
        return True

    async def _handle(
        self, app: Any, config: Any, context: WorkerContext, stream: trio.SocketStream
    ) -> None:
        c = self.counters
        if self._fds.lent:  # at the fd limit, the control server serves root on those fds
            c["refused_fds"] += 1
            stream.socket.close()
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        if len(self._slots) >= self.max_connections:
            if self._evict_one():
                self._log_burst(
                    "evict",
                    "web console at its connection cap: closing idle connections",
                    evicted=c["evicted"],
                )
            else:
                c["refused"] += 1
                self._log_burst(
                    "refuse",
                    "web console at its connection cap: refusing (503)",
                    refused=c["refused"],
                )
                await self._refuse(stream)
                return
        slot = Slot(since=trio.current_time())
        self._slots.add(slot)
        c["connections"] += 1
        c["accepted"] += 1
        try:
            with slot.scope:
                conn = _Connection(app, config, context, ConnectionState({SLOT_KEY: slot}), stream)
                conn.counters = c
                conn.slot = slot
                await conn.run()
        except Exception as exc:  # a bug under one connection ends that connection only
            self.faults.report("connection", exc)
        finally:
            if slot in self._slots:  # else evicted: its slot is already someone else's
                self._slots.discard(slot)
                c["connections"] -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _refuse(self, stream: trio.SocketStream) -> None:
        """503 and close: without reading the request, so at no cost but the fd, and
        only briefly (a few at once; the rest are closed unanswered)."""
        if self._refusing >= MAX_REFUSING:
            await stream.aclose()
            return
        self._refusing += 1
        try:
            with trio.move_on_after(REFUSE_LINGER):
                await stream.send_all(BUSY_RESPONSE)
                await stream.send_eof()
                # Drain until the client closes: closing with its request unread
                # would reset the connection and could discard the answer.
                while await stream.receive_some(4096):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._refusing -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()
