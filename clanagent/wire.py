"""Canonical msgpack codec with hard limits (core of the wire format).

Owns: turning values into canonical bytes (the same value always gives the
same bytes, whatever the dict order) and bytes back into values, with every
size and count that untrusted input controls bounded *while* decoding.

Also owns the two layers every part builds on:

* typed records (`Record`): frozen dataclasses whose wire form (a map of
  field name to value) is checked strictly against the type annotations;
* signed envelopes (`SignedRecord`): a header `{clan, kind, key, version,
  body}` packed canonically and signed with the origin's Ed25519 key.

Must never: decode a length claim larger than the limits allow, accept
trailing bytes, ext types, non-string map keys or NaN, accept a signed record
whose signature does not verify or whose bytes are not the one canonical
encoding of its content, or raise anything but `WireError` on bad input.
"""

from __future__ import annotations

import hashlib
import types
import typing
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Protocol, Self

import msgpack
import nacl.exceptions
import nacl.signing

from clanagent import limits as _sizes

__all__ = [
    "WireError",
    "Limits",
    "DEFAULT_LIMITS",
    "RECORD_LIMITS",
    "pack",
    "unpack",
    "Record",
    "record_type",
    "record_class",
    "NodeInfo",
    "Signer",
    "SignedRecord",
    "RECORD_SIGNATURE_DOMAIN",
    "MAX_VERSION",
    "MAX_RECORD_VERSION",
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


# ------------------------------------------------------------ typed records
#
# A record type is a frozen dataclass whose annotations *are* its schema.
# Each type is compiled once (lazily, so forward references resolve) into a
# pair of converter functions.  Converters raise _PathError, which collects
# the path on its way out (so a valid message never builds a path string)
# and becomes a WireError at the top.


class _PathError(Exception):
    def __init__(self, message: str) -> None:
        self.message = message
        self.segments: list[str] = []  # innermost first

    def reason(self, root: str) -> str:
        path = root + "".join(reversed(self.segments))
        path = path.removeprefix(".")
        return f"{path}: {self.message}" if path else self.message


def _tname(value: Any) -> str:
    return "nil" if value is None else type(value).__name__


_Conv = Callable[[Any], Any]

# Exact-type checks: bool is not an int, and an int is not a float (the
# canonical encoding of 1 and 1.0 differ, so accepting both would make two
# wire forms of one record).
_SCALARS: dict[Any, type] = {
    int: int,
    str: str,
    bytes: bytes,
    bool: bool,
    float: float,
    type(None): type(None),
    None: type(None),
}


def _scalar_conv(t: type) -> _Conv:
    name = "nil" if t is type(None) else t.__name__

    def conv(v: Any) -> Any:
        if type(v) is not t:
            raise _PathError(f"expected {name}, got {_tname(v)}")
        return v

    return conv


def _any_conv(v: Any) -> Any:
    # Wire values only: packing will reject anything else on the way out.
    return v


def _seq_conv(item: _Conv, out_type: type, in_types: tuple[type, ...], name: str) -> _Conv:
    def conv(v: Any) -> Any:
        if type(v) not in in_types:
            raise _PathError(f"expected {name}, got {_tname(v)}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _PathError as e:
                e.segments.append(f"[{i}]")
                raise
        return out if out_type is list else out_type(out)

    return conv


def _map_conv(item: _Conv) -> _Conv:
    def conv(v: Any) -> Any:
        if type(v) is not dict:
            raise _PathError(f"expected map, got {_tname(v)}")
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise _PathError(f"map key must be str, got {_tname(k)}")
            try:
                out[k] = item(x)
            except _PathError as e:
                e.segments.append(f"[{k!r}]")
                raise
        return out

    return conv


def _union_conv(alts: list[tuple[Any, _Conv]]) -> _Conv:
    nullable = any(a is type(None) for a, _ in alts)
    rest = [(a, c) for a, c in alts if a is not type(None)]
    if nullable and len(rest) == 1:
        # `T | None`: report T's own (possibly nested) error, not a vague union one.
        inner = rest[0][1]

        def opt(v: Any) -> Any:
            return None if v is None else inner(v)

        return opt
    names = " | ".join(_type_name(a) for a, _ in alts)

    def conv(v: Any) -> Any:
        for _, c in alts:
            try:
                return c(v)
            except _PathError:
                continue
        raise _PathError(f"expected {names}, got {_tname(v)}")

    return conv


def _type_name(t: Any) -> str:
    if t is type(None):
        return "nil"
    return getattr(t, "__name__", None) or str(t)


def _compile(t: Any, encode: bool) -> _Conv:
    """A converter for annotation `t`; decode direction if not `encode`."""
    if t is Any:
        return _any_conv
    if t in _SCALARS:
        return _scalar_conv(_SCALARS[t])
    if isinstance(t, type) and issubclass(t, Record):
        # Looked up at call time: allows recursive and not-yet-defined types.
        if encode:

            def enc(v: Any, cls: type[Record] = t) -> Any:
                if not isinstance(v, cls):
                    raise _PathError(f"expected {cls.__name__}, got {_tname(v)}")
                return _schema(type(v)).encode(v)

            return enc

        def dec(v: Any, cls: type[Record] = t) -> Any:
            return _schema(cls).decode(v)

        return dec
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is list and len(args) == 1:
        in_types = (list, tuple) if encode else (list,)
        return _seq_conv(_compile(args[0], encode), list, in_types, "array")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        in_types = (list, tuple) if encode else (list,)
        return _seq_conv(_compile(args[0], encode), list if encode else tuple, in_types, "array")
    if origin is dict and len(args) == 2 and args[0] is str:
        return _map_conv(_compile(args[1], encode))
    if origin in (typing.Union, types.UnionType):
        return _union_conv([(a, _compile(a, encode)) for a in args])
    raise TypeError(f"annotation {t!r} has no wire form")


class _Schema:
    __slots__ = ("cls", "names", "name_set", "dec", "enc")

    def __init__(self, cls: type[Record]) -> None:
        hints = typing.get_type_hints(cls)
        flds = [f for f in fields(cls) if f.init]  # type: ignore[arg-type]
        self.cls = cls
        self.names = tuple(f.name for f in flds)
        self.name_set = frozenset(self.names)
        self.dec = tuple((f.name, _compile(hints[f.name], False)) for f in flds)
        self.enc = tuple((f.name, _compile(hints[f.name], True)) for f in flds)

    def decode(self, v: Any) -> Record:
        if type(v) is not dict:
            raise _PathError(f"expected map, got {_tname(v)}")
        if len(v) != len(self.names) or v.keys() != self.name_set:
            extra = sorted(str(k) for k in v if k not in self.name_set)
            if extra:
                err = _PathError("unknown field")
                err.segments.append(f".{extra[0]}")
                raise err
            err = _PathError("missing field")
            err.segments.append(f".{sorted(self.name_set - v.keys())[0]}")
            raise err
        kwargs = {}
        for name, conv in self.dec:
            try:
                kwargs[name] = conv(v[name])
            except _PathError as e:
                e.segments.append(f".{name}")
                raise
        try:
            return self.cls(**kwargs)
        except WireError as exc:  # a constraint in __post_init__
            raise _PathError(exc.reason) from None
        except (ValueError, TypeError) as exc:
            raise _PathError(f"invalid {self.cls.__name__}: {exc}") from None

    def encode(self, v: Record) -> dict[str, Any]:
        out = {}
        for name, conv in self.enc:
            try:
                out[name] = conv(getattr(v, name))
            except _PathError as e:
                e.segments.append(f".{name}")
                raise
        return out


_SCHEMAS: dict[type, _Schema] = {}
_REGISTRY: dict[str, type[Record]] = {}


def _schema(cls: type[Record]) -> _Schema:
    s = _SCHEMAS.get(cls)
    if s is None:
        if not is_dataclass(cls):
            raise TypeError(f"{cls.__name__} is not a dataclass")
        s = _SCHEMAS[cls] = _Schema(cls)
    return s


class Record:
    """Base of typed records: frozen dataclasses checked strictly against their annotations.

    Supported annotations: int, str, bytes, bool, float, None, Any (any wire
    value), list[T], tuple[T, ...] (a wire array), dict[str, T], unions such
    as T | None, and nested Record types.  Types are exact: bool is not an
    int and int is not a float.  Field constraints go in `__post_init__`,
    raising WireError.  Top-level types carry `KIND` and are registered with
    `@record_type`; nested ones need neither.
    """

    __slots__ = ()
    KIND: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        """This record as a wire map; WireError naming the field if a value has the wrong type."""
        try:
            return _schema(type(self)).encode(self)
        except _PathError as e:
            raise WireError(e.reason("")) from None

    @classmethod
    def from_wire(cls, data: Any, *, path: str = "") -> Self:
        """Build a record from a decoded wire value; WireError naming the field path on any mismatch.

        `path` prefixes the reason, e.g. "body" gives "body.tags[2]: expected str".
        """
        try:
            return _schema(cls).decode(data)  # type: ignore[return-value]
        except _PathError as e:
            raise WireError(e.reason(path)) from None


def record_type(cls: type[Record]) -> type[Record]:
    """Register a frozen Record dataclass under its KIND (apply above @dataclass)."""
    if not (isinstance(cls, type) and issubclass(cls, Record)):
        raise TypeError("@record_type needs a Record subclass")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    kind = cls.__dict__.get("KIND")
    if not isinstance(kind, str) or not kind or len(kind.encode()) > DEFAULT_LIMITS.max_kind:
        raise TypeError(f"{cls.__name__}.KIND must be a non-empty str of at most 64 bytes")
    old = _REGISTRY.get(kind)
    # The same class seen again (a module reload) may re-register; another may not.
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"record kind {kind!r} is already {old.__module__}.{old.__qualname__}")
    _REGISTRY[kind] = cls
    return cls


def record_class(kind: str) -> type[Record]:
    """The record type registered for `kind`; WireError if there is none."""
    cls = _REGISTRY.get(kind)
    if cls is None:
        raise WireError(f"unknown record kind {kind!r}")
    return cls


@record_type
@dataclass(frozen=True, slots=True)
class NodeInfo(Record):
    """What a node says about itself: a display name, agent version and addresses."""

    KIND: ClassVar[str] = "node-info"
    name: str
    version: str
    addrs: list[str]


# ---------------------------------------------------------- signed records

# Signatures cover this prefix + payload, so a record signature can never be
# replayed as (or forged from) a signature made by another part of the system.
RECORD_SIGNATURE_DOMAIN = b"clanagent-record-v1\0"
MAX_VERSION = 2**63 - 1
# Records are created and accepted only below this version.  Versions count
# one per publish, so 2**53 never runs out (a million publishes a second for
# 285 years), leaves the rest of MAX_VERSION as margin, and is exact as a
# float for JSON consumers.  Decoding still admits up to MAX_VERSION (peers
# refuse such records by policy: counted, not a malformed envelope).
MAX_RECORD_VERSION = 2**53
_HEADER_KEYS = frozenset({"clan", "kind", "key", "version", "body"})
_ENV_SIGNER_HEAD = b"\x93\xc4\x20"  # fixarray(3), bin8(32)
_ENV_SIG_HEAD = b"\xc4\x40"  # bin8(64)
# The envelope alone: [signer, payload, signature], three bins in one frame.
_ENVELOPE_LIMITS = Limits(max_depth=1, max_str=0, max_array=3, max_map=0)


class Signer(Protocol):
    """What creating a record needs from an identity (clanagent.identity.Identity fits)."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def _bin_head(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _check_header(h: Any, limits: Limits) -> None:
    if type(h) is not dict:
        raise WireError(f"header: expected map, got {_tname(h)}")
    if h.keys() != _HEADER_KEYS:
        extra = sorted(str(k) for k in h if k not in _HEADER_KEYS)
        if extra:
            raise WireError(f"header.{extra[0]}: unknown field")
        raise WireError(f"header.{sorted(_HEADER_KEYS - h.keys())[0]}: missing field")
    clan, kind, key, version = h["clan"], h["kind"], h["key"], h["version"]
    if type(clan) is not bytes:
        raise WireError(f"header.clan: expected bytes, got {_tname(clan)}")
    if len(clan) > limits.max_clan:
        raise WireError(f"header.clan: {len(clan)} bytes exceeds limit {limits.max_clan}")
    if type(kind) is not str:
        raise WireError(f"header.kind: expected str, got {_tname(kind)}")
    if not kind:
        raise WireError("header.kind: empty")
    if len(kind) > limits.max_kind or len(kind.encode()) > limits.max_kind:
        raise WireError(f"header.kind: longer than {limits.max_kind} bytes")
    if type(key) is not str:
        raise WireError(f"header.key: expected str, got {_tname(key)}")
    # len(str) <= len(utf-8) always, so the cheap test decides most keys.
    if len(key) > limits.max_key or len(key.encode()) > limits.max_key:
        raise WireError(f"header.key: longer than {limits.max_key} bytes")
    if type(version) is not int:
        raise WireError(f"header.version: expected int, got {_tname(version)}")
    if not 1 <= version <= MAX_VERSION:
        raise WireError(f"header.version: {version} is outside 1..2**63-1")


@dataclass(frozen=True, slots=True, repr=False)
class SignedRecord:
    """A signed, canonical record: what crosses every machine boundary.

    The wire form is the msgpack array [signer, payload, signature]; payload
    is pack() of {clan, kind, key, version, body}; signature is Ed25519 by
    `signer` over RECORD_SIGNATURE_DOMAIN + payload.  The header is decoded
    and checked once at construction and exposed as attributes.

    Constructing one directly checks structure and canonical form but NOT the
    signature; untrusted bytes go through `decode` (which verifies).  `body`
    is the decoded value: treat it as read-only, it is shared by everyone who
    holds this record.
    """

    signer: bytes
    payload: bytes
    signature: bytes
    limits: InitVar[Limits] = RECORD_LIMITS
    clan: bytes = field(init=False, compare=False)
    kind: str = field(init=False, compare=False)
    key: str = field(init=False, compare=False)
    version: int = field(init=False, compare=False)
    body: Any = field(init=False, compare=False)
    size: int = field(init=False, compare=False)
    record_id: bytes = field(init=False, compare=False)

    def __post_init__(self, limits: Limits) -> None:
        signer, payload, signature = self.signer, self.payload, self.signature
        if type(signer) is not bytes or len(signer) != 32:
            raise WireError("signer: expected 32 bytes")
        if type(signature) is not bytes or len(signature) != 64:
            raise WireError("signature: expected 64 bytes")
        if type(payload) is not bytes:
            raise WireError("payload: expected bytes")
        # Canonical form is what makes the signed bytes a function of the
        # content: without it the same record could travel as many byte
        # strings (other int widths, float32, key orders, duplicate keys).
        # Key order is checked while decoding; re-packing the decoded value
        # in that order must then give the payload back byte for byte.
        header = _unpack(payload, limits, True)
        _check_header(header, limits)
        if msgpack.packb(header, use_bin_type=True, use_single_float=False) != payload:
            raise WireError("payload is not canonical")
        bin_head = _bin_head(len(payload))
        size = len(_ENV_SIGNER_HEAD) + 32 + len(bin_head) + len(payload) + len(_ENV_SIG_HEAD) + 64
        if size > limits.max_frame:
            raise WireError(f"record of {size} bytes exceeds limit {limits.max_frame}")
        # The hash of exactly encode()'s bytes, fed in pieces to avoid a copy.
        h = hashlib.blake2b(digest_size=32)
        for part in (_ENV_SIGNER_HEAD, signer, bin_head, payload, _ENV_SIG_HEAD, signature):
            h.update(part)
        setattr_ = object.__setattr__
        setattr_(self, "clan", header["clan"])
        setattr_(self, "kind", header["kind"])
        setattr_(self, "key", header["key"])
        setattr_(self, "version", header["version"])
        setattr_(self, "body", header["body"])
        setattr_(self, "size", size)
        setattr_(self, "record_id", h.digest())

    @property
    def origin(self) -> bytes:
        """The Ed25519 public key of the node that made (signed) this record."""
        return self.signer

    @classmethod
    def create(
        cls,
        identity: Signer,
        kind: str,
        key: str,
        version: int,
        body: Any,
        clan: bytes = b"",
    ) -> SignedRecord:
        """Sign a new record; a Record body is converted with to_wire().

        Applies the same checks (and RECORD_LIMITS) as `decode`, so we never
        emit a record our peers would drop.
        """
        if isinstance(body, Record):
            body_kind = getattr(type(body), "KIND", None)
            if body_kind is not None and body_kind != kind:
                raise WireError(f"body is a {body_kind!r} record, not {kind!r}")
            body = body.to_wire()
        header = {"clan": clan, "kind": kind, "key": key, "version": version, "body": body}
        _check_header(header, DEFAULT_LIMITS)
        if version >= MAX_RECORD_VERSION:
            raise WireError(f"header.version: {version} is at or over 2**53")
        payload = pack(header)
        signature = identity.sign(RECORD_SIGNATURE_DOMAIN + payload)
        return cls(bytes(identity.public_key), payload, signature)

    def encode(self) -> bytes:
        """The canonical wire bytes: pack([signer, payload, signature])."""
        return pack([self.signer, self.payload, self.signature])

    @classmethod
    def decode(
        cls, data: bytes, limits: Limits = RECORD_LIMITS, *, verify: bool = True
    ) -> SignedRecord:
        """Parse and (unless verify=False, for data we stored after verifying) verify a record.

        Cheap checks run first and the signature last, so garbage costs
        little.  Every failure is a WireError.
        """
        env = unpack(data, limits)
        if type(env) is not list or len(env) != 3:
            raise WireError("envelope: expected an array of 3")
        record = cls(env[0], env[1], env[2], limits)
        # All three items decoded to their exact sizes and nothing trailed, so
        # the input is canonical exactly when no header was wider than needed,
        # i.e. when its length is the canonical length.
        if len(data) != record.size:
            raise WireError("envelope is not canonical")
        if verify:
            record.verify()
        return record

    @staticmethod
    def signed_by(data: bytes) -> bytes | None:
        """The signer of `data` when its envelope carries a payload that this
        signer's signature covers, whatever the payload holds; else None.

        For telling a record refused for its signed content (over our limits,
        not canonical: the origin's doing, a relay only forwarded it) from
        bytes that a sender forged or broke (that sender's doing).  Costs one
        signature check, so callers remember the answer by record id.
        """
        try:
            env = unpack(data, _ENVELOPE_LIMITS)
        except WireError:
            return None
        if type(env) is not list or len(env) != 3:
            return None
        signer, payload, signature = env
        if type(signer) is not bytes or type(payload) is not bytes or type(signature) is not bytes:
            return None
        if len(signer) != 32 or len(signature) != 64:
            return None
        try:
            nacl.signing.VerifyKey(signer).verify(RECORD_SIGNATURE_DOMAIN + payload, signature)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return None
        return signer

    def verify(self) -> None:
        """Check the signature (raises WireError("bad signature"))."""
        try:
            nacl.signing.VerifyKey(self.signer).verify(
                RECORD_SIGNATURE_DOMAIN + self.payload, self.signature
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            # BadSignatureError is a CryptoError; libsodium also lands here
            # for small-order or non-canonical keys and non-canonical S.
            raise WireError("bad signature") from None

    def parse_body(self, cls: type[Record] | None = None) -> Record:
        """The body as a typed record (by `cls`, or the type registered for `kind`)."""
        if cls is None:
            cls = record_class(self.kind)
        elif getattr(cls, "KIND", None) != self.kind:
            raise WireError(f"record kind {self.kind!r} is not {cls.__name__}")
        return cls.from_wire(self.body, path="body")

    def __repr__(self) -> str:
        return (
            f"SignedRecord(kind={self.kind!r}, key={self.key!r}, version={self.version}, "
            f"origin={self.signer.hex()[:16]}, size={self.size})"
        )
