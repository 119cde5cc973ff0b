"""The control socket's wire protocol, sans-IO.

Owns: framing (a 4-byte big-endian length, then one canonical msgpack map),
the request / reply / event shapes and their checks, and the error codes.
Must never: trust a length before checking it against the limit, or let a
malformed request do more than earn an error reply.

Request:  {"id": int, "v": int, "method": str, "params": map}
Reply:    {"id": int, "ok": true, "result": any}
          {"id": int, "ok": false, "error": {"code": str, "message": str}}
Stream:   {"id": int, "event": any} ... then {"id": int, "end": true}
Upgrade:  {"id": int, "ok": true, "result": {"attached": true}}, then raw bytes
          both ways until either side closes (`vm.console`).  The client
          sends nothing after such a request until the reply has arrived.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from ..wire import Limits, WireError, pack, unpack

__all__ = [
    "API_VERSION",
    "MIN_API_VERSION",
    "ControlError",
    "RequestError",
    "ErrorCode",
    "FrameDecoder",
    "Request",
    "encode_frame",
    "parse_request",
    "reply_ok",
    "reply_error",
    "stream_event",
    "stream_end",
]

API_VERSION = 1
MIN_API_VERSION = 1
HEADER = struct.Struct(">I")


class ErrorCode:
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    UNKNOWN_METHOD = "unknown_method"
    UNSUPPORTED_VERSION = "unsupported_version"
    PERMISSION_DENIED = "permission_denied"
    INVALID_PARAMS = "invalid_params"
    UNAVAILABLE = "unavailable"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class ControlError(Exception):
    """An error with a code that travels to the client as an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    version: int
    method: str
    params: dict[str, Any] = field(default_factory=dict)


def encode_frame(message: dict[str, Any]) -> bytes:
    body = pack(message)
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Split a byte stream into frames; a frame over `max_frame` is fatal.

    After an oversized length the stream cannot be resynchronised, so the
    decoder goes into a sticky error state and the connection must close.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self.error: ControlError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.error:
            raise self.error
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                self.error = ControlError(
                    ErrorCode.TOO_LARGE,
                    f"request of {length} bytes exceeds the limit of {self.max_frame}",
                )
                raise self.error
            if len(self._buf) < HEADER.size + length:
                break
            frames.append(bytes(self._buf[HEADER.size : HEADER.size + length]))
            del self._buf[: HEADER.size + length]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


def parse_request(frame: bytes, limits: Limits) -> Request:
    """Decode one request frame, or raise ControlError (with the id if known)."""
    try:
        msg = unpack(frame, limits)
    except WireError as exc:
        raise ControlError(ErrorCode.BAD_REQUEST, f"malformed request: {exc.reason}") from None
    if not isinstance(msg, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "request must be a map")
    rid = msg.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 2**63:
        raise ControlError(ErrorCode.BAD_REQUEST, "request needs an integer 'id' >= 0")
    unknown = set(msg) - {"id", "v", "method", "params"}
    if unknown:
        raise _with_id(rid, ErrorCode.BAD_REQUEST, f"unknown request field(s): {sorted(unknown)}")
    version = msg.get("v", API_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise _with_id(rid, ErrorCode.BAD_REQUEST, "'v' must be an integer")
    method = msg.get("method")
    if not isinstance(method, str) or not method:
        raise _with_id(rid, ErrorCode.BAD_REQUEST, "request needs a string 'method'")
    params = msg.get("params", {})
    if not isinstance(params, dict):
        raise _with_id(rid, ErrorCode.BAD_REQUEST, "'params' must be a map")
    return Request(rid, version, method, params)


class RequestError(ControlError):
    def __init__(self, request_id: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.request_id = request_id


def _with_id(rid: int, code: str, message: str) -> RequestError:
    return RequestError(rid, code, message)


def reply_ok(rid: int, result: Any) -> dict[str, Any]:
    return {"id": rid, "ok": True, "result": result}


def reply_error(rid: int | None, code: str, message: str) -> dict[str, Any]:
    # id -1 when the request was too broken to carry one.
    return {
        "id": -1 if rid is None else rid,
        "ok": False,
        "error": {"code": code, "message": message},
    }


def stream_event(rid: int, event: Any) -> dict[str, Any]:
    return {"id": rid, "event": event}


def stream_end(rid: int) -> dict[str, Any]:
    return {"id": rid, "end": True}
