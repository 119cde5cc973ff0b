"""The console handshake's framing, sans-IO: one length-prefixed msgpack map.

Owns: encoding a hello or answer frame and reading exactly one frame from a
byte stream, keeping what follows it (console bytes) for the caller.  The
trio side is `attach.py`.  Must never: do I/O, or accept a frame over
`MAX_FRAME` bytes or one that is not a map.
"""

from __future__ import annotations

import struct
from typing import Any

from ..wire import Limits, WireError, pack, unpack

__all__ = ["MAX_FRAME", "encode_frame", "FrameReader"]

MAX_FRAME = 4096
_HEADER = struct.Struct(">I")
_LIMITS = Limits(
    max_frame=MAX_FRAME,
    max_depth=4,
    max_str=MAX_FRAME,
    max_bin=MAX_FRAME,
    max_array=16,
    max_map=16,
)


def encode_frame(body: dict[str, Any]) -> bytes:
    data = pack(body)
    if len(data) > MAX_FRAME:
        raise ValueError(f"console frame of {len(data)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(data)) + data


class FrameReader:
    """Reads exactly one handshake frame; what follows it is kept as `rest`."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> dict[str, Any] | None:
        """The frame's map once complete, else None; WireError on bad input."""
        self._buf += data
        if len(self._buf) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buf)
        if length > MAX_FRAME:
            raise WireError(f"console handshake of {length} bytes exceeds {MAX_FRAME}")
        if len(self._buf) < _HEADER.size + length:
            return None
        body = unpack(bytes(self._buf[_HEADER.size : _HEADER.size + length]), _LIMITS)
        del self._buf[: _HEADER.size + length]
        if not isinstance(body, dict):
            raise WireError("console handshake: expected a map")
        return body

    @property
    def rest(self) -> bytes:
        return bytes(self._buf)
