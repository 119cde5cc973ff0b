"""Canonical msgpack codec with hard limits (the bottom of the wire format).

Owns: turning values into canonical bytes (the same value always gives the
same bytes, whatever the dict order) and bytes back into values, with every
size and count that untrusted input controls bounded *while* decoding;
`WireError`, the one error every wire layer raises on bad input; `Limits`.

Must never: decode a length claim larger than the limits allow, accept
trailing bytes, ext types, non-string map keys or NaN, or raise anything but
`WireError` on bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from clanagent import limits as _sizes

__all__ = [
    "WireError",
    "Limits",
    "DEFAULT_LIMITS",
    "RECORD_LIMITS",
    "pack",
    "pack_plain",
    "unpack",
    "unpack_shallow",
]


class WireError(ValueError):
    """Bytes that are not a valid message; `reason` says why, for logs and counters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """Named bounds for everything that untrusted input controls.

    The defaults follow from the clan-size targets (clanagent.limits): a map
    or array holds the planned clan's machine table."""

    max_frame: int = _sizes.MAX_FRAME  # bytes in one encoded message
    max_depth: int = 16  # nesting of arrays/maps
    max_str: int = 64 * 1024  # bytes in one string
    max_bin: int = _sizes.MAX_FRAME  # bytes in one bin
    max_array: int = _sizes.MAX_TABLE  # items in one array
    max_map: int = _sizes.MAX_TABLE  # pairs in one map
    max_kind: int = 64  # UTF-8 bytes in a signed record's kind
    max_key: int = 256  # UTF-8 bytes in a signed record's key
    max_clan: int = 64  # bytes in a signed record's clan id


DEFAULT_LIMITS = Limits()
# What a signed record may hold: created and accepted under the same bounds,
# so no peer refuses a record another created.  At most MAX_RECORD_BYTES so
# that anti-entropy can always carry it (see clanagent.limits).
RECORD_LIMITS = Limits(max_frame=_sizes.MAX_RECORD_BYTES)


def _canonical(value: Any, depth: int = 0) -> Any:
    """Return `value` with every dict rebuilt in sorted-key order.

    msgpack writes dict items in iteration order, so sorting here is what makes
    the encoding canonical.  Keys must be str and are ordered by their UTF-8
    bytes (not by their encoded form, which would put shorter keys first):
    any fixed order makes the encoding canonical, and this one is the order
    everyone must use.  Python orders str by code point, which for valid
    strings is exactly UTF-8 byte order, so a plain sort does it.
    """
    t = type(value)
    # Exact-type fast paths first: this runs for every value we sign or send.
    if t is str or t is bytes or t is int or t is bool or value is None:
        return value
    if t is float:
        if value != value:
            raise WireError("NaN has no canonical encoding")
        return value
    if depth > 64:
        raise WireError("value nests too deep to encode")
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise WireError(f"map key must be str, not {type(k).__name__}")
        return {k: _canonical(value[k], depth + 1) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, depth + 1) for v in value]
    if isinstance(value, float):
        return _canonical(float(value), depth)
    if isinstance(value, (bool, int, str, bytes)):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise WireError(f"type {type(value).__name__} is not encodable")


def pack(value: Any) -> bytes:
    """Encode `value` canonically (sorted map keys, shortest ints, float64)."""
    try:
        return msgpack.packb(_canonical(value), use_bin_type=True, use_single_float=False)
    except WireError:
        raise
    except (OverflowError, ValueError, TypeError) as exc:
        raise WireError(f"cannot encode: {exc}") from None


def pack_plain(value: Any) -> bytes:
    """Encode a value that holds no maps (lists, ints, str, bytes, bool, None).

    Such values are canonical as they are, so the sorting walk of `pack` is
    skipped: for the many small protocol messages a node sends every second.
    The caller guarantees there is no map inside (a map would be written in
    insertion order); tests check that each caller's output equals `pack`'s.
    """
    try:
        return msgpack.packb(value, use_bin_type=True, use_single_float=False)
    except (OverflowError, ValueError, TypeError) as exc:
        raise WireError(f"cannot encode: {exc}") from None


def _reject_ext(code: int, data: bytes) -> Any:
    raise WireError(f"ext type {code} is not allowed")


def _check_depth(value: Any, limit: int, sorted_keys: bool = False) -> None:
    """Enforce the depth limit, str-only map keys and no NaN on a decoded value.

    With `sorted_keys`, also require every map's keys in canonical order
    (decoded dicts keep wire order, so this checks the bytes' order).

    The C decoder bounds nesting at 1024 itself, so this walk is bounded; it
    goes level by level (no per-item tuples) because it runs on every frame,
    and the decoder only ever produces exact list/dict/float types.
    """
    level = [value]
    depth = 0
    while level:
        depth += 1
        deeper: list[Any] = []
        for v in level:
            t = type(v)
            if t is list:
                if depth > limit:
                    raise WireError(f"nesting deeper than {limit}")
                deeper.extend(v)
            elif t is dict:
                if depth > limit:
                    raise WireError(f"nesting deeper than {limit}")
                for k in v:
                    # strict_map_key still lets bin keys through; we allow str only.
                    if type(k) is not str:
                        raise WireError(f"map key must be str, not {type(k).__name__}")
                if sorted_keys and len(v) > 1 and list(v) != sorted(v):
                    raise WireError("not canonical: map keys out of order")
                deeper.extend(v.values())
            elif t is float and v != v:
                raise WireError("NaN is not allowed")
        level = deeper


def unpack(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode exactly one value from `data` or raise `WireError`.

    Array and map length headers are checked against `limits` by the decoder
    before it allocates; a str/bin claim longer than the input is "truncated"
    and costs nothing either, since the whole frame is already in memory and
    bounded by `max_frame`.
    """
    return _unpack(data, limits, False)


def unpack_shallow(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """`unpack` without the nesting-depth and NaN walk.

    Every size and count limit still holds (the decoder checks them before it
    allocates, and its own stack stops at depth 1024), so memory is bounded
    by the frame.  Only for frames whose every part is then checked by a
    strict schema that accepts no deeper nesting (the gossip datagram's
    messages), where walking the whole value again would be wasted work.
    """
    return _unpack(data, limits, False, walk=False)


def _unpack(data: bytes, limits: Limits, sorted_keys: bool, *, walk: bool = True) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError("input is not bytes")
    if len(data) > limits.max_frame:
        raise WireError(f"frame of {len(data)} bytes exceeds limit {limits.max_frame}")
    if not data:
        raise WireError("empty input")
    try:
        # One-shot unpackb reads the caller's buffer in place (Unpacker.feed
        # would copy it) and is about twice as fast for small messages.
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_reject_ext,
            max_str_len=limits.max_str,
            max_bin_len=limits.max_bin,
            max_array_len=limits.max_array,
            max_map_len=limits.max_map,
            max_ext_len=0,
        )
    except WireError:
        raise
    except msgpack.ExtraData as exc:
        raise WireError(f"{len(exc.extra)} trailing bytes") from None
    except UnicodeDecodeError:
        raise WireError("string is not valid UTF-8") from None
    except ValueError as exc:
        if "incomplete input" in str(exc):
            raise WireError("truncated input") from None
        raise WireError(f"malformed msgpack: {exc or type(exc).__name__}") from None
    except (TypeError, msgpack.StackError) as exc:
        raise WireError(f"malformed msgpack: {exc or type(exc).__name__}") from None
    except Exception as exc:  # the C decoder has a few more; none may escape
        raise WireError(f"malformed msgpack: {type(exc).__name__}") from None
    if walk:
        _check_depth(value, limits.max_depth, sorted_keys)
    return value


def _tname(value: Any) -> str:
    return "nil" if value is None else type(value).__name__
