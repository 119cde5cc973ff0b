"""The browser's JSON messages, translated to and from the control protocol, sans-IO.

Owns: decoding one WebSocket text message into an `Auth`, a control
`Request` (checked by the control socket's own `parse_request`, with the
same limits, after a round trip through the canonical msgpack codec) or a
`Cancel`; and encoding replies, stream events and errors as JSON, turning
bytes into hex in exactly one place (`to_json`).  Must never: raise
anything but `ControlError` on bad input, or accept a value the control
socket would refuse (NaN, huge integers, deep nesting, unknown fields).

Browser -> console:
    {"auth": SESSION}                                  first message
    {"id": int, "method": str, "params": {...}, "v": int}
    {"id": int, "cancel": true}                        ends a stream
Console -> browser: the control protocol's shapes (`protocol.reply_ok` ...),
as JSON: {"id", "ok", "result"}, {"id", "ok": false, "error": {code, message}},
{"id", "event"}, {"id", "end": true}.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..control.protocol import (
    API_VERSION,
    ControlError,
    ErrorCode,
    Request,
    RequestError,
    parse_request,
)
from ..wire import Limits, WireError, pack

__all__ = ["Auth", "Cancel", "decode_message", "to_json", "encode"]


@dataclass(frozen=True, slots=True)
class Auth:
    session: str


@dataclass(frozen=True, slots=True)
class Cancel:
    id: int


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


def decode_message(text: str | bytes, limits: Limits) -> Auth | Cancel | Request:
    """One message from the browser; ControlError (RequestError when the id is known)."""
    size = len(text.encode() if isinstance(text, str) else text)
    if size > limits.max_frame:
        raise ControlError(
            ErrorCode.TOO_LARGE,
            f"message of {size} bytes exceeds the limit of {limits.max_frame}",
        )
    try:
        msg = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except (ValueError, RecursionError) as exc:
        raise ControlError(ErrorCode.BAD_REQUEST, f"malformed JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ControlError(ErrorCode.BAD_REQUEST, "a message must be a JSON object")
    if "auth" in msg:
        if set(msg) != {"auth"} or not isinstance(msg["auth"], str):
            raise ControlError(ErrorCode.BAD_REQUEST, 'an auth message is {"auth": SESSION}')
        return Auth(msg["auth"])
    if "cancel" in msg:
        rid = msg.get("id")
        if set(msg) != {"id", "cancel"} or msg["cancel"] is not True or type(rid) is not int:
            raise ControlError(
                ErrorCode.BAD_REQUEST, 'a cancel message is {"id": N, "cancel": true}'
            )
        return Cancel(rid)
    rid = msg.get("id")
    known_id = rid if type(rid) is int and 0 <= rid < 2**63 else None
    unknown = set(msg) - {"id", "v", "method", "params"}
    if unknown:
        err = f"unknown message field(s): {sorted(unknown)}"
        if known_id is None:
            raise ControlError(ErrorCode.BAD_REQUEST, err)
        raise RequestError(known_id, ErrorCode.BAD_REQUEST, err)
    request = {"id": rid, "v": msg.get("v", API_VERSION), "method": msg.get("method")}
    request["params"] = msg.get("params", {})
    # The same bytes the control socket would have received: the same checks apply.
    try:
        frame = pack(request)
    except WireError as exc:
        err = f"malformed request: {exc.reason}"
        if known_id is None:
            raise ControlError(ErrorCode.BAD_REQUEST, err) from None
        raise RequestError(known_id, ErrorCode.BAD_REQUEST, err) from None
    if len(frame) > limits.max_frame:
        raise ControlError(ErrorCode.TOO_LARGE, "request exceeds the size limit")
    return parse_request(frame, limits)


def to_json(value: Any, depth: int = 0) -> Any:
    """Plain JSON values: bytes become lowercase hex (the only place that happens)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if depth > 64:
        raise ValueError("value nests too deep for JSON")
    if isinstance(value, dict):
        return {str(k): to_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(to_json(v, depth + 1) for v in value)
    if hasattr(value, "__dict__"):
        return to_json(vars(value), depth + 1)
    return str(value)


def encode(message: dict[str, Any]) -> str:
    return json.dumps(to_json(message), separators=(",", ":"), allow_nan=False)
