"""Typed records: frozen dataclasses whose annotations are their wire schema.

Owns: compiling a `Record` type's annotations (once, lazily) into strict
converters between the wire form (a map of field name to value) and the
dataclass, the registry of record kinds (`record_type`, `record_class`), and
the one record type every node speaks (`NodeInfo`).  This is the one
validation engine for record bodies: a body is valid when its kind's Record
type decodes it (and its `__post_init__` accepts the values).

Must never: coerce a value to another type (bool is not an int, an int is
not a float), accept an unknown or missing field, or raise anything but
`WireError` on a bad wire value.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar, Self

from .codec import DEFAULT_LIMITS, WireError, _tname

__all__ = ["Record", "record_type", "record_class", "NodeInfo"]


# How it works:
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
