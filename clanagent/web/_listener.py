"""The console's HTTP listener: hypercorn's per-connection server, with the limits
hypercorn itself lacks.

Owns: accepting on the console's socket, the cap on connections at once (beyond
it a short 503 and close), closing a connection as soon as its client has closed
(hypercorn keeps it until its keep-alive timer ends: CLOSE-WAIT for seconds, so a
local POST loop could use up the agent's fds), and the error boundary around each
connection.  HTTP and WebSocket parsing stay hypercorn's (h11 and wsproto).
Must never: let one connection's fault reach the listener or the agent, keep a
socket its client has closed, or hold more than `max_connections` (plus a few
being refused) at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.events import Updated
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from .._log import kv
from ._faults import Faults

__all__ = ["Listener", "MAX_WEB_CONNECTIONS", "KEEP_ALIVE"]

log = logging.getLogger("clanagent.web")

MAX_WEB_CONNECTIONS = 64  # HTTP connections (WebSockets included) at once
KEEP_ALIVE = 2.0  # seconds an idle keep-alive connection (or one sending headers) may stay
MAX_REFUSING = 16  # connections being answered 503 at once; beyond, closed unanswered
REFUSE_LINGER = 0.5  # seconds a refused client has to read its 503
CAP_LOG_INTERVAL = 60.0  # seconds between log lines about refusing at the cap

_BUSY_BODY = b"the web console is busy: too many connections; try again\n"
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: " + str(len(_BUSY_BODY)).encode() + b"\r\n"
    b"retry-after: 1\r\n"
    b"connection: close\r\n\r\n" + _BUSY_BODY
)


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
        if self._reading_done and isinstance(event, Updated) and event.idle:
            return
        await super().protocol_send(event)


class Listener:
    """Serves an ASGI app on hypercorn's config's binds; `counters` live across restarts."""

    def __init__(self, app: Any, *, max_connections: int = MAX_WEB_CONNECTIONS) -> None:
        self.max_connections = max_connections
        self.counters: dict[str, int] = {
            "connections": 0,  # open now
            "accepted": 0,
            "refused": 0,  # over the cap: 503 (or closed unanswered)
            "internal_errors": 0,
            "idle_closed": 0,  # no request within KEEP_ALIVE (or headers not done by then)
        }
        self.faults = Faults(self.counters)
        self._app = app
        self._refusing = 0
        self._quiet_until = float("-inf")

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

    async def _handle(
        self, app: Any, config: Any, context: WorkerContext, stream: trio.SocketStream
    ) -> None:
        c = self.counters
        if c["connections"] >= self.max_connections:
            c["refused"] += 1
            now = trio.current_time()
            if now >= self._quiet_until:  # one line per burst, not one per connection
                self._quiet_until = now + CAP_LOG_INTERVAL
                log.warning(
                    "web console at its connection cap: refusing (503)",
                    extra=kv(limit=self.max_connections, refused=c["refused"]),
                )
            await self._refuse(stream)
            return
        c["connections"] += 1
        c["accepted"] += 1
        try:
            conn = _Connection(app, config, context, ConnectionState({}), stream)
            conn.counters = c
            await conn.run()
        except Exception as exc:  # a bug under one connection ends that connection only
            self.faults.report("connection", exc)
        finally:
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
