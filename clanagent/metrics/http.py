"""The metrics HTTP listener: `GET /metrics` for Prometheus, in trio.

Owns: the TCP listener of `[metrics] listen` (our own trio code around h11,
one request a connection), its caps (connections in all and per source
address, a deadline for the whole exchange, a request-head size limit), the
Host check against DNS rebinding, and its counters.
Must never: run a blocking server thread or block the event loop, answer
anything but GET/HEAD of /metrics (and a one-line index at /), keep a
connection past its deadline, or let one client's fault end the listener.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import h11
import trio

from .._log import kv

__all__ = ["MetricsListener"]

log = logging.getLogger("clanagent.metrics")

MAX_CONNECTIONS = 16  # open at once, all sources together
MAX_PER_SOURCE = 4  # open at once from one address
DEADLINE = 10.0  # seconds for the whole exchange: request in, response out
MAX_HEAD = 8192  # bytes of request line and headers
READ_SIZE = 4096
LINGER = 1.0  # seconds to read away what a client still sends after our reply
MAX_LINGER_BYTES = 64 * 1024

# openmetrics? -> (body, content type), awaited
Scrape = Callable[[bool], Awaitable[tuple[bytes, str]]]

_KNOWN = frozenset(s.value for s in HTTPStatus)
INDEX = b"clanagent metrics: GET /metrics\n"


def _host_allowed(host: str | None, listen_host: str) -> bool:
    """Host header: an IP literal, localhost, this machine's name or the listen
    host.  A DNS name of somebody else's (a rebinding page) is refused."""
    if host is None:
        return True  # HTTP/1.0 without Host: no browser sends that
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    own = {"localhost", listen_host.lower(), socket.gethostname().lower()}
    return name in own or name.split(".", 1)[0] == socket.gethostname().lower()


class MetricsListener:
    def __init__(
        self,
        host: str,
        port: int,
        scrape: Scrape,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_per_source: int = MAX_PER_SOURCE,
        deadline: float = DEADLINE,
        max_head: int = MAX_HEAD,
    ) -> None:
        self.host = host
        self.port = port
        self._scrape = scrape
        self.max_connections = max_connections
        self.max_per_source = max_per_source
        self.deadline = deadline
        self.max_head = max_head
        self._open = 0
        self._by_source: dict[str, int] = {}
        self.stats = {
            "accepted": 0,
            "refused_busy": 0,
            "refused_source": 0,
            "scrapes": 0,
            "bad_requests": 0,
            "not_found": 0,
            "forbidden_host": 0,
            "timeouts": 0,
            "errors": 0,
        }

    def counters(self) -> dict[str, int]:
        return {**self.stats, "open": self._open}

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the bound port through task_status, serve until cancelled."""
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("metrics listening", extra=kv(addr=f"{self.host}:{self.port}"))
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            # serve_listeners sleeps through EMFILE/ENFILE instead of spinning.
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            source = str(stream.socket.getpeername()[0])
        except OSError:
            await trio.aclose_forcefully(stream)
            return
        if self._open >= self.max_connections:
            self.stats["refused_busy"] += 1
            await trio.aclose_forcefully(stream)
            return
        if self._by_source.get(source, 0) >= self.max_per_source:
            self.stats["refused_source"] += 1
            await trio.aclose_forcefully(stream)
            return
        self.stats["accepted"] += 1
        self._open += 1
        self._by_source[source] = self._by_source.get(source, 0) + 1
        try:
            with trio.move_on_after(self.deadline) as scope:
                await self._exchange(stream)
            if scope.cancelled_caught:
                self.stats["timeouts"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE):
                self.stats["errors"] += 1
        except Exception:  # noqa: BLE001 -- a fault with one client ends that client only
            self.stats["errors"] += 1
            log.exception("metrics connection failed", extra=kv(source=source))
        finally:
            self._open -= 1
            left = self._by_source[source] - 1
            if left:
                self._by_source[source] = left
            else:
                del self._by_source[source]
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
        request = await self._read_request(stream, conn)
        if request is None:
            return
        status, headers, body = await self._answer(request)
        if request.method == b"HEAD":
            headers.append(("Content-Length", str(len(body))))
            body = b""
        await self._respond(stream, conn, status, headers, body)

    async def _read_request(
        self, stream: trio.SocketStream, conn: h11.Connection
    ) -> h11.Request | None:
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.stats["bad_requests"] += 1
                # h11 still lets a server answer a request it could not parse.
                text = [("Content-Type", "text/plain; charset=utf-8")]
                body = f"bad request: {exc}\n".encode()
                await self._respond(stream, conn, exc.error_status_hint, text, body)
                return None
            if event is h11.NEED_DATA:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    return None
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                return event
            return None

    async def _answer(self, request: h11.Request) -> tuple[int, list[tuple[str, str]], bytes]:
        text = [("Content-Type", "text/plain; charset=utf-8")]
        host = next((v.decode("latin-1") for k, v in request.headers if k == b"host"), None)
        if not _host_allowed(host, self.host):
            self.stats["forbidden_host"] += 1
            return 403, text, b"wrong Host header (a DNS rebinding attempt?)\n"
        if request.method not in (b"GET", b"HEAD"):
            self.stats["bad_requests"] += 1
            return 405, [*text, ("Allow", "GET, HEAD")], b"only GET and HEAD\n"
        path = request.target.split(b"?", 1)[0]
        if path == b"/":
            return 200, text, INDEX
        if path != b"/metrics":
            self.stats["not_found"] += 1
            return 404, text, b"not found: GET /metrics\n"
        accept = b",".join(v for k, v in request.headers if k == b"accept")
        body, ctype = await self._scrape(b"application/openmetrics-text" in accept)
        self.stats["scrapes"] += 1
        return 200, [("Content-Type", ctype)], body

    async def _respond(
        self,
        stream: trio.SocketStream,
        conn: h11.Connection,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        if not any(k == "Content-Length" for k, _ in headers):
            headers.append(("Content-Length", str(len(body))))
        headers.append(("Connection", "close"))
        reason = HTTPStatus(status).phrase.encode() if status in _KNOWN else b""
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        await stream.send_all(out)
        await self._linger(stream)

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Half-close, then read away what the client still sends (a bounded
        amount, for a bounded time): closing with unread bytes resets the
        connection, and a reset can destroy the reply before it is read."""
        await stream.send_eof()
        with trio.move_on_after(LINGER):
            drained = 0
            while drained < MAX_LINGER_BYTES:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    break
                drained += len(data)


async def start_http(
    listen: str, scrape: Any, nursery: trio.Nursery
) -> tuple[MetricsListener | None, Any]:
    """Serve /metrics on `listen` (`[metrics] listen`): (the listener or None,
    the `metrics` capability). A port we cannot bind is one log line and an
    unavailable capability, never a stopped agent."""
    from ..capabilities import Capability
    from ..config import split_hostport

    host, port = split_hostport(listen, "metrics.listen")
    listener = MetricsListener(host, port, scrape)
    try:
        await nursery.start(listener.serve)
    except OSError as exc:
        why = f"cannot listen on {listen}: {exc.strerror or exc}"
        log.warning("metrics listener off", extra=kv(reason=why))
        return None, Capability("metrics", False, why)
    addr = f"http://{listen.rsplit(':', 1)[0]}:{listener.port}/metrics"
    return listener, Capability("metrics", True, f"serving {addr}")
