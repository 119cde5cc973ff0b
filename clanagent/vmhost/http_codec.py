"""HTTP/1.1 requests and responses for local VMM API sockets, sans-IO.

Owns: building a request and parsing a response within the limits (no
chunked bodies, bounded headers and body), with h11 doing the HTTP/1.1
itself; the error types and the API fault message of each product.  Must
never: import trio or do any I/O, or let h11's errors out as anything but
ApiProtocolError.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import h11

from clanagent.vmhost.spec import VmHostError, VmHostLocalError, VmHostRemoteError


class ApiError(VmHostError):
    """Base of every error from talking to a VMM API socket."""


class ApiLocalError(ApiError, VmHostLocalError):
    """We asked for something we cannot send (bad method, path or body)."""


class ApiRemoteError(ApiError, VmHostRemoteError):
    """The other side (or its absence) is at fault."""


class ApiConnectError(ApiRemoteError):
    """No server on the socket, or the connection broke while sending."""


class ApiTimeout(ApiRemoteError):
    """The server accepted the connection but did not answer in time."""


class ApiProtocolError(ApiRemoteError):
    """The response is not well-formed HTTP/1.1 or not the JSON we expect."""


class ApiStatusError(ApiRemoteError):
    """A well-formed response with a non-2xx status; ``fault`` is the API's message."""

    def __init__(self, method: str, path: str, status: int, fault: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.fault = fault
        super().__init__(f"{method} {path} -> {status}: {fault}")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds on what a server may make us buffer (named so tests can shrink them)."""

    max_header_bytes: int = 16 * 1024  # status line + headers + blank line
    max_headers: int = 64
    max_body_bytes: int = 1024 * 1024  # vm.info with a device tree stays far below
    max_fault_chars: int = 512  # how much of an error body goes into an exception


DEFAULT_HTTP_LIMITS = HttpLimits()


_METHODS = frozenset({"GET", "PUT", "PATCH"})


_PATH_RE = re.compile(r"/[A-Za-z0-9._~/\-]*")


# h11's reasons for the errors a VMM's reply can make, as our reasons (the
# h11 text follows); anything else is "malformed response".  Only wording:
# every one is an ApiProtocolError.
_H11_REASONS = (
    ("illegal status line", "bad status line"),
    ("illegal header line", "bad header line"),
    ("conflicting content-length", "conflicting content-length headers"),
    ("bad content-length", "bad content-length"),
)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order received
    body: bytes


def build_request(method: str, path: str, body: Any = None) -> bytes:
    """The bytes of one request; a body (any JSON value) is sent as JSON.

    Firecracker's HTTP server wants Content-Length on every request with a
    body and none on a bodiless one, so GET carries no body headers at all.
    """
    if method not in _METHODS:
        raise ApiLocalError(f"unsupported method {method!r}")
    if not _PATH_RE.fullmatch(path):
        raise ApiLocalError(f"bad request path {path!r}")
    headers = [("Host", "localhost"), ("Accept", "application/json")]
    payload = b""
    if body is not None:
        try:
            payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise ApiLocalError(f"request body is not JSON: {e}") from None
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    elif method != "GET":
        headers.append(("Content-Length", "0"))
    conn = h11.Connection(h11.CLIENT)
    out = conn.send(h11.Request(method=method, target=path, headers=headers)) or b""
    if payload:
        out += conn.send(h11.Data(data=payload)) or b""
    return out + (conn.send(h11.EndOfMessage()) or b"")


def _reason(exc: h11.ProtocolError, got_head: bool, eof: bool, limits: HttpLimits) -> str:
    text = str(exc)
    if not got_head:
        if text == "Receive buffer too long":
            return f"response headers exceed {limits.max_header_bytes} bytes"
        for theirs, ours in _H11_REASONS:
            if text.lower().startswith(theirs):
                return f"{ours} ({text[:80]})"
        if eof:
            return "connection closed before the response headers ended"
    elif eof:
        return "connection closed before the response body ended"
    return f"malformed response ({text[:80]})"


def parse_response(
    data: bytes, *, eof: bool, limits: HttpLimits = DEFAULT_HTTP_LIMITS
) -> Response | None:
    """Parse one response from everything received so far (with h11).

    Returns None while more bytes are needed (and ``eof`` is False); raises
    ApiProtocolError for anything malformed, oversized, or cut short at EOF.
    Bytes after a Content-Length body are ignored: we send one request per
    connection, so nothing legitimate can follow.
    """
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=limits.max_header_bytes)
    # h11 reads a response only after its request (the method decides the
    # framing; we never send HEAD or CONNECT, so any GET stands for ours).
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "localhost")]))
    conn.send(h11.EndOfMessage())
    if data:
        conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    head: h11.Response | None = None
    body = bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.InformationalResponse):
                # We never send Expect or Upgrade, so an interim response is a broken server.
                raise ApiProtocolError(f"unexpected informational status {event.status_code}")
            if isinstance(event, h11.Response):
                head = event
                _check_head(head, limits)
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > limits.max_body_bytes:
                    raise ApiProtocolError("response body exceeds the limit")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = tuple(
                    (name.decode("ascii"), value.decode("latin-1")) for name, value in head.headers
                )
                return Response(
                    head.status_code, head.reason.decode("latin-1"), headers, bytes(body)
                )
            else:  # ConnectionClosed or PAUSED cannot come before EndOfMessage
                raise ApiProtocolError(f"unexpected {type(event).__name__} in the response")
    except h11.ProtocolError as exc:
        raise ApiProtocolError(_reason(exc, head is not None, eof, limits)) from None


def _check_head(head: h11.Response, limits: HttpLimits) -> None:
    if len(head.headers) > limits.max_headers:
        raise ApiProtocolError(f"more than {limits.max_headers} response headers")
    names = [name for name, _ in head.headers]
    if b"transfer-encoding" in names:
        # Neither Firecracker nor cloud-hypervisor chunk; refusing keeps the limits simple.
        raise ApiProtocolError("transfer-encoding is not supported")
    if head.status_code in (204, 304):
        return
    for name, value in head.headers:
        # h11 checked it is digits and that all copies agree.
        if name == b"content-length" and int(value) > limits.max_body_bytes:
            raise ApiProtocolError(f"response body of {int(value)} bytes exceeds the limit")


def fault_message(body: bytes, limit: int = DEFAULT_HTTP_LIMITS.max_fault_chars) -> str:
    """The human message in an error body, whatever shape the API chose.

    Firecracker sends ``{"fault_message": "..."}``; cloud-hypervisor sends a
    JSON list of messages from outermost to root cause (older releases: plain
    text).  Anything else is shown as (shortened) text.
    """
    text = body.decode("utf-8", errors="replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if isinstance(value, dict) and isinstance(value.get("fault_message"), str):
        text = value["fault_message"]
    elif isinstance(value, list) and value and all(isinstance(x, str) for x in value):
        text = ": ".join(value)
    if not text:
        text = "(empty body)"
    return text if len(text) <= limit else text[:limit] + "..."


def _decode_json(resp: Response) -> Any:
    if not resp.body:
        return None
    try:
        return json.loads(resp.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiProtocolError(f"{resp.status} response body is not JSON") from None


__all__ = [
    "ApiError",
    "ApiLocalError",
    "ApiRemoteError",
    "ApiConnectError",
    "ApiTimeout",
    "ApiProtocolError",
    "ApiStatusError",
    "HttpLimits",
    "DEFAULT_HTTP_LIMITS",
    "_METHODS",
    "_PATH_RE",
    "Response",
    "build_request",
    "parse_response",
    "fault_message",
    "_decode_json",
]
