"""Typed records: frozen dataclasses whose annotations are their wire schema.

Owns: compiling a `Record` type's annotations (once, lazily) into strict
converters between the wire form (a map of field name to value, or an array
of the values for `WIRE_ARRAY` types) and the dataclass, with the bounds
`Range` and `Size`; `CheckedRecord`, checked when built as well as when
decoded; the registry of record kinds (`record_type`, `record_class`), and
the one record type every node speaks (`NodeInfo`).  This is the one
validation engine for record bodies and protocol messages: a body is valid
when its kind's Record type decodes it (and its `__post_init__` accepts the
values); a membership message when its CheckedRecord type does.

Must never: coerce a value to another type (bool is not an int, an int is
not a float), accept an unknown or missing field, or raise anything but
`WireError` on a bad wire value.
"""

from __future__ import annotations

import enum
import operator
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, ClassVar, Self

from .codec import DEFAULT_LIMITS, WireError, _tname

__all__ = ["Record", "CheckedRecord", "Range", "Size", "record_type", "record_class", "NodeInfo"]


@dataclass(frozen=True, slots=True)
class Range:
    """Inclusive bounds of an int field's value: `Annotated[int, Range(0, 2**32 - 1)]`."""

    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class Size:
    """Inclusive bounds of the length of a str (characters), bytes, array or
    map field: `Annotated[str, Size(1, 256)]`."""

    lo: int
    hi: int


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


def _bounded_scalar_conv(t: type, bound: Range | Size) -> _Conv:
    """A scalar's exact type and its bounds in one step (these run on every field)."""
    name = t.__name__
    lo, hi = bound.lo, bound.hi
    if isinstance(bound, Range):
        if t is not int:
            raise TypeError(f"Range applies to int, not {name}")

        def in_range(v: Any) -> Any:
            if type(v) is not int:
                raise _PathError(f"expected int, got {_tname(v)}")
            if not lo <= v <= hi:
                raise _PathError(f"{v} is outside {lo}..{hi}")
            return v

        return in_range
    if t is not str and t is not bytes:
        raise TypeError(f"Size applies to str, bytes, arrays and maps, not {name}")

    def sized(v: Any) -> Any:
        if type(v) is not t:
            raise _PathError(f"expected {name}, got {_tname(v)}")
        if not lo <= len(v) <= hi:
            raise _PathError(f"length {len(v)} is outside {lo}..{hi}")
        return v

    return sized


def _enum_conv(t: type[enum.IntEnum], mode: str) -> _Conv:
    """An IntEnum field: an int on the wire, a member in the record."""
    members = t._value2member_map_
    if mode == _DECODE:

        def dec(v: Any) -> Any:
            if type(v) is not int:
                raise _PathError(f"expected int, got {_tname(v)}")
            m = members.get(v)
            if m is None:
                raise _PathError(f"{v} is not a {t.__name__}")
            return m

        return dec

    def enc(v: Any) -> Any:
        if not isinstance(v, t):
            raise _PathError(f"expected {t.__name__}, got {_tname(v)}")
        return int(v)

    return enc


def _any_conv(v: Any) -> Any:
    # Wire values only: packing will reject anything else on the way out.
    return v


def _seq_conv(
    item: _Conv, out_type: type, in_types: tuple[type, ...], name: str, size: Size | None = None
) -> _Conv:
    lo, hi = (size.lo, size.hi) if size is not None else (0, -1)

    def conv(v: Any) -> Any:
        if type(v) not in in_types:
            raise _PathError(f"expected {name}, got {_tname(v)}")
        if hi >= 0 and not lo <= len(v) <= hi:
            raise _PathError(f"{len(v)} items, not {lo}..{hi}")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _PathError as e:
                e.segments.append(f"[{i}]")
                raise
        return out if out_type is list else out_type(out)

    return conv


def _map_conv(item: _Conv, size: Size | None = None) -> _Conv:
    lo, hi = (size.lo, size.hi) if size is not None else (0, -1)

    def conv(v: Any) -> Any:
        if type(v) is not dict:
            raise _PathError(f"expected map, got {_tname(v)}")
        if hi >= 0 and not lo <= len(v) <= hi:
            raise _PathError(f"{len(v)} entries, not {lo}..{hi}")
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


# Converter directions: wire value -> field value, field value -> wire
# value, and a check of a field value (a CheckedRecord being built).
_DECODE, _ENCODE, _CHECK = "decode", "encode", "check"


def _compile(t: Any, mode: str) -> _Conv:
    """A converter for annotation `t` in direction `mode`."""
    if t is Any:
        return _any_conv
    if t in _SCALARS:
        return _scalar_conv(_SCALARS[t])
    if isinstance(t, type) and issubclass(t, Record):
        # Looked up at call time: allows recursive and not-yet-defined types.
        if mode == _DECODE:

            def dec(v: Any, cls: type[Record] = t) -> Any:
                return _schema(cls).decode(v)

            return dec
        if mode == _CHECK:

            def is_one(v: Any, cls: type[Record] = t) -> Any:
                # A CheckedRecord was checked when it was built.
                if not isinstance(v, cls):
                    raise _PathError(f"expected {cls.__name__}, got {_tname(v)}")
                return v

            return is_one

        def enc(v: Any, cls: type[Record] = t) -> Any:
            if not isinstance(v, cls):
                raise _PathError(f"expected {cls.__name__}, got {_tname(v)}")
            return _schema(type(v)).encode(v)

        return enc
    if isinstance(t, type) and issubclass(t, enum.IntEnum):
        return _enum_conv(t, mode)
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    size = None
    if origin is typing.Annotated:
        base, *marks = t.__origin__, *t.__metadata__
        bounds = [m for m in marks if isinstance(m, (Range, Size))]
        if len(bounds) != 1:
            raise TypeError(f"annotation {t!r}: expected one Range or Size")
        if base in _SCALARS:
            return _bounded_scalar_conv(_SCALARS[base], bounds[0])
        if not isinstance(bounds[0], Size):
            raise TypeError(f"annotation {t!r}: Range applies to int only")
        size = bounds[0]
        origin, args = typing.get_origin(base), typing.get_args(base)
        if origin not in (list, tuple, dict):
            raise TypeError(f"annotation {t!r}: Size applies to str, bytes, arrays and maps")
    wire_in = (list, tuple) if mode == _ENCODE else (list,)
    if origin is list and len(args) == 1:
        in_types = (list,) if mode == _CHECK else wire_in
        return _seq_conv(_compile(args[0], mode), list, in_types, "array", size)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        in_types = (tuple,) if mode == _CHECK else wire_in
        out_type = list if mode == _ENCODE else tuple
        return _seq_conv(_compile(args[0], mode), out_type, in_types, "array", size)
    if origin is dict and len(args) == 2 and args[0] is str:
        return _map_conv(_compile(args[1], mode), size)
    if origin in (typing.Union, types.UnionType):
        return _union_conv([(a, _compile(a, mode)) for a in args])
    raise TypeError(f"annotation {t!r} has no wire form")


def _wire_ready(t: Any) -> bool:
    """True when a checked value of annotation `t` is its own wire form."""
    if typing.get_origin(t) is typing.Annotated:
        t = t.__origin__
    if t is Any or t in _SCALARS:
        return True
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return all(_wire_ready(a) for a in typing.get_args(t))
    return False


def _array_decoder(cls: type, names: tuple[str, ...], convs: tuple[_Conv, ...]) -> _Conv:
    """A decoder for a CheckedRecord in array form, generated for its fields
    (as dataclasses generates __init__): no loop, no per-field bookkeeping,
    since every membership message goes through one."""
    n = len(names)
    lines = [
        "def decode(v):",
        "    if type(v) is not list:",
        "        raise _PathError(f'expected array, got {_tname(v)}')",
        f"    if len(v) != {n}:",
        f"        raise _PathError(f'expected an array of {n}, got {{len(v)}}')",
        "    obj = new(cls)",
        "    i = 0",
        "    try:",
    ]
    for i, name in enumerate(names):
        lines.append(f"        set_(obj, {name!r}, c{i}(v[{i}]))")
        lines.append(f"        i = {i + 1}")
    lines += [
        "    except _PathError as e:",
        "        e.segments.append('.' + names[i])",
        "        raise",
        "    return obj",
    ]
    env: dict[str, Any] = {
        "_PathError": _PathError,
        "_tname": _tname,
        "new": object.__new__,
        "set_": object.__setattr__,
        "cls": cls,
        "names": names,
    }
    env.update({f"c{i}": c for i, c in enumerate(convs)})
    exec("\n".join(lines), env)  # noqa: S102 -- our own text, built from field names
    return env["decode"]  # type: ignore[no-any-return]


class _Schema:
    __slots__ = (
        "cls",
        "names",
        "name_set",
        "dec",
        "enc",
        "chk",
        "array",
        "checked",
        "fast_decode",
        "getter",
        "trusted_enc",
    )

    def __init__(self, cls: type[Record]) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        flds = [f for f in fields(cls) if f.init]  # type: ignore[arg-type]
        self.cls = cls
        self.names = tuple(f.name for f in flds)
        self.name_set = frozenset(self.names)
        self.array = bool(getattr(cls, "WIRE_ARRAY", False))
        self.checked = issubclass(cls, CheckedRecord)
        if self.checked and cls.__post_init__ is not CheckedRecord.__post_init__:
            # Decoding builds it without __init__ (its fields are checked
            # while converting), so a rule elsewhere would be skipped.
            raise TypeError(f"{cls.__name__}: a CheckedRecord keeps its rules in its annotations")
        self.dec = tuple((f.name, _compile(hints[f.name], _DECODE)) for f in flds)
        self.enc = tuple((f.name, _compile(hints[f.name], _ENCODE)) for f in flds)
        self.chk = (
            tuple((f.name, _compile(hints[f.name], _CHECK)) for f in flds) if self.checked else ()
        )
        # A CheckedRecord is valid once built: encoding it only converts the
        # fields that are not their own wire form (nested records, enums, tuples).
        self.fast_decode: _Conv | None = None
        self.getter: Callable[[Any], Any] | None = None
        self.trusted_enc: tuple[_Conv | None, ...] = ()
        if self.checked:
            if self.array:
                convs = tuple(c for _, c in self.dec)
                self.fast_decode = _array_decoder(cls, self.names, convs)
            if self.names:
                getter = operator.attrgetter(*self.names)
                one = len(self.names) == 1
                self.getter = (lambda v: (getter(v),)) if one else getter
            trusted = tuple(
                None if _wire_ready(hints[f.name]) else conv
                for f, (_, conv) in zip(flds, self.enc, strict=True)
            )
            # Empty when no field needs converting.
            self.trusted_enc = trusted if any(c is not None for c in trusted) else ()

    def decode(self, v: Any) -> Record:
        if self.fast_decode is not None:
            return self.fast_decode(v)  # type: ignore[no-any-return]
        if self.array:
            if type(v) is not list:
                raise _PathError(f"expected array, got {_tname(v)}")
            if len(v) != len(self.names):
                raise _PathError(f"expected an array of {len(self.names)}, got {len(v)}")
            items = v
        else:
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
            items = [v[name] for name in self.names]
        values = []
        for (name, conv), x in zip(self.dec, items, strict=True):
            try:
                values.append(conv(x))
            except _PathError as e:
                e.segments.append(f".{name}")
                raise
        if self.checked:
            # Every field was just checked: build it without checking again.
            obj = object.__new__(self.cls)
            for name, value in zip(self.names, values, strict=True):
                object.__setattr__(obj, name, value)
            return obj
        try:
            return self.cls(**dict(zip(self.names, values, strict=True)))
        except WireError as exc:  # a constraint in __post_init__
            raise _PathError(exc.reason) from None
        except (ValueError, TypeError) as exc:
            raise _PathError(f"invalid {self.cls.__name__}: {exc}") from None

    def encode(self, v: Record) -> Any:
        if self.getter is not None and type(v) is self.cls:
            values = self.getter(v)
            if not self.trusted_enc:  # every field is its own wire form
                out = list(values)
            else:
                out = [
                    x if c is None else c(x) for c, x in zip(self.trusted_enc, values, strict=True)
                ]
            return out if self.array else dict(zip(self.names, out, strict=True))
        out = []
        for name, conv in self.enc:
            try:
                out.append(conv(getattr(v, name)))
            except _PathError as e:
                e.segments.append(f".{name}")
                raise
        return out if self.array else dict(zip(self.names, out, strict=True))

    def check(self, v: Record) -> None:
        for name, conv in self.chk:
            try:
                conv(getattr(v, name))
            except _PathError as e:
                e.segments.append(f".{name}")
                raise


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
    as T | None, IntEnum types (an int on the wire), nested Record types, and
    `Annotated[T, Range(lo, hi)]` / `Annotated[T, Size(lo, hi)]` for the
    bounds of an int or of a length.  Types are exact: bool is not an int and
    int is not a float.  Other field constraints go in `__post_init__`,
    raising WireError.  Top-level types carry `KIND` and are registered with
    `@record_type`; nested ones need neither.

    The wire form is a map of field name to value, or with `WIRE_ARRAY =
    True` an array of the values in field order (for small protocol
    messages, where the names would be most of the bytes).
    """

    __slots__ = ()
    KIND: ClassVar[str]
    WIRE_ARRAY: ClassVar[bool] = False

    def to_wire(self) -> Any:
        """This record's wire form; WireError naming the field if a value has the wrong type."""
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


class CheckedRecord(Record):
    """A Record checked against its annotations whenever it is built (by us
    or by `from_wire`), so an instance is valid however it was made; all its
    rules are in its annotations (types, Range, Size), none in code.  For
    protocol messages, which are built locally as often as decoded."""

    __slots__ = ()

    def __post_init__(self) -> None:
        try:
            _schema(type(self)).check(self)
        except _PathError as e:
            raise WireError(e.reason("")) from None


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
