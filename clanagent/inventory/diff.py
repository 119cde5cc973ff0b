"""Differences between two inventory documents, entry by entry and field by field.

Owns: `diff_docs` (a deterministic list of `Change`s) and `format_diff` (the
text `clanctl inventory diff` / `apply` show a human before signing).

Must never: hide a change (every differing leaf value, added or removed entry
appears), or print a whole key or sealed blob (bytes are shown as short hex).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from clanagent.wire import WireError, pack

__all__ = ["Change", "diff_docs", "format_diff"]

# Sections in the order a human reads them (the TOML order).
_SECTIONS = ("format", "clan", "machines", "networks", "services", "vms")
_MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Change:
    """One difference: `path` is dotted ("machines.alpha.tags"); old/new are None when absent."""

    kind: Literal["add", "remove", "change"]
    path: str
    old: Any = None
    new: Any = None

    def __post_init__(self) -> None:
        if self.kind not in ("add", "remove", "change"):
            raise ValueError(f"unknown change kind {self.kind!r}")


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else '"' + k.replace('"', '\\"') + '"'


def _join(path: str, k: str) -> str:
    return f"{path}.{_key(k)}" if path else _key(k)


def _walk(path: str, old: Any, new: Any, out: list[Change]) -> None:
    if old is _MISSING:
        out.append(Change("add", path, None, new))
    elif new is _MISSING:
        out.append(Change("remove", path, old, None))
    elif isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            _walk(_join(path, k), old.get(k, _MISSING), new.get(k, _MISSING), out)
    elif _differs(old, new):
        out.append(Change("change", path, old, new))


def _differs(old: Any, new: Any) -> bool:
    # Compare encodings, not values: 1 == True and 0.0 == -0.0 in Python, but
    # they are different documents (different hashes) and must show up.
    try:
        return pack(old) != pack(new)
    except WireError:
        return old != new or type(old) is not type(new)


def diff_docs(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[Change]:
    """Every difference from `old` to `new` (None = the empty document), in a stable order.

    Entries added or removed as a whole are one change; an entry present on
    both sides is compared field by field (nested tables, such as a service's
    roles or settings, key by key).
    """
    old = old or {}
    new = new or {}
    keys = [k for k in _SECTIONS if k in old or k in new]
    keys += sorted((set(old) | set(new)) - set(_SECTIONS))
    out: list[Change] = []
    for k in keys:
        _walk(k, old.get(k, _MISSING), new.get(k, _MISSING), out)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex()[:12] if v else '""'
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_fmt(x)}" for k, x in sorted(v.items())) + "}"
    if v is None:
        return "nil"
    return repr(v)


def format_diff(changes: list[Change]) -> str:
    """One line per change: `+ path`, `- path`, `~ path: old -> new` (keys as short hex)."""
    if not changes:
        return "no changes"
    lines = []
    for c in changes:
        if c.kind == "add":
            # A whole new entry is named; a new leaf value is shown.
            lines.append(
                f"+ {c.path}" if isinstance(c.new, dict) else f"+ {c.path} = {_fmt(c.new)}"
            )
        elif c.kind == "remove":
            lines.append(f"- {c.path}")
        else:
            lines.append(f"~ {c.path}: {_fmt(c.old)} -> {_fmt(c.new)}")
    return "\n".join(lines)
