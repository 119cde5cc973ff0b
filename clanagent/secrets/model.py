"""Secret instances and their holders, as pure functions of the inventory doc.

Owns: what a secret *instance* is (service, secret, scope id), its id string
("SERVICE/SECRET" when shared by a role, "SERVICE/SECRET@MACHINE" when per
machine), who holds it, which instance a dependency resolves to, the output
file names of every generator, and the deterministic choice of the one
machine that generates an instance.

Must never: depend on anything but the document and its arguments (no clock,
no randomness, no local state): every node must compute the same answers.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from clanagent.inventory.select import machines_for, services_of
from clanagent.wire import WireError, pack

__all__ = [
    "SecretInstance",
    "parse_instance_id",
    "secret_spec",
    "instances",
    "holders",
    "holder_keys",
    "instances_held_by",
    "dependency_instance",
    "output_files",
    "valid_file_name",
    "generator_for",
    "BUILTIN_FILES",
]

# The same rule as the inventory's file names: one path component, no dot first.
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
# Domain-separates generator scores from every other hash of these names.
_GENERATOR_DOMAIN = "clanagent-secret-generator-v1"

# Built-in generators write fixed files: (secret files, public files).
BUILTIN_FILES: Mapping[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "random-bytes": (("value",), ()),
    "password": (("password",), ()),
    "ed25519": (("private",), ("public",)),
    "x25519": (("private",), ("public",)),
    "wireguard": (("private",), ("public",)),
}


def valid_file_name(name: Any) -> bool:
    """True when `name` is a safe single file name (no separator, no leading dot)."""
    return type(name) is str and _FILE_RE.fullmatch(name) is not None


@dataclass(frozen=True, slots=True, order=True)
class SecretInstance:
    """One secret value stream: per machine (scope_id = machine) or shared ("role:R")."""

    service: str
    secret: str
    scope_id: str

    def __post_init__(self) -> None:
        for what, v in (("service", self.service), ("secret", self.secret)):
            if type(v) is not str or not _NAME_RE.fullmatch(v):
                raise WireError(f"secret instance: bad {what} name {v!r}")
        s = self.scope_id
        name = s[5:] if type(s) is str and s.startswith("role:") else s
        if type(s) is not str or not _NAME_RE.fullmatch(name):
            raise WireError(f"secret instance: bad scope {s!r}")

    @property
    def shared(self) -> bool:
        return self.scope_id.startswith("role:")

    @property
    def id(self) -> str:
        base = f"{self.service}/{self.secret}"
        return base if self.shared else f"{base}@{self.scope_id}"

    def __str__(self) -> str:
        return self.id


def parse_instance_id(text: str, doc: dict[str, Any] | None = None) -> SecretInstance:
    """The instance named by `text`; WireError when malformed.

    A shared id carries no role, so `doc` is needed to find the secret's
    scope; without it (or when the secret is unknown) a shared id raises.
    """
    if type(text) is not str or text.count("/") != 1:
        raise WireError(f"secret instance id {text!r}: expected SERVICE/SECRET[@MACHINE]")
    service, rest = text.split("/")
    if "@" in rest:
        secret, machine = rest.split("@", 1)
        inst = SecretInstance(service, secret, machine)
        if inst.shared:
            raise WireError(f"secret instance id {text!r}: machine name cannot be a role")
        return inst
    spec = secret_spec(doc, service, rest) if doc is not None else None
    if spec is None or not spec["scope"].startswith("role:"):
        raise WireError(f"secret instance id {text!r}: no shared secret of that name")
    return SecretInstance(service, rest, spec["scope"])


def secret_spec(doc: dict[str, Any], service: str, secret: str) -> dict[str, Any] | None:
    """The inventory entry of secret `service`/`secret`, or None."""
    svc = doc.get("services", {}).get(service)
    if svc is None:
        return None
    return svc.get("secrets", {}).get(secret)


def _service_machines(doc: dict[str, Any], service: str) -> list[str]:
    return sorted(m for m in doc["machines"] if service in services_of(doc, m))


def instances(doc: dict[str, Any]) -> list[SecretInstance]:
    """Every secret instance the document implies, sorted."""
    out = []
    for sname, svc in sorted(doc.get("services", {}).items()):
        for xname, spec in sorted(svc.get("secrets", {}).items()):
            if spec["scope"].startswith("role:"):
                out.append(SecretInstance(sname, xname, spec["scope"]))
            else:
                out.extend(SecretInstance(sname, xname, m) for m in _service_machines(doc, sname))
    return sorted(out)


def holders(doc: dict[str, Any], service: str, secret: str, scope_id: str) -> list[str]:
    """The machines that receive this instance, sorted; [] when the doc has no such instance."""
    spec = secret_spec(doc, service, secret)
    if spec is None:
        return []
    if scope_id.startswith("role:"):
        if spec["scope"] != scope_id:
            return []
        role = doc["services"][service]["roles"].get(scope_id[5:])
        if role is None:
            return []
        return machines_for(doc, role["machines"], role["tags"])
    if spec["scope"] != "machine" or scope_id not in _service_machines(doc, service):
        return []
    return [scope_id]


def holder_keys(doc: dict[str, Any], inst: SecretInstance) -> dict[str, tuple[bytes, bytes]]:
    """holder machine -> (node_key, box_key) for `inst`."""
    ms = doc["machines"]
    return {
        m: (ms[m]["node_key"], ms[m]["box_key"])
        for m in holders(doc, inst.service, inst.secret, inst.scope_id)
    }


def instances_held_by(doc: dict[str, Any], machine: str) -> list[SecretInstance]:
    """The instances `machine` holds, sorted."""
    return [i for i in instances(doc) if machine in holders(doc, i.service, i.secret, i.scope_id)]


def dependency_instance(
    doc: dict[str, Any], inst: SecretInstance, dep: str, generator: str
) -> SecretInstance | None:
    """The instance of dependency `dep` that generating `inst` on `generator` uses.

    A shared dependency is its one instance.  A per-machine dependency is
    the instance of `inst`'s machine, or for a shared `inst` the generator's
    own one (the only per-machine value it can read).  None if `dep` is unknown.
    """
    spec = secret_spec(doc, inst.service, dep)
    if spec is None:
        return None
    if spec["scope"].startswith("role:"):
        return SecretInstance(inst.service, dep, spec["scope"])
    return SecretInstance(inst.service, dep, generator if inst.shared else inst.scope_id)


def output_files(spec: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(secret files, public files) that the secret's generator produces."""
    fixed = BUILTIN_FILES.get(spec["generator"])
    if fixed is not None:
        return fixed
    return tuple(spec.get("secret_files", ())), tuple(spec.get("public_files", ()))


def _score(instance_id: str, node_key: bytes) -> bytes:
    return hashlib.blake2b(
        pack([_GENERATOR_DOMAIN, instance_id, node_key]), digest_size=32
    ).digest()


def generator_for(instance_id: str, holders_online: Iterable[tuple[str, bytes]]) -> str | None:
    """The machine that generates `instance_id`: the online holder with the lowest score.

    Score = BLAKE2b(domain, instance id, node key), so the choice is the same
    on every node, differs between instances (spreading the work), and moves
    only when the chosen machine goes offline or leaves.  None if nobody is online.
    """
    best: tuple[bytes, str] | None = None
    for machine, node_key in holders_online:
        cand = (_score(instance_id, node_key), machine)
        if best is None or cand < best:
            best = cand
    return None if best is None else best[1]
