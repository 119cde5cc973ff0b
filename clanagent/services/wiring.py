"""Service wiring: what a role exports, who imports it, and what a consumer sees.

Owns: the rules, as pure functions of the inventory document and the export
records, for

* which values a machine publishes for each of its roles (`export_values`,
  `export_report`) and the body of the "export" record that carries them
  (`export_body`, `parse_export_body`);
* which export records are believed (`collect_exports`: the signer must be
  the machine the body names, and that machine must hold the role now);
* what a machine imports (`imports_for`) and the deterministic view of it
  that `render.py` writes to disk (`resolve_imports` -> `Rendered`);
* the `clanctl services` view (`services_view`).

Must never: do I/O, read a clock, or trust a record body before
`parse_export_body` has checked it.  Export values are public by
construction (addresses, ports, public keys); nothing here may ever resolve a
secret file, only the public parts of secrets.

The environment names: for an import "svc.role" seen by a consumer,

* ``CLAN_<SVC>_<ROLE>_<VALUE>``: the value from the first provider (the
  lowest machine name among the providers that have published);
* ``CLAN_<SVC>_<ROLE>_<VALUE>_<N>``: the value from provider N (0-based, same
  order, published providers only);
* ``CLAN_<SVC>_<ROLE>_COUNT`` and ``CLAN_<SVC>_<ROLE>_MACHINES`` (space separated).

Names are upper-cased with "-" turned into "_".  Two different sources that
mangle to one name (service "a-b" role "c" vs service "a" role "b-c", or a
value called "count") would silently shadow each other, so every key that
more than one source produces is left out of the env and listed in
`ServiceImports.conflicts`; imports.json always carries everything.
"""

from __future__ import annotations

import base64
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from clanagent.inventory.parse import NAME_RE
from clanagent.inventory.select import machines_for, roles_of
from clanagent.wire import Record, WireError, record_type

__all__ = [
    "EXPORT_KIND",
    "Exports",
    "PublicFile",
    "MAX_VALUES",
    "MAX_VALUE_LEN",
    "SECRET_REF_PREFIX",
    "IMPORTS_FORMAT",
    "ServicesError",
    "ServicesLocalError",
    "ServicesRemoteError",
    "ExportRejected",
    "ExportBody",
    "Provider",
    "ServiceImports",
    "Rendered",
    "export_key",
    "split_export_key",
    "check_value",
    "export_report",
    "export_values",
    "export_body",
    "parse_export_body",
    "accept_export",
    "collect_exports",
    "imports_for",
    "resolve_imports",
    "reload_command",
    "services_view",
]

EXPORT_KIND = "export"
# Bounds on what a peer's export record may carry; the inventory caps a
# role's exports list at 1024 names, and a value is one line of text.
MAX_VALUES = 1024
MAX_VALUE_LEN = 4096
SECRET_REF_PREFIX = "secret:"
IMPORTS_FORMAT = 1

# Same shape as the inventory's export names (parse._EXPORT_RE).
_EXPORT_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")

# (service, role, machine) -> {value name: value}
Exports = Mapping[tuple[str, str, str], Mapping[str, str]]
PublicFile = Callable[[str, str], "str | bytes | None"]


class ServicesError(Exception):
    """Base of every error raised by the services part."""


class ServicesLocalError(ServicesError):
    """We misused the API (asked about a service or machine the document does not have)."""


class ServicesRemoteError(ServicesError):
    """A peer's record does not fit the inventory."""


class ExportRejected(ServicesRemoteError):
    """A well-formed export record that the inventory does not back (wrong signer, no such role)."""


# ------------------------------------------------------------------ names and values


def export_key(service: str, role: str) -> str:
    """The record key of the export of (service, role): "service.role"."""
    return f"{service}.{role}"


def split_export_key(key: str) -> tuple[str, str]:
    """(service, role) from a record key; WireError if it is not "service.role"."""
    service, dot, role = key.partition(".") if isinstance(key, str) else ("", "", "")
    if not dot or not NAME_RE.fullmatch(service) or not NAME_RE.fullmatch(role):
        raise WireError(f"export key {key!r} is not service.role")
    return service, role


def check_value(value: str) -> str | None:
    """Why `value` cannot be an export value, or None if it can.

    Values end up as one line of an env file that both a shell and systemd's
    EnvironmentFile= read; a newline or other control character has no safe,
    portable quoting there, so such values are rejected, not escaped.
    """
    if type(value) is not str:
        return f"expected a string, got {type(value).__name__}"
    if len(value) > MAX_VALUE_LEN:
        return f"longer than {MAX_VALUE_LEN} characters"
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            return f"contains the control character {ch!r}"
    return None


def _stringify(v: Any) -> str:
    # Settings are TOML values; one spelling per value so every node agrees.
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | str):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _role(doc: dict[str, Any], service: str, role: str) -> dict[str, Any]:
    try:
        return doc["services"][service]["roles"][role]
    except KeyError:
        raise ServicesLocalError(f"the inventory has no role {service}.{role}") from None


def _resolve_secret_ref(
    doc: dict[str, Any], service: str, ref: str, public_file: PublicFile
) -> tuple[str | None, str]:
    secret, slash, fname = ref[len(SECRET_REF_PREFIX) :].partition("/")
    decl = doc["services"][service]["secrets"].get(secret)
    if not slash or decl is None:
        return None, f"{ref!r}: service {service!r} has no secret {secret!r}"
    from ..secrets.model import output_files  # built-in generators name their own files

    if not _FILE_RE.fullmatch(fname) or fname not in output_files(decl)[1]:
        return None, f"{ref!r}: {fname!r} is not a public file of secret {secret!r}"
    content = public_file(secret, fname)
    if content is None:
        return None, f"{ref!r}: not generated yet"
    if isinstance(content, bytes):
        try:
            content = content.decode("utf-8")
        except UnicodeDecodeError:
            return None, f"{ref!r}: the file is not UTF-8 text"
    # A generator writing `wg pubkey > out/public` leaves a trailing newline;
    # take the file the way $(cat file) would.
    return content.rstrip("\r\n"), ""


def export_report(
    doc: dict[str, Any],
    service: str,
    role: str,
    machine: str,
    *,
    overlay: str,
    node_key_hex: str,
    public_file: PublicFile,
) -> tuple[dict[str, str], dict[str, str]]:
    """(values, missing) for the exports `machine` declares as `role` of `service`.

    Each declared name is looked up in order: the role's settings, then the
    service's settings, then the built-ins ("address" = `overlay`,
    "public_key" and "node_key" = `node_key_hex`, "wg_key" = the machine's
    WireGuard public key in base64).  A setting that is a string
    "secret:NAME/FILE" is replaced by the public file FILE of secret NAME of
    the same service, read through `public_file(NAME, FILE)` (str, or bytes
    that must be UTF-8; None: not there yet), with trailing newlines removed.
    Other settings are stringified (bool -> "true"/"false", numbers as
    written, arrays and tables as compact JSON).  Every value must pass
    `check_value` (one line).  `missing` maps each name left out to the
    reason why.
    """
    decl = _role(doc, service, role)
    m = doc["machines"].get(machine)
    if m is None:
        raise ServicesLocalError(f"the inventory has no machine {machine!r}")
    svc_settings = doc["services"][service]["settings"]
    builtins: dict[str, str] = {
        "address": overlay,
        "public_key": node_key_hex,
        "node_key": node_key_hex,
    }
    wg = m.get("wg_key")
    if isinstance(wg, bytes):
        builtins["wg_key"] = base64.b64encode(wg).decode()
    values: dict[str, str] = {}
    missing: dict[str, str] = {}
    for name in decl["exports"]:
        if name in decl["settings"]:
            raw: Any = decl["settings"][name]
        elif name in svc_settings:
            raw = svc_settings[name]
        elif name in builtins:
            raw = builtins[name]
        else:
            missing[name] = "no setting or built-in value of that name"
            continue
        if isinstance(raw, str) and raw.startswith(SECRET_REF_PREFIX):
            value, why = _resolve_secret_ref(doc, service, raw, public_file)
            if value is None:
                missing[name] = why
                continue
        else:
            value = _stringify(raw)
        why = check_value(value)
        if why is not None:
            missing[name] = why
            continue
        values[name] = value
    return values, missing


def export_values(
    doc: dict[str, Any],
    service: str,
    role: str,
    machine: str,
    *,
    overlay: str,
    node_key_hex: str,
    public_file: PublicFile,
) -> dict[str, str]:
    """The values of `export_report`, without the reasons for the missing ones."""
    return export_report(
        doc,
        service,
        role,
        machine,
        overlay=overlay,
        node_key_hex=node_key_hex,
        public_file=public_file,
    )[0]


# ------------------------------------------------------------------ the export record


@record_type
@dataclass(frozen=True, slots=True)
class ExportBody(Record):
    """The body of an "export" record (key "service.role"): its wire schema
    (checked by `clanagent.wire`'s record engine) and the rules on its values."""

    KIND: ClassVar[str] = EXPORT_KIND
    service: str
    role: str
    machine: str
    values: dict[str, str]

    def __post_init__(self) -> None:
        for k in ("service", "role", "machine"):
            if not NAME_RE.fullmatch(getattr(self, k)):
                raise WireError(f"body.{k}: not a valid name")
        if len(self.values) > MAX_VALUES:
            raise WireError(f"body.values: more than {MAX_VALUES} values")
        for name in sorted(self.values):
            if not _EXPORT_NAME_RE.fullmatch(name):
                raise WireError(f"body.values: {name[:64]!r} is not a valid export name")
            why = check_value(self.values[name])
            if why is not None:
                raise WireError(f"body.values.{name}: {why}")

    @property
    def key(self) -> str:
        return export_key(self.service, self.role)


def export_body(service: str, role: str, machine: str, values: Mapping[str, str]) -> dict[str, Any]:
    """The wire body of our export record (checked as strictly as a peer's)."""
    body = {"service": service, "role": role, "machine": machine, "values": dict(values)}
    try:
        parse_export_body(body)
    except WireError as e:
        raise ServicesLocalError(f"cannot publish export {service}.{role}: {e.reason}") from None
    return body


def parse_export_body(body: Any) -> ExportBody:
    """Check a decoded export body (`ExportBody`'s schema and rules); WireError
    saying what is wrong on anything unexpected."""
    return ExportBody.from_wire(body, path="body")


def accept_export(doc: dict[str, Any], origin: bytes, key: str, body: Any) -> ExportBody:
    """An export record's body if the inventory backs it.

    WireError if the body is malformed or does not match its key;
    ExportRejected if the signer is not the machine the body names or that
    machine does not (now) hold the role.  Values the role no longer declares
    are dropped, not rejected: the inventory may have changed since signing.
    """
    parsed = parse_export_body(body)
    if split_export_key(key) != (parsed.service, parsed.role):
        raise WireError(f"export key {key!r} does not match body {parsed.key!r}")
    m = doc["machines"].get(parsed.machine)
    if m is None or m["node_key"] != origin:
        raise ExportRejected(f"export {key}: not signed by machine {parsed.machine!r}")
    if (parsed.service, parsed.role) not in roles_of(doc, parsed.machine):
        raise ExportRejected(f"export {key}: {parsed.machine!r} does not hold that role")
    declared = set(doc["services"][parsed.service]["roles"][parsed.role]["exports"])
    kept = {k: v for k, v in parsed.values.items() if k in declared}
    return ExportBody(parsed.service, parsed.role, parsed.machine, kept)


def collect_exports(
    doc: dict[str, Any], records: Iterable[tuple[bytes, str, Any]]
) -> tuple[dict[tuple[str, str, str], dict[str, str]], list[str]]:
    """(exports, rejections) from (origin, key, body) of every stored "export" record.

    Run again after every inventory change: a record rejected now (its
    machine is not in the role yet) may be accepted later, and one accepted
    now may stop counting.  `rejections` are one-line reasons for logs.
    """
    exports: dict[tuple[str, str, str], dict[str, str]] = {}
    rejections: list[str] = []
    for origin, key, body in records:
        try:
            e = accept_export(doc, origin, key, body)
        except (WireError, ServicesRemoteError) as err:
            rejections.append(f"{origin.hex()[:16]} {key}: {err}")
            continue
        exports[(e.service, e.role, e.machine)] = dict(e.values)
    return exports, rejections


# ------------------------------------------------------------------ imports


def imports_for(doc: dict[str, Any], machine: str) -> list[tuple[str, str, str]]:
    """(service, role, "svc.role") for every import of every role `machine` holds, sorted."""
    out = []
    for service, role in roles_of(doc, machine):
        for imp in doc["services"][service]["roles"][role]["imports"]:
            out.append((service, role, imp))
    return sorted(out)


@dataclass(frozen=True, slots=True)
class Provider:
    """One machine of an imported role, and what it has published."""

    machine: str
    published: bool
    values: Mapping[str, str]
    missing: tuple[str, ...]  # declared exports not in its record (or all, if none)
    is_self: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "published": self.published,
            "values": dict(sorted(self.values.items())),
            "missing": list(self.missing),
            "self": self.is_self,
        }


def _mangle(*parts: str) -> str:
    return "_".join(p.upper().replace("-", "_") for p in parts)


@dataclass(frozen=True, slots=True)
class ServiceImports:
    """Everything one consuming service sees on this machine: its imports.json and imports.env."""

    service: str
    machine: str
    roles: Mapping[str, tuple[str, ...]]  # our role in `service` -> its imports
    imports: Mapping[str, tuple[Provider, ...]]  # "svc.role" -> providers, sorted by machine
    env: Mapping[str, str] = field(default_factory=dict)
    conflicts: tuple[str, ...] = ()  # env names left out: more than one source mangles to them

    def to_json(self) -> dict[str, Any]:
        """The imports.json document (plain JSON types, deterministic)."""
        return {
            "format": IMPORTS_FORMAT,
            "service": self.service,
            "machine": self.machine,
            "roles": {r: list(i) for r, i in sorted(self.roles.items())},
            "imports": {
                imp: [p.to_json() for p in provs] for imp, provs in sorted(self.imports.items())
            },
            "env_conflicts": list(self.conflicts),
        }


@dataclass(frozen=True, slots=True)
class Rendered:
    """What `machine` imports: one ServiceImports per consuming service that imports anything."""

    machine: str
    services: Mapping[str, ServiceImports]


def _providers(
    doc: dict[str, Any], machine: str, imp: str, exports: Exports
) -> tuple[Provider, ...]:
    isvc, _, irole = imp.partition(".")
    decl = doc["services"][isvc]["roles"][irole]
    out = []
    for m in machines_for(doc, decl["machines"], decl["tags"]):
        values = exports.get((isvc, irole, m))
        published = values is not None
        vals = {k: v for k, v in (values or {}).items() if k in decl["exports"]}
        missing = tuple(n for n in decl["exports"] if n not in vals)
        out.append(Provider(m, published, vals, missing, is_self=(m == machine)))
    return tuple(out)


def _env(imports: Mapping[str, tuple[Provider, ...]]) -> tuple[dict[str, str], tuple[str, ...]]:
    sources: dict[str, set[tuple[str, ...]]] = {}
    env: dict[str, str] = {}

    def put(name: str, value: str, source: tuple[str, ...]) -> None:
        sources.setdefault(name, set()).add(source)
        env[name] = value

    for imp, provs in sorted(imports.items()):
        isvc, _, irole = imp.partition(".")
        prefix = _mangle("clan", isvc, irole)
        live = [p for p in provs if p.published]
        put(f"{prefix}_COUNT", str(len(live)), (imp, "#count"))
        put(f"{prefix}_MACHINES", " ".join(p.machine for p in live), (imp, "#machines"))
        for i, p in enumerate(live):
            for name, value in sorted(p.values.items()):
                if i == 0:
                    put(f"{prefix}_{_mangle(name)}", value, (imp, "first", name))
                put(f"{prefix}_{_mangle(name)}_{i}", value, (imp, str(i), name))
    conflicts = tuple(sorted(n for n, s in sources.items() if len(s) > 1))
    for n in conflicts:
        del env[n]
    return dict(sorted(env.items())), conflicts


def resolve_imports(doc: dict[str, Any], machine: str, exports: Exports) -> Rendered:
    """What `machine` imports, given the believed exports (from `collect_exports`).

    Providers are every machine of the imported role, sorted by name, whether
    or not it has published yet (`published` says); the env uses only the
    published ones.  This machine appears among them if it holds the imported
    role itself (`is_self`), so a role that imports itself sees its peers.
    """
    by_service: dict[str, dict[str, list[str]]] = {}
    for service, role, imp in imports_for(doc, machine):
        by_service.setdefault(service, {}).setdefault(role, []).append(imp)
    services: dict[str, ServiceImports] = {}
    for service, roles in sorted(by_service.items()):
        wanted = sorted({imp for imps in roles.values() for imp in imps})
        imports = {imp: _providers(doc, machine, imp, exports) for imp in wanted}
        env, conflicts = _env(imports)
        services[service] = ServiceImports(
            service=service,
            machine=machine,
            roles={r: tuple(i) for r, i in sorted(roles.items())},
            imports=imports,
            env=env,
            conflicts=conflicts,
        )
    return Rendered(machine, services)


def reload_command(doc: dict[str, Any], service: str) -> str:
    """The service's reload command from the inventory ("" when it has none)."""
    svc = doc["services"].get(service)
    return svc["reload"] if svc is not None else ""


# ------------------------------------------------------------------ clanctl services


def services_view(doc: dict[str, Any], exports: Exports) -> list[dict[str, Any]]:
    """Instances, roles, machines and the exports wired between them (plain JSON types).

    One entry per service, sorted; per role: its machines, the names it
    declares, what each machine has published (values, and the names still
    missing), the imports it declares and which roles import it.
    """
    importers: dict[str, list[str]] = {}
    for sname, svc in doc["services"].items():
        for rname, role in svc["roles"].items():
            for imp in role["imports"]:
                importers.setdefault(imp, []).append(export_key(sname, rname))
    view = []
    for sname, svc in sorted(doc["services"].items()):
        roles = []
        for rname, role in sorted(svc["roles"].items()):
            machines = machines_for(doc, role["machines"], role["tags"])
            published = []
            for m in machines:
                values = exports.get((sname, rname, m))
                vals = {k: v for k, v in sorted((values or {}).items()) if k in role["exports"]}
                published.append(
                    {
                        "machine": m,
                        "published": values is not None,
                        "values": vals,
                        "missing": [n for n in role["exports"] if n not in vals],
                    }
                )
            roles.append(
                {
                    "role": rname,
                    "machines": machines,
                    "exports": list(role["exports"]),
                    "imports": list(role["imports"]),
                    "imported_by": sorted(importers.get(export_key(sname, rname), [])),
                    "published": published,
                }
            )
        view.append(
            {
                "service": sname,
                "type": svc["type"],
                "reload": svc["reload"],
                "roles": roles,
            }
        )
    return view
