"""The web console's ASGI application: a few routes, written out by hand.

Owns: routing (the page, its static assets, the login exchange, and the
`/api` WebSocket), the request checks (Host against DNS rebinding, Origin
against other sites, sizes, the time a body may take), security headers,
the error boundary around each request (500, or close 1011), and each
WebSocket session: authenticate with the first message (within
AUTH_TIMEOUT), only then take one of the MAX_CONNECTIONS slots, then run
control API requests through the one table, checks and handlers the control
socket uses (`control.api`; the console's own `console.*` methods are in
it too, offered to web sessions only).
It tells the listener which connections carried a valid login or session (evicted
last at the connection cap) and which WebSockets still wait to authenticate.
Must never: answer a request with a foreign Host, let anything through the
WebSocket before it has authenticated, give a slot to a socket that has not,
let one browser's bad input or one handler's bug reach beyond its own
request, or serve a file that is not one of the packaged assets.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import trio

from .._counters import OTHER, LabelCounts
from .._log import kv
from ..control.api import ApiTable, check_params
from ..control.protocol import (
    ControlError,
    ErrorCode,
    Request,
    RequestError,
    reply_error,
    reply_ok,
    stream_end,
    stream_event,
)
from ..wire import Limits
from ._faults import Faults
from ._listener import slot_of
from .actions import SIGNER
from .auth import Authenticator, AuthError, check_host, check_origin
from .messages import Auth, Cancel, decode_message, encode

__all__ = ["WebApp", "WebStats", "STATIC_TYPES"]

log = logging.getLogger("clanagent.web")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

AUTH_TIMEOUT = 3.0  # seconds a new WebSocket has to authenticate (it holds no slot meanwhile)
BODY_TIMEOUT = 10.0  # seconds a login or logout request's body may take to arrive (else 408)
SESSION_CHECK = 5.0  # seconds between checks that an open socket's session lives
MAX_BODY = 4096  # bytes in a login or logout request
MAX_CONNECTIONS = 32  # authenticated WebSockets at once
MAX_IN_FLIGHT = 16  # requests at once on one WebSocket
MAX_STREAMS = 4  # streams (events) at once on one WebSocket

STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # the login URL carries a token
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]

# WebSocket close codes (4000-4999 are the application's).
CLOSE_FORBIDDEN = 4403
CLOSE_UNAUTHORIZED = 4401
CLOSE_BUSY = 4429


def _load_static() -> dict[str, tuple[bytes, str]]:
    files: dict[str, tuple[bytes, str]] = {}
    root = resources.files("clanagent.web") / "static"
    for entry in root.iterdir():
        name = entry.name
        ext = name[name.rfind(".") :] if "." in name else ""
        if entry.is_file() and ext in STATIC_TYPES:
            files[name] = (entry.read_bytes(), STATIC_TYPES[ext])
    return files


@dataclass
class WebStats:
    http_requests: int = 0
    refused: int = 0
    logins: int = 0
    failed_logins: int = 0
    websockets: int = 0
    requests: int = 0
    timeouts: int = 0  # a request body or a WebSocket's authentication too slow
    websockets_open: int = 0  # authenticated, holding a slot now
    websockets_busy: int = 0  # authenticated but no slot free
    errors: dict[str, int] = field(default_factory=dict)
    # requests by (method, result), as the control socket counts them
    by_method: LabelCounts = field(default_factory=LabelCounts)

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _mark_authenticated(scope: Scope) -> None:
    """The connection carried a valid login or session: the listener evicts it last."""
    slot = slot_of(scope)
    if slot is not None:
        slot.authenticated = True


_ROUTES = ("/", "/login", "/index.html", "/session", "/logout", "/api")


def _route(path: str) -> str:
    """A path as a bounded label (for the log-once key): the route, not what was asked."""
    if path in _ROUTES:
        return path
    return "/static/" if path.startswith("/static/") else "(other)"


class WebApp:
    """The ASGI callable hypercorn serves; `port` is set once the socket is bound."""

    def __init__(
        self,
        api: ApiTable,
        auth: Authenticator,
        *,
        max_message: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.auth = auth
        self.port = 0
        self.clock = clock
        self.session_check = SESSION_CHECK  # seconds between checks of a socket's session
        self.limits = Limits(max_frame=max_message)
        self.stats = WebStats()
        self.static = _load_static()
        self.faults = Faults({"internal_errors": 0})  # the console shares its listener's
        self._connections = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        started = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.close"):
                started = True
            await send(message)

        try:
            if kind == "http":
                await self._http(scope, receive, tracked)
            elif kind == "websocket":
                await self._websocket(scope, receive, tracked)
        except Exception as exc:
            # A bug under one request ends that request: 500 (close 1011 for a
            # WebSocket), logged once per (route, type), counted; the console serves on.
            self.faults.report(f"{kind} {_route(scope.get('path', ''))}", exc)
            try:
                if kind == "http" and not started:
                    await self._respond(send, 500, b"internal error (see the agent's log)")
                elif kind == "websocket":
                    await send({"type": "websocket.close", "code": 1011})
            except Exception:  # the connection is gone or already answered
                pass

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- HTTP ---------------------------------------------------------------------------

    async def _respond(
        self,
        send: Send,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        head: bool = False,
    ) -> None:
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            *SECURITY_HEADERS,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _json(self, send: Send, status: int, value: Any) -> None:
        await self._respond(send, status, encode(value).encode(), "application/json")

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The body, or None if it is too big or the client left; TooSlowError after
        BODY_TIMEOUT (a client trickling bytes must not hold its connection)."""
        body = bytearray()
        with trio.fail_after(BODY_TIMEOUT):
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return None
                body += msg.get("body", b"")
                if len(body) > MAX_BODY:
                    return None
                if not msg.get("more_body"):
                    return bytes(body)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.stats.http_requests += 1
        method, path = scope["method"], scope["path"]
        try:
            check_host(_header(scope, b"host"), self.port)
        except AuthError as exc:
            self.stats.refused += 1
            await self._respond(send, 403, exc.message.encode())
            return
        if method in ("GET", "HEAD"):
            head = method == "HEAD"
            if path in ("/", "/login", "/index.html"):
                body, ctype = self.static["index.html"]
                await self._respond(send, 200, body, ctype, head)
                return
            if path.startswith("/static/") and path[8:] in self.static:
                body, ctype = self.static[path[8:]]
                await self._respond(send, 200, body, ctype, head)
                return
            await self._respond(send, 404, b"not found", head=head)
            return
        if method == "POST" and path in ("/session", "/logout"):
            try:
                check_origin(_header(scope, b"origin"), self.port)
            except AuthError as exc:
                self.stats.refused += 1
                await self._json(send, 403, {"error": exc.message})
                return
            ctype = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                await self._json(send, 415, {"error": "send JSON (Content-Type: application/json)"})
                return
            try:
                raw = await self._read_body(receive)
            except trio.TooSlowError:
                self.stats.timeouts += 1
                await self._json(
                    send, 408, {"error": f"the request body took over {BODY_TIMEOUT:g} s"}
                )
                return
            try:
                data = json.loads(raw) if raw is not None else None
            except (ValueError, RecursionError):
                data = None
            if not isinstance(data, dict):
                await self._json(
                    send, 400, {"error": f"expected a JSON object of at most {MAX_BODY} bytes"}
                )
                return
            if path == "/session":
                try:
                    session = self.auth.redeem(data.get("token"), self.clock())
                except AuthError as exc:
                    self.stats.failed_logins += 1
                    log.info("web console login refused", extra=kv(reason=exc.message))
                    await self._json(send, 401, {"error": exc.message})
                    return
                self.stats.logins += 1
                _mark_authenticated(scope)
                log.info("web console login")
                await self._json(
                    send, 200, {"session": session, "idle_timeout": self.auth.session_idle}
                )
                return
            if self.auth.end(data.get("session")):
                _mark_authenticated(scope)  # it was a live session
            await self._json(send, 200, {"ok": True})
            return
        await self._respond(send, 405 if path in ("/", "/session", "/logout") else 404, b"no")

    # -- WebSocket ------------------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        try:
            if scope["path"] != "/api":
                raise AuthError("no such WebSocket: the console's API is at /api")
            check_host(_header(scope, b"host"), self.port)
            check_origin(_header(scope, b"origin"), self.port)
        except AuthError as exc:
            self.stats.refused += 1
            log.info("web console WebSocket refused", extra=kv(reason=exc.message))
            await send({"type": "websocket.close", "code": CLOSE_FORBIDDEN})
            return
        self.stats.websockets += 1
        await send({"type": "websocket.accept"})
        session = _WsSession(self, receive, send)
        slot = slot_of(scope)
        if slot is not None:
            slot.awaiting_auth = True  # no slot of ours yet: the listener may evict it
        try:
            if not await session.authenticate():
                return
        finally:
            if slot is not None:
                slot.awaiting_auth = False
        _mark_authenticated(scope)
        # Only now a slot: sockets that never authenticate (they are closed after
        # AUTH_TIMEOUT) cannot keep an admin's browser out.
        try:
            self._connections.acquire_nowait()
        except trio.WouldBlock:
            self.stats.websockets_busy += 1
            text = f"too many console connections (limit {MAX_CONNECTIONS}); close another tab"
            await session.send(session.error(None, ErrorCode.UNAVAILABLE, text))
            await session.close(CLOSE_BUSY, text[:120])
            return
        self.stats.websockets_open += 1
        try:
            await session.send({"id": 0, "ok": True, "result": {"access": session.access}})
            await session.serve()
        finally:
            self.stats.websockets_open -= 1
            self._connections.release()


class _WsSession:
    """One authenticated browser connection: requests in, replies and events out."""

    def __init__(self, app: WebApp, receive: Receive, send: Send) -> None:
        self.app = app
        self._receive = receive
        self._send_raw = send
        self._lock = trio.Lock()
        self.session: str | None = None
        self.access = "read"
        self.in_flight = 0
        self.streams: dict[int, trio.CancelScope] = {}
        self.closed = False

    async def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            text = encode(message)
        except (ValueError, TypeError) as exc:
            text = encode(
                reply_error(
                    message.get("id"), ErrorCode.INTERNAL, f"reply not encodable as JSON: {exc}"
                )
            )
        async with self._lock:
            try:
                await self._send_raw({"type": "websocket.send", "text": text})
            except Exception:  # the browser went away mid-send
                self.closed = True

    async def close(self, code: int, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        async with self._lock:
            try:
                await self._send_raw({"type": "websocket.close", "code": code, "reason": reason})
            except Exception:
                pass

    async def receive_text(self) -> str | bytes | None:
        msg = await self._receive()
        if msg["type"] == "websocket.disconnect":
            self.closed = True
            return None
        if msg["type"] != "websocket.receive":
            return None
        text = msg.get("text")
        return text if text is not None else (msg.get("bytes") or b"")

    def error(self, rid: int | None, code: str, message: str) -> dict[str, Any]:
        self.app.stats.count_error(code)
        return reply_error(rid, code, message)

    async def authenticate(self) -> bool:
        """Wait (AUTH_TIMEOUT at most) for the auth message; False once closed."""
        app = self.app
        with trio.move_on_after(AUTH_TIMEOUT) as timer:
            text = await self.receive_text()
        if timer.cancelled_caught:
            app.stats.timeouts += 1
        if timer.cancelled_caught or text is None:
            await self.close(CLOSE_UNAUTHORIZED, "authenticate first")
            return False
        try:
            msg = decode_message(text, app.limits)
            if not isinstance(msg, Auth):
                raise AuthError('authenticate first: send {"auth": SESSION}')
            self.access = app.auth.check(msg.session, app.clock())
            self.session = msg.session
        except (ControlError, AuthError) as exc:
            text_ = exc.message
            await self.send(self.error(None, ErrorCode.PERMISSION_DENIED, text_))
            await self.close(CLOSE_UNAUTHORIZED, text_[:120])
            return False
        return True

    async def serve(self) -> None:
        """Requests until the socket closes or its session ends."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_session, nursery.cancel_scope)
            while not self.closed:
                text = await self.receive_text()
                if text is None:
                    break
                await self._on_message(nursery, text)
            nursery.cancel_scope.cancel()

    async def _watch_session(self, scope: trio.CancelScope) -> None:
        """Close the socket once its session ends elsewhere (logout, expiry), even if
        it only listens to events and never sends."""
        while True:
            await trio.sleep(self.app.session_check)
            if not self.app.auth.alive(self.session, self.app.clock()):
                await self.close(CLOSE_UNAUTHORIZED, "logged out or the session expired")
                scope.cancel()
                return

    async def _on_message(self, nursery: trio.Nursery, text: str | bytes) -> None:
        app = self.app
        app.stats.requests += 1
        try:
            msg = decode_message(text, app.limits)
        except RequestError as exc:
            await self.send(self.error(exc.request_id, exc.code, exc.message))
            return
        except ControlError as exc:
            await self.send(self.error(None, exc.code, exc.message))
            return
        if isinstance(msg, Auth):
            await self.send(self.error(None, ErrorCode.BAD_REQUEST, "already authenticated"))
            return
        if isinstance(msg, Cancel):
            scope = self.streams.get(msg.id)
            if scope is not None:
                scope.cancel()
            return
        try:
            app.auth.check(self.session, app.clock())  # logged out or expired meanwhile?
        except AuthError as exc:
            await self.send(self.error(msg.id, ErrorCode.PERMISSION_DENIED, exc.message))
            await self.close(CLOSE_UNAUTHORIZED, "session ended")
            return
        if self.in_flight >= MAX_IN_FLIGHT:
            await self.send(
                self.error(
                    msg.id,
                    ErrorCode.UNAVAILABLE,
                    f"too many requests at once (limit {MAX_IN_FLIGHT}); wait for replies",
                )
            )
            return
        self.in_flight += 1
        nursery.start_soon(self._run_request, msg)

    async def _run_request(self, req: Request) -> None:
        try:
            await self._dispatch(req)
        finally:
            self.in_flight -= 1

    async def _dispatch(self, req: Request) -> None:
        """The control socket's `_dispatch`, with JSON instead of frames."""
        app = self.app
        # console.* methods sign with this session's own admin key (if any)
        SIGNER.set(app.auth.signer_of(self.session))
        method, outcome = OTHER, "ok"
        try:
            handler = app.api.lookup(req.version, req.method, "web")
            method = handler.name
            if not handler.allows(self.access):
                raise ControlError(
                    ErrorCode.PERMISSION_DENIED,
                    f"'{req.method}' changes state and this session has read-only access",
                )
            check_params(handler, req.params)
            if handler.upgrade:
                # a raw byte session (a VM's serial console) needs a terminal
                raise ControlError(
                    ErrorCode.INVALID_PARAMS,
                    f"'{req.method}' is a terminal session: use 'clanctl vm console' "
                    "(the web console shows the log instead)",
                )
            if handler.streaming:
                app.stats.by_method.add(method, "ok")  # counted when it starts
                await self._stream(req.id, handler.call(req.params))
                return
            result = await handler.call(req.params)
            app.stats.by_method.add(method, outcome)
            await self.send(reply_ok(req.id, result))
        except ControlError as exc:
            app.stats.by_method.add(method, exc.code)
            await self.send(self.error(req.id, exc.code, exc.message))
        except Exception as exc:  # a handler bug must not take the console down
            app.stats.by_method.add(method, ErrorCode.INTERNAL)
            log.exception("web console handler failed", extra=kv(method=req.method))
            await self.send(self.error(req.id, ErrorCode.INTERNAL, f"internal error: {exc}"))

    async def _stream(self, rid: int, events: Any) -> None:
        if len(self.streams) >= MAX_STREAMS or rid in self.streams:
            await self.send(
                self.error(
                    rid, ErrorCode.UNAVAILABLE, f"at most {MAX_STREAMS} streams, with distinct ids"
                )
            )
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()
            return
        with trio.CancelScope() as scope:
            self.streams[rid] = scope
            try:
                async for event in events:
                    await self.send(stream_event(rid, event))
                    if self.closed:
                        break
            finally:
                self.streams.pop(rid, None)
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
        await self.send(stream_end(rid))
