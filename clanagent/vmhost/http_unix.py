"""A tiny HTTP/1.1 JSON client over a unix socket, for VMM control APIs.

Owns: one request per connection to a local VMM API socket (Firecracker's
``--api-sock``, cloud-hypervisor's ``--api-socket``), reading and
writing the bytes with timeouts and limits, in trio (the I/O-free request
builder and response parser live in `http_codec.py`, re-exported here), and the mapping of what can
go wrong onto :class:`ApiError` kinds: our misuse (:class:`ApiLocalError`),
nobody listening (:class:`ApiConnectError`), a server that does not answer in
time (:class:`ApiTimeout`), a malformed answer (:class:`ApiProtocolError`) and
a non-2xx status carrying the API's own fault message (:class:`ApiStatusError`).

Must never: read more than the configured limits from the socket, wait longer
than the timeout, let a malformed response escape as anything but
``ApiProtocolError``, follow redirects, or speak to anything but a unix socket.
The parser imports no trio; only :func:`request` does I/O.
"""

from __future__ import annotations

from os import PathLike
from typing import Any

import trio

from .http_codec import (  # noqa: F401 (re-exported: the I/O-free core)
    _METHODS,
    _PATH_RE,
    DEFAULT_HTTP_LIMITS,
    ApiConnectError,
    ApiError,
    ApiLocalError,
    ApiProtocolError,
    ApiRemoteError,
    ApiStatusError,
    ApiTimeout,
    HttpLimits,
    Response,
    _decode_json,
    build_request,
    fault_message,
    parse_response,
)

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
    "Response",
    "build_request",
    "parse_response",
    "fault_message",
    "request",
]


async def request(
    socket_path: str | PathLike[str],
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 5.0,
    limits: HttpLimits = DEFAULT_HTTP_LIMITS,
) -> tuple[int, Any]:
    """Send one request and return ``(status, decoded JSON or None)`` for a 2xx.

    Raises ApiStatusError (with the API's fault message) for any other status,
    and another ApiError kind for everything else; never anything but ApiError.
    """
    raw = build_request(method, path, body)
    with trio.move_on_after(timeout) as scope:
        resp = await _exchange(socket_path, raw, limits)
    if scope.cancelled_caught:
        raise ApiTimeout(f"{method} {path}: no response within {timeout:g}s")
    if not 200 <= resp.status < 300:
        raise ApiStatusError(
            method, path, resp.status, fault_message(resp.body, limits.max_fault_chars)
        )
    return resp.status, _decode_json(resp)


async def _exchange(socket_path: str | PathLike[str], raw: bytes, limits: HttpLimits) -> Response:
    try:
        stream = await trio.open_unix_socket(socket_path)
    except OSError as e:
        raise ApiConnectError(f"cannot connect to {socket_path}: {e.strerror or e}") from None
    async with stream:
        try:
            await stream.send_all(raw)
        except (trio.BrokenResourceError, OSError):
            raise ApiConnectError(f"connection to {socket_path} broke while sending") from None
        buf = bytearray()
        cap = limits.max_header_bytes + limits.max_body_bytes
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except (trio.BrokenResourceError, OSError):
                # A reset after a full response still counts: parse what we have.
                chunk = b""
            buf += chunk
            resp = parse_response(bytes(buf), eof=not chunk, limits=limits)
            if resp is not None:
                return resp
            if len(buf) > cap:
                raise ApiProtocolError("response exceeds the size limits")
