"""Inventory validation: human TOML -> canonical document, and back.

Owns: the one set of rules that says what a valid inventory document is
(structure, types, byte lengths, names, enums, ranges, references between
entries), applied both to the TOML that admins write (`load_inventory_toml`,
which also fills every default and converts hex/base64 keys to bytes) and to
canonical documents that arrive from the network (`validate_doc`); and the
writer that turns a canonical document back into TOML (`doc_to_toml`).

Must never: raise on bad input (every problem becomes an `InventoryIssue`
naming the file, the path inside it and what is wrong), accept a document
that another node would reject, or accept two encodings of one document
(canonical lists must already be sorted; TOML input is sorted for you).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clanagent import limits as sizes

__all__ = [
    "FORMAT",
    "NAME_RE",
    "GENERATORS",
    "BACKENDS",
    "NETWORK_KINDS",
    "DEFAULT_NETWORKS",
    "NO_PUBLIC_TAG",
    "InventoryIssue",
    "InventoryInvalid",
    "ParseResult",
    "load_inventory_toml",
    "validate_doc",
    "doc_to_toml",
    "check_host_port",
]

FORMAT = 1
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# Exports are value names such as "public_key": names plus underscore.
_EXPORT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_IMPORT_RE = re.compile(r"([a-z0-9][a-z0-9-]{0,62})\.([a-z0-9][a-z0-9-]{0,62})")
_VM_SECRET_RE = re.compile(r"([a-z0-9][a-z0-9-]{0,62})/([a-z0-9][a-z0-9-]{0,62})")
# Secret files land in a per-service runtime directory: a plain file name, never a path.
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_WG_RE = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")
GENERATORS = ("random-bytes", "password", "ed25519", "x25519", "wireguard", "command")
_LENGTH_GENERATORS = frozenset({"random-bytes", "password"})
BACKENDS = ("auto", "qemu", "cloud-hypervisor", "firecracker")
NETWORK_KINDS = ("lan", "public", "tor")
DEFAULT_NETWORKS = ["lan", "public", "tor"]
NO_PUBLIC_TAG = "no-public"

# Named bounds: nothing an admin (or a forged-but-signed doc) writes is unbounded.
# Tables and lists hold the planned clan (clanagent.limits): a role may name
# every machine, a table may list every machine.  The record bound
# (MAX_RECORD_BYTES) caps the document as a whole.
MAX_LIST = sizes.MAX_TABLE  # items in one array
MAX_ENTRIES = sizes.MAX_TABLE  # machines, services, ... per table: the wire's max_map
MAX_COUNT = 1024  # a signing threshold, a VM's instance count: not clan-sized
MAX_STR = 4096
MAX_SEALED = sizes.MAX_SEALED  # one machine's endpoints sealed to the target clan
MAX_SETTINGS_DEPTH = 8
_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True)
class InventoryIssue:
    """One problem (or warning) found in an inventory: where, and what."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        if not self.path:
            return f"{self.file}: {self.message}"
        return f"{self.file}: {self.path}: {self.message}"


class InventoryInvalid(ValueError):
    """A local error: code asked for something that needs a valid document and got an invalid one."""

    def __init__(self, issues: list[InventoryIssue]) -> None:
        self.issues = list(issues)
        first = str(issues[0]) if issues else "invalid inventory"
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        super().__init__(first + more)


@dataclass(slots=True)
class ParseResult:
    """The outcome of reading TOML: `doc` is None whenever there is any error."""

    doc: dict[str, Any] | None
    errors: list[InventoryIssue] = field(default_factory=list)
    warnings: list[InventoryIssue] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


# ------------------------------------------------------------------ checking


class _Bad:
    """Marks a value that failed its check (the error is already recorded)."""

    def __repr__(self) -> str:
        return "<bad>"


_BAD: Any = _Bad()
_REQUIRED: Any = object()
_DERIVED: Any = object()  # default computed from other fields of the entry


class _Ctx:
    def __init__(self, file: str, canon: bool) -> None:
        self.file = file
        # canon: checking a canonical document (bytes keys, nothing omitted,
        # sorted lists must already be sorted); else converting TOML.
        self.canon = canon
        self.errors: list[InventoryIssue] = []
        self.warnings: list[InventoryIssue] = []

    def err(self, path: str, message: str) -> Any:
        self.errors.append(InventoryIssue(self.file, path, message))
        return _BAD

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(InventoryIssue(self.file, path, message))


_Check = Callable[[_Ctx, str, Any], Any]


def _tname(v: Any) -> str:
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (bytes, bytearray)):
        return "bytes"
    if isinstance(v, (list, tuple)):
        return "array"
    if isinstance(v, dict):
        return "table"
    if isinstance(v, (datetime.date, datetime.time)):
        return "datetime"
    return type(v).__name__


def _show(v: Any) -> str:
    if isinstance(v, bytes):
        return v.hex()[:16]
    return repr(v)


def _utf8_ok(s: str) -> bool:
    if s.isascii():
        return True
    try:
        s.encode()
    except UnicodeEncodeError:  # lone surrogates: not a wire string
        return False
    return True


def _string(
    *,
    nonempty: bool = False,
    max_len: int = MAX_STR,
    pattern: re.Pattern[str] | None = None,
    what: str = "",
) -> _Check:
    def check(ctx: _Ctx, path: str, v: Any) -> Any:
        if type(v) is not str:
            return ctx.err(path, f"expected a string, got {_tname(v)}")
        if not _utf8_ok(v):
            return ctx.err(path, "string is not valid UTF-8")
        if nonempty and not v:
            return ctx.err(path, "must not be empty")
        if len(v) > max_len:
            return ctx.err(path, f"longer than {max_len} characters")
        if pattern is not None and not pattern.fullmatch(v):
            return ctx.err(path, f"{v!r} is not a valid {what} (must match {pattern.pattern})")
        return v

    return check


_name = _string(pattern=NAME_RE, what="name")


def _integer(lo: int, hi: int) -> _Check:
    def check(ctx: _Ctx, path: str, v: Any) -> Any:
        if type(v) is not int:
            return ctx.err(path, f"expected an integer, got {_tname(v)}")
        if not lo <= v <= hi:
            return ctx.err(path, f"{v} is out of range {lo}..{hi}")
        return v

    return check


def _boolean(ctx: _Ctx, path: str, v: Any) -> Any:
    if type(v) is not bool:
        return ctx.err(path, f"expected a boolean, got {_tname(v)}")
    return v


def _enum(choices: tuple[str, ...], what: str) -> _Check:
    def check(ctx: _Ctx, path: str, v: Any) -> Any:
        if type(v) is not str:
            return ctx.err(path, f"expected a string, got {_tname(v)}")
        if v not in choices:
            return ctx.err(path, f"unknown {what} {v!r} (known: {', '.join(choices)})")
        return v

    return check


def _array(item: _Check, *, sort: bool = False, nonempty: bool = False) -> _Check:
    """A list of unique hashable items; `sort`: canonical form is sorted."""

    def check(ctx: _Ctx, path: str, v: Any) -> Any:
        if type(v) is not list:
            return ctx.err(path, f"expected an array, got {_tname(v)}")
        if len(v) > MAX_LIST:
            return ctx.err(path, f"more than {MAX_LIST} items")
        if nonempty and not v:
            return ctx.err(path, "must not be empty")
        out = []
        bad = False
        seen: set[Any] = set()
        for i, x in enumerate(v):
            r = item(ctx, f"{path}[{i}]", x)
            if r is _BAD:
                bad = True
            elif r in seen:
                bad = ctx.err(f"{path}[{i}]", f"duplicate {_show(r)}")
            else:
                seen.add(r)
                out.append(r)
        if bad:
            return _BAD
        if sort:
            if not ctx.canon:
                out.sort()
            elif out != sorted(out):
                return ctx.err(path, "not sorted (a canonical document keeps this list sorted)")
        return out

    return check


def _hexkey(nbytes: int, what: str) -> _Check:
    hex_re = re.compile(f"[0-9a-fA-F]{{{2 * nbytes}}}")

    def check(ctx: _Ctx, path: str, v: Any) -> Any:
        if ctx.canon:
            if type(v) is not bytes:
                return ctx.err(path, f"expected {nbytes} bytes, got {_tname(v)}")
            if len(v) != nbytes:
                return ctx.err(path, f"expected {nbytes} bytes, got {len(v)}")
            return v
        if type(v) is not str:
            return ctx.err(path, f"expected a string of {2 * nbytes} hex digits, got {_tname(v)}")
        if not hex_re.fullmatch(v):
            return ctx.err(
                path, f"{what} must be {2 * nbytes} hex digits (got {len(v)} characters)"
            )
        return bytes.fromhex(v)

    return check


def _wgkey(ctx: _Ctx, path: str, v: Any) -> Any:
    if ctx.canon:
        if type(v) is not bytes:
            return ctx.err(path, f"expected 32 bytes, got {_tname(v)}")
        if len(v) != 32:
            return ctx.err(path, f"expected 32 bytes, got {len(v)}")
        return v
    if type(v) is not str:
        return ctx.err(path, f"expected a base64 string, got {_tname(v)}")
    # The exact shape `wg pubkey` prints: 44 characters, one '=', 32 bytes.
    if not _WG_RE.fullmatch(v):
        return ctx.err(
            path, "WireGuard key must be 44 characters of base64 (as `wg pubkey` prints)"
        )
    return base64.b64decode(v, validate=True)


def _sealed(ctx: _Ctx, path: str, v: Any) -> Any:
    if ctx.canon:
        if type(v) is not bytes:
            return ctx.err(path, f"expected bytes, got {_tname(v)}")
        raw = v
    else:
        if type(v) is not str:
            return ctx.err(path, f"expected a base64 string, got {_tname(v)}")
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            return ctx.err(path, "not valid base64")
        if base64.b64encode(raw).decode() != v:
            return ctx.err(path, "not canonical base64")
    if len(raw) > MAX_SEALED:
        return ctx.err(path, f"longer than {MAX_SEALED} bytes")
    return raw


def check_host_port(s: str) -> str | None:
    """Why `s` is not a valid "host:port" (IPv4, [IPv6] or DNS name), or None if it is."""
    if s.startswith("["):
        host, sep, port = s[1:].partition("]:")
        if not sep:
            return "an IPv6 address must be written [address]:port"
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} is not an IPv6 address"
    else:
        host, sep, port = s.rpartition(":")
        if not sep:
            return "missing :port"
        if ":" in host:
            return "an IPv6 address must be written [address]:port"
        if not host:
            return "missing host"
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return f"{host!r} is not an IPv4 address"
        else:
            labels = host.split(".")
            if len(host) > 253 or not all(
                re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label)
                for label in labels
            ):
                return f"{host!r} is not a valid DNS name"
    if not re.fullmatch(r"[0-9]{1,5}", port):
        return f"port {port!r} is not a number"
    if not 1 <= int(port) <= 65535:
        return f"port {int(port)} is out of range 1..65535"
    return None


def _endpoint(ctx: _Ctx, path: str, v: Any) -> Any:
    if type(v) is not str:
        return ctx.err(path, f"expected a string, got {_tname(v)}")
    if len(v) > 300:
        return ctx.err(path, "longer than 300 characters")
    why = check_host_port(v)
    if why is not None:
        return ctx.err(path, f"{v!r} is not a valid host:port: {why}")
    return v


def _settings_value(ctx: _Ctx, path: str, v: Any, depth: int) -> bool:
    """Settings hold any value that survives TOML and the wire both ways."""
    t = type(v)
    if t is str:
        if not _utf8_ok(v):
            ctx.err(path, "string is not valid UTF-8")
            return False
        return True
    if t is bool:
        return True
    if t is int:
        if not _INT64[0] <= v <= _INT64[1]:
            ctx.err(path, "integer does not fit in 64 bits")
            return False
        return True
    if t is float:
        if math.isnan(v):
            ctx.err(path, "NaN is not allowed")
            return False
        return True
    if depth >= MAX_SETTINGS_DEPTH and t in (list, dict):
        ctx.err(path, f"nested deeper than {MAX_SETTINGS_DEPTH}")
        return False
    if t is list:
        ok = True
        for i, x in enumerate(v):
            ok = _settings_value(ctx, f"{path}[{i}]", x, depth + 1) and ok
        return ok
    if t is dict:
        ok = True
        for k, x in v.items():
            if type(k) is not str:
                ctx.err(path, f"keys must be strings, got {_tname(k)}")
                return False
            ok = _settings_value(ctx, _join(path, k), x, depth + 1) and ok
        return ok
    ctx.err(
        path,
        f"a {_tname(v)} cannot be a setting (use string, integer, float, boolean, array or table)",
    )
    return False


def _settings(ctx: _Ctx, path: str, v: Any) -> Any:
    if type(v) is not dict:
        return ctx.err(path, f"expected a table, got {_tname(v)}")
    return v if _settings_value(ctx, path, v, 0) else _BAD


def _join(path: str, key: Any) -> str:
    k = key if isinstance(key, str) else repr(key)
    if not re.fullmatch(r"[A-Za-z0-9_-]+", k):
        k = _toml_str(k) if _utf8_ok(k) else repr(k)
    return f"{path}.{k}" if path else k


@dataclass(frozen=True, slots=True)
class _Field:
    check: _Check
    default: Any = _REQUIRED


def _entry(ctx: _Ctx, path: str, raw: Any, spec: dict[str, _Field]) -> dict[str, Any] | None:
    """Check one table against `spec`; missing optional keys get their defaults (TOML only)."""
    if type(raw) is not dict:
        ctx.err(path, f"expected a table, got {_tname(raw)}")
        return None
    for k in raw:
        if k not in spec:
            ctx.err(_join(path, k), f"unknown key {k!r} (known keys: {', '.join(spec)})")
    out: dict[str, Any] = {}
    for name, f in spec.items():
        p = _join(path, name)
        if name not in raw:
            if ctx.canon or f.default is _REQUIRED:
                ctx.err(p, "missing required key")
            elif f.default is not _DERIVED:
                d = f.default
                out[name] = (
                    list(d) if isinstance(d, list) else dict(d) if isinstance(d, dict) else d
                )
            continue
        r = f.check(ctx, p, raw[name])
        if r is not _BAD:
            out[name] = r
    return out


def _map_of(item: Callable[[_Ctx, str, Any], Any], what: str) -> _Check:
    """A table of named entries (machines, roles, ...); names must match NAME_RE."""

    def check(ctx: _Ctx, path: str, v: Any) -> Any:
        if type(v) is not dict:
            return ctx.err(path, f"expected a table, got {_tname(v)}")
        if len(v) > MAX_ENTRIES:
            return ctx.err(path, f"more than {MAX_ENTRIES} entries")
        out = {}
        for k, x in v.items():
            p = _join(path, k)
            if type(k) is not str or not NAME_RE.fullmatch(k):
                ctx.err(p, f"{k!r} is not a valid {what} name (must match {NAME_RE.pattern})")
                continue
            r = item(ctx, p, x)
            if r is not None and r is not _BAD:
                out[k] = r
        return out

    return check


# ------------------------------------------------------------- the schema

_kinds = _array(_enum(NETWORK_KINDS, "network kind"), nonempty=True)
_names = _array(_name)


def _scope(ctx: _Ctx, path: str, v: Any) -> Any:
    if type(v) is not str:
        return ctx.err(path, f"expected a string, got {_tname(v)}")
    if v == "machine":
        return v
    if v.startswith("role:") and NAME_RE.fullmatch(v[5:]):
        return v
    return ctx.err(path, f"unknown scope {v!r} (known: machine, role:ROLE)")


_CLAN = {
    "id": _Field(_hexkey(16, "clan id")),
    "name": _Field(_name),
    "admins": _Field(_array(_hexkey(32, "admin key"), sort=True, nonempty=True)),
    "threshold": _Field(_integer(1, MAX_COUNT), 1),
}

_MACHINE = {
    "node_key": _Field(_hexkey(32, "node key")),
    "box_key": _Field(_hexkey(32, "box key")),
    "wg_key": _Field(_wgkey),
    "tags": _Field(_array(_name, sort=True), []),
    "endpoints": _Field(_array(_endpoint), []),
    "sealed_endpoints": _Field(_sealed, b""),
    "public": _Field(_boolean, _DERIVED),
}

_NETWORKS = {
    "default": _Field(_kinds, DEFAULT_NETWORKS),
    "by_tag": _Field(_map_of(lambda ctx, p, v: _kinds(ctx, p, v), "tag"), {}),
}

_ROLE = {
    "machines": _Field(_names, []),
    "tags": _Field(_names, []),
    "settings": _Field(_settings, {}),
    "exports": _Field(_array(_string(pattern=_EXPORT_RE, what="export name")), []),
    "imports": _Field(_array(_string(pattern=_IMPORT_RE, what="import (service.role)")), []),
}

_SECRET = {
    "generator": _Field(_enum(GENERATORS, "generator")),
    "length": _Field(_integer(0, 65536), _DERIVED),
    "command": _Field(_string(), ""),
    "depends": _Field(_names, []),
    "scope": _Field(_scope, "machine"),
    "rotate_days": _Field(_integer(0, 36500), 0),
    "secret_files": _Field(_array(_string(pattern=_FILE_RE, what="file name")), []),
    "public_files": _Field(_array(_string(pattern=_FILE_RE, what="file name")), []),
}


def _secret(ctx: _Ctx, path: str, raw: Any) -> dict[str, Any] | None:
    s = _entry(ctx, path, raw, _SECRET)
    if s is None:
        return None
    gen = s.get("generator")
    takes_length = gen in _LENGTH_GENERATORS
    if "length" not in s and not ctx.canon and isinstance(raw, dict) and "length" not in raw:
        s["length"] = 32 if takes_length else 0
    length = s.get("length")
    if isinstance(length, int) and gen is not None:
        if takes_length and length < 1:
            ctx.err(_join(path, "length"), f"{gen} needs a length of at least 1")
        elif not takes_length and length != 0:
            ctx.err(
                _join(path, "length"), f"only random-bytes and password take a length, not {gen}"
            )
    command = s.get("command")
    if isinstance(command, str) and gen is not None:
        if gen == "command" and not command:
            ctx.err(_join(path, "command"), "the command generator needs a command")
        elif gen != "command" and command:
            ctx.err(
                _join(path, "command"), f"only the command generator takes a command, not {gen}"
            )
    both = set(s.get("secret_files", ())) & set(s.get("public_files", ()))
    for f in sorted(both):
        ctx.err(_join(path, "public_files"), f"{f!r} is also a secret file")
    return s


_SERVICE = {
    "type": _Field(_string(nonempty=True, max_len=128)),
    "settings": _Field(_settings, {}),
    "roles": _Field(_map_of(lambda ctx, p, v: _entry(ctx, p, v, _ROLE), "role"), {}),
    "secrets": _Field(_map_of(_secret, "secret"), {}),
    "reload": _Field(_string(), ""),
}

_VM = {
    "machines": _Field(_names, []),
    "tags": _Field(_names, []),
    "count": _Field(_integer(1, MAX_COUNT), 1),
    "vcpus": _Field(_integer(1, 256), 1),
    "memory_mb": _Field(_integer(16, 1 << 22), 256),
    "kernel": _Field(_string(nonempty=True)),
    "initrd": _Field(_string(), ""),
    "rootfs": _Field(_string(), ""),
    "disk_mb": _Field(_integer(0, 1 << 24), 0),
    "networks": _Field(_names, []),
    "secrets": _Field(_array(_string(pattern=_VM_SECRET_RE, what="secret (service/secret)")), []),
    "backend": _Field(_enum(BACKENDS, "backend"), "auto"),
    "graphics": _Field(_boolean, False),
}


def _machine(ctx: _Ctx, path: str, raw: Any) -> dict[str, Any] | None:
    m = _entry(ctx, path, raw, _MACHINE)
    if m is None:
        return None
    tags = m.get("tags")
    no_public = isinstance(tags, list) and NO_PUBLIC_TAG in tags
    if "public" not in m:
        if not ctx.canon and isinstance(raw, dict) and "public" not in raw:
            m["public"] = not no_public
    elif m["public"] and no_public:
        ctx.err(_join(path, "public"), f"must be false for a machine tagged {NO_PUBLIC_TAG!r}")
    return m


def _format(ctx: _Ctx, path: str, v: Any) -> Any:
    if type(v) is not int:
        return ctx.err(path, f"expected an integer, got {_tname(v)}")
    if v != FORMAT:
        return ctx.err(path, f"unsupported format {v} (this agent reads format {FORMAT})")
    return v


_TOP = {
    "format": _Field(_format, FORMAT),
    "clan": _Field(lambda ctx, p, v: _entry(ctx, p, v, _CLAN) or _BAD),
    "machines": _Field(_map_of(_machine, "machine"), {}),
    "networks": _Field(lambda ctx, p, v: _entry(ctx, p, v, _NETWORKS) or _BAD, _DERIVED),
    "services": _Field(_map_of(lambda ctx, p, v: _entry(ctx, p, v, _SERVICE), "service"), {}),
    "vms": _Field(_map_of(lambda ctx, p, v: _entry(ctx, p, v, _VM), "vm"), {}),
}


def _check_refs(ctx: _Ctx, doc: dict[str, Any]) -> None:
    """Everything that looks across entries; tolerates entries left partial by earlier errors."""
    clan = doc.get("clan") or {}
    admins, threshold = clan.get("admins"), clan.get("threshold")
    if isinstance(admins, list) and isinstance(threshold, int) and threshold > len(admins):
        ctx.err("clan.threshold", f"threshold {threshold} is more than the {len(admins)} admin(s)")

    machines: dict[str, Any] = doc.get("machines") or {}
    tags_in_use = {t for m in machines.values() for t in m.get("tags") or ()}
    for key, what in (
        ("node_key", "node key"),
        ("box_key", "box key"),
        ("wg_key", "WireGuard key"),
    ):
        owner: dict[bytes, str] = {}
        for name in sorted(machines):
            k = machines[name].get(key)
            if k is None:
                continue
            if k in owner:
                ctx.err(f"machines.{name}.{key}", f"same {what} as machine {owner[k]!r}")
            else:
                owner[k] = name

    def machine_refs(path: str, entry: dict[str, Any]) -> None:
        for i, m in enumerate(entry.get("machines") or ()):
            if m not in machines:
                ctx.err(f"{path}.machines[{i}]", f"unknown machine {m!r}")
        for t in entry.get("tags") or ():
            if t not in tags_in_use:
                ctx.warn(f"{path}.tags", f"tag {t!r} matches no machine")

    networks = doc.get("networks") or {}
    for t in sorted(networks.get("by_tag") or {}):
        if t not in tags_in_use:
            ctx.warn(f"networks.by_tag.{t}", f"tag {t!r} matches no machine")

    services: dict[str, Any] = doc.get("services") or {}
    for sname in sorted(services):
        svc = services[sname]
        spath = f"services.{sname}"
        roles = svc.get("roles") or {}
        for rname in sorted(roles):
            role = roles[rname]
            rpath = f"{spath}.roles.{rname}"
            machine_refs(rpath, role)
            for i, imp in enumerate(role.get("imports") or ()):
                isvc, _, irole = imp.partition(".")
                if irole not in (services.get(isvc, {}).get("roles") or {}):
                    ctx.err(f"{rpath}.imports[{i}]", f"no service role {imp!r}")
        secrets = svc.get("secrets") or {}
        for xname in sorted(secrets):
            sec = secrets[xname]
            xpath = f"{spath}.secrets.{xname}"
            for i, dep in enumerate(sec.get("depends") or ()):
                if dep == xname:
                    ctx.err(f"{xpath}.depends[{i}]", "a secret cannot depend on itself")
                elif dep not in secrets:
                    ctx.err(f"{xpath}.depends[{i}]", f"unknown secret {dep!r} of service {sname!r}")
            scope = sec.get("scope")
            if isinstance(scope, str) and scope.startswith("role:") and scope[5:] not in roles:
                ctx.err(f"{xpath}.scope", f"service {sname!r} has no role {scope[5:]!r}")
        cycle = _find_cycle({k: list(v.get("depends") or ()) for k, v in secrets.items()})
        if cycle:
            ctx.err(
                f"{spath}.secrets.{cycle[0]}.depends", f"dependency cycle: {' -> '.join(cycle)}"
            )

    for vname in sorted(doc.get("vms") or {}):
        vm = doc["vms"][vname]
        vpath = f"vms.{vname}"
        machine_refs(vpath, vm)
        if not vm.get("machines") and not vm.get("tags") and not ctx.canon:
            ctx.warn(vpath, "names no machines and no tags, so it runs nowhere")
        for i, ref in enumerate(vm.get("secrets") or ()):
            svc_name, _, sec_name = ref.partition("/")
            if sec_name not in (services.get(svc_name, {}).get("secrets") or {}):
                ctx.err(f"{vpath}.secrets[{i}]", f"no secret {ref!r}")


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """The first dependency cycle (sorted walk, so the report is deterministic), or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if d not in graph or d == n:
                continue  # reported as dangling / self-dependency
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _check_document(ctx: _Ctx, raw: Any) -> dict[str, Any] | None:
    doc = _entry(ctx, "", raw, _TOP)
    if doc is None:
        return None
    if "networks" not in doc and not ctx.canon and "networks" not in raw:
        doc["networks"] = {"default": list(DEFAULT_NETWORKS), "by_tag": {}}
    _check_refs(ctx, doc)
    return doc


# ------------------------------------------------------------- public API


def load_inventory_toml(
    path_or_text: str | os.PathLike[str], *, filename: str | None = None
) -> ParseResult:
    """Read an inventory from a file (a path object) or from TOML text (a str).

    Returns the canonical document (every default filled in) when there are
    no errors; `errors` and `warnings` name `filename` (default: the path, or
    "<text>") and the path inside the document.  Never raises.
    """
    if isinstance(path_or_text, os.PathLike):
        file = filename if filename is not None else os.fspath(path_or_text)
        try:
            with open(path_or_text, "rb") as f:
                data = f.read()
        except OSError as exc:
            return ParseResult(
                None, [InventoryIssue(file, "", f"cannot read: {exc.strerror or exc}")]
            )
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            return ParseResult(
                None, [InventoryIssue(file, "", f"not UTF-8 text (byte {exc.start})")]
            )
    else:
        file = filename if filename is not None else "<text>"
        text = path_or_text
    if type(text) is not str:
        return ParseResult(
            None, [InventoryIssue(file, "", f"expected TOML text, got {_tname(text)}")]
        )
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return ParseResult(None, [InventoryIssue(file, "", f"TOML syntax error: {exc}")])
    ctx = _Ctx(file, canon=False)
    doc = _check_document(ctx, raw)
    if ctx.errors or doc is None:
        return ParseResult(None, ctx.errors, ctx.warnings)
    # Belt and braces: what we built must pass the network's rules too.
    again = [InventoryIssue(file, i.path, f"internal: {i.message}") for i in validate_doc(doc)]
    if again:
        return ParseResult(None, again, ctx.warnings)
    return ParseResult(doc, [], ctx.warnings)


def validate_doc(doc: Any) -> list[InventoryIssue]:
    """Every reason the canonical document `doc` is invalid (file "<doc>"); [] when valid.

    For documents from the network: never raises, whatever wire value it gets.
    """
    ctx = _Ctx("<doc>", canon=True)
    try:
        _check_document(ctx, doc)
    except (RecursionError, MemoryError):
        ctx.err("", "document too large or too deep to check")
    except Exception as exc:  # a bug here must reject the doc, not crash the node
        ctx.err("", f"cannot validate: {type(exc).__name__}")
    return ctx.errors


# ------------------------------------------------------------- TOML writer


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\u{o:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else _toml_str(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise InventoryInvalid([InventoryIssue("<doc>", "", f"a {_tname(v)} has no TOML form")])


def _human(name: str, v: Any) -> Any:
    """A canonical field's TOML form (keys as hex / base64)."""
    if isinstance(v, bytes):
        if name in ("wg_key", "sealed_endpoints"):
            return base64.b64encode(v).decode()
        return v.hex()
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [x.hex() for x in v]
    return v


def _emit_table(
    lines: list[str],
    header: str,
    entry: dict[str, Any],
    spec: dict[str, _Field],
    *,
    skip: tuple[str, ...] = (),
    force: tuple[str, ...] = (),
) -> None:
    if lines:
        lines.append("")
    lines.append(f"[{header}]")
    for name, f in spec.items():
        if name in skip or name not in entry:
            continue
        v = entry[name]
        if name not in force and f.default not in (_REQUIRED, _DERIVED) and v == f.default:
            continue  # defaults stay implicit, as a human would write them
        lines.append(f"{name} = {_toml_value(_human(name, v))}")


def doc_to_toml(doc: dict[str, Any]) -> str:
    """The human TOML form of a valid canonical document (load_inventory_toml reads it back to `doc`).

    Raises InventoryInvalid if `doc` is not valid.
    """
    issues = validate_doc(doc)
    if issues:
        raise InventoryInvalid(issues)
    lines: list[str] = []
    _emit_table(lines, "clan", doc["clan"], _CLAN, force=("threshold",))
    for name, m in sorted(doc["machines"].items()):
        _emit_table(lines, f"machines.{name}", m, _MACHINE, skip=("public",))
        # public is implied by the no-public tag; write it only when it says more
        if m["public"] != (NO_PUBLIC_TAG not in m["tags"]):
            lines.append(f"public = {_toml_value(m['public'])}")
    lines.append("")
    lines.append("[networks]")
    lines.append(f"default = {_toml_value(doc['networks']['default'])}")
    by_tag = doc["networks"]["by_tag"]
    if by_tag:
        lines.append("")
        lines.append("[networks.by_tag]")
        for tag, kinds in sorted(by_tag.items()):
            lines.append(f"{tag} = {_toml_value(kinds)}")
    for name, svc in sorted(doc["services"].items()):
        _emit_table(lines, f"services.{name}", svc, _SERVICE, skip=("roles", "secrets"))
        for rname, role in sorted(svc["roles"].items()):
            _emit_table(lines, f"services.{name}.roles.{rname}", role, _ROLE)
        for xname, sec in sorted(svc["secrets"].items()):
            # length is implied (0) for generators that take none
            no_length = ("length",) if sec["generator"] not in _LENGTH_GENERATORS else ()
            _emit_table(lines, f"services.{name}.secrets.{xname}", sec, _SECRET, skip=no_length)
    for name, vm in sorted(doc["vms"].items()):
        _emit_table(lines, f"vms.{name}", vm, _VM)
    return "\n".join(lines) + "\n"
