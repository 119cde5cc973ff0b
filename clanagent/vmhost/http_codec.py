"""HTTP/1.1 requests and responses for local VMM API sockets, sans-IO.

Owns: building a request, parsing a response within the limits (no chunked
bodies, bounded headers and body), and the error types and the API fault
message of each product.  Must never: import trio or do any I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

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


_STATUS_RE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: ([\t\x20-\x7e]*))?")


_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z\-]+")


_VALUE_RE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


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
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Accept: application/json"]
    payload = b""
    if body is not None:
        try:
            payload = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise ApiLocalError(f"request body is not JSON: {e}") from None
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    elif method != "GET":
        head.append("Content-Length: 0")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + payload


def parse_response(
    data: bytes, *, eof: bool, limits: HttpLimits = DEFAULT_HTTP_LIMITS
) -> Response | None:
    """Parse one response from everything received so far.

    Returns None while more bytes are needed (and ``eof`` is False); raises
    ApiProtocolError for anything malformed, oversized, or cut short at EOF.
    Bytes after a Content-Length body are ignored: we send one request per
    connection, so nothing legitimate can follow.
    """
    # Search only inside the limit, so a header block that never ends costs us nothing extra.
    end = data.find(b"\r\n\r\n", 0, limits.max_header_bytes)
    if end < 0:
        if len(data) >= limits.max_header_bytes:
            raise ApiProtocolError(f"response headers exceed {limits.max_header_bytes} bytes")
        if eof:
            raise ApiProtocolError("connection closed before the response headers ended")
        return None
    lines = data[:end].split(b"\r\n")
    m = _STATUS_RE.fullmatch(lines[0])
    if m is None:
        raise ApiProtocolError(f"bad status line {lines[0][:80]!r}")
    status = int(m.group(1))
    if status < 200:
        # We never send Expect or Upgrade, so an interim response is a broken server.
        raise ApiProtocolError(f"unexpected informational status {status}")
    reason = (m.group(2) or b"").decode("ascii")
    if len(lines) - 1 > limits.max_headers:
        raise ApiProtocolError(f"more than {limits.max_headers} response headers")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise ApiProtocolError(f"bad header line {line[:80]!r}")
        value = value.strip(b" \t")
        if not _VALUE_RE.fullmatch(value):
            raise ApiProtocolError(f"bad header value for {name[:40]!r}")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    if any(n == "transfer-encoding" for n, _ in headers):
        # Neither Firecracker nor cloud-hypervisor chunk; refusing keeps the parser small.
        raise ApiProtocolError("transfer-encoding is not supported")
    lengths = {v for n, v in headers if n == "content-length"}
    rest = data[end + 4 :]
    if status in (204, 304):
        return Response(status, reason, tuple(headers), b"")
    if len(lengths) > 1:
        raise ApiProtocolError("conflicting content-length headers")
    if lengths:
        (text,) = lengths
        if not text.isascii() or not text.isdigit() or len(text) > 12:
            raise ApiProtocolError(f"bad content-length {text[:20]!r}")
        length = int(text)
        if length > limits.max_body_bytes:
            raise ApiProtocolError(f"response body of {length} bytes exceeds the limit")
        if len(rest) < length:
            if eof:
                raise ApiProtocolError("connection closed before the response body ended")
            return None
        return Response(status, reason, tuple(headers), rest[:length])
    # No length: the body runs to EOF (HTTP/1.1 allows it when the server closes).
    if len(rest) > limits.max_body_bytes:
        raise ApiProtocolError("response body exceeds the limit")
    if not eof:
        return None
    return Response(status, reason, tuple(headers), rest)


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
    "_STATUS_RE",
    "_TOKEN_RE",
    "_VALUE_RE",
    "Response",
    "build_request",
    "parse_response",
    "fault_message",
    "_decode_json",
]
