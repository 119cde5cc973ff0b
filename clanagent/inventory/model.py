"""Read-only typed views over a canonical inventory document.

Owns: the typed face of the inventory that the rest of the agent reads
(`Inventory`, `Machine`, `Service`, `Role`, `Secret`, `Vm`, `Networks`), and
the document hash (`doc_hash`).

Must never: change the document it wraps (views are frozen and hold tuples
and read-only mappings), or wrap a document that fails `validate_doc`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from clanagent.inventory.parse import InventoryInvalid, validate_doc
from clanagent.wire import pack

__all__ = [
    "Inventory",
    "Machine",
    "Networks",
    "Role",
    "Secret",
    "Service",
    "Vm",
    "doc_hash",
]


def doc_hash(doc: Any) -> bytes:
    """BLAKE2b-256 of the canonical encoding of `doc` (equal docs, equal hashes)."""
    return hashlib.blake2b(pack(doc), digest_size=32).digest()


def _frozen_value(v: Any) -> Any:
    """A read-only copy of a settings value (tuples and read-only mappings)."""
    if isinstance(v, list):
        return tuple(_frozen_value(x) for x in v)
    if isinstance(v, dict):
        return MappingProxyType({k: _frozen_value(x) for k, x in v.items()})
    return v


@dataclass(frozen=True, slots=True)
class Machine:
    name: str
    node_key: bytes
    box_key: bytes
    wg_key: bytes
    tags: tuple[str, ...]
    endpoints: tuple[str, ...]
    sealed_endpoints: bytes
    public: bool

    def has_tag(self, tag: str) -> bool:
        return tag in self.tags


@dataclass(frozen=True, slots=True)
class Role:
    service: str
    name: str
    machines: tuple[str, ...]
    tags: tuple[str, ...]
    settings: Mapping[str, Any]
    exports: tuple[str, ...]
    imports: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Secret:
    service: str
    name: str
    generator: str
    length: int
    command: str
    depends: tuple[str, ...]
    scope: str  # "machine" or "role:ROLE"
    rotate_days: int
    secret_files: tuple[str, ...]
    public_files: tuple[str, ...]

    @property
    def scope_role(self) -> str | None:
        """The role whose machines share this secret, or None for a per-machine secret."""
        return self.scope[5:] if self.scope.startswith("role:") else None


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    type: str
    settings: Mapping[str, Any]
    roles: Mapping[str, Role]
    secrets: Mapping[str, Secret]
    reload: str


@dataclass(frozen=True, slots=True)
class Vm:
    name: str
    machines: tuple[str, ...]
    tags: tuple[str, ...]
    count: int
    vcpus: int
    memory_mb: int
    kernel: str
    initrd: str
    rootfs: str
    disk_mb: int
    networks: tuple[str, ...]
    secrets: tuple[str, ...]
    backend: str
    graphics: bool


@dataclass(frozen=True, slots=True)
class Networks:
    default: tuple[str, ...]
    by_tag: Mapping[str, tuple[str, ...]]


class Inventory:
    """A validated canonical document seen through typed, read-only views.

    Raises InventoryInvalid (a local error) when `doc` fails validation:
    callers hand it documents they have already accepted (and may say so
    with `checked=True` when they validated it themselves).
    """

    __slots__ = (
        "doc",
        "hash",
        "clan_id",
        "clan_name",
        "admins",
        "threshold",
        "machines",
        "services",
        "vms",
        "networks",
        "_by_node_key",
        "_node_keys",
        "_placement",
        "_vms_on",
    )

    def __init__(self, doc: dict[str, Any], *, checked: bool = False) -> None:
        # `checked`: the caller has just had `validate_doc` pass on this very
        # doc (the inventory manager's history does): at 1000 machines a
        # second check costs 55 ms.
        if not checked:
            issues = validate_doc(doc)
            if issues:
                raise InventoryInvalid(issues)
        self.doc = doc  # shared, never mutated: it is what was hashed and signed
        self.hash = doc_hash(doc)
        clan = doc["clan"]
        self.clan_id: bytes = clan["id"]
        self.clan_name: str = clan["name"]
        self.admins: tuple[bytes, ...] = tuple(clan["admins"])
        self.threshold: int = clan["threshold"]
        self.machines: Mapping[str, Machine] = MappingProxyType(
            {
                name: Machine(
                    name=name,
                    node_key=m["node_key"],
                    box_key=m["box_key"],
                    wg_key=m["wg_key"],
                    tags=tuple(m["tags"]),
                    endpoints=tuple(m["endpoints"]),
                    sealed_endpoints=m["sealed_endpoints"],
                    public=m["public"],
                )
                for name, m in sorted(doc["machines"].items())
            }
        )
        self._by_node_key = {m.node_key: m for m in self.machines.values()}
        # Built once: admission asks it for every record that arrives.
        self._node_keys = frozenset(self._by_node_key)
        # Placement hashes every candidate machine of a VM (1000 for a VM
        # placed by a tag every machine has): computed once per inventory,
        # not on every VM tick and every vm-status record that arrives.
        self._placement: dict[str, tuple[str, ...]] = {}
        self._vms_on: dict[str, tuple[str, ...]] = {}
        self.services: Mapping[str, Service] = MappingProxyType(
            {name: _service(name, s) for name, s in sorted(doc["services"].items())}
        )
        self.vms: Mapping[str, Vm] = MappingProxyType(
            {name: _vm(name, v) for name, v in sorted(doc["vms"].items())}
        )
        net = doc["networks"]
        self.networks = Networks(
            default=tuple(net["default"]),
            by_tag=MappingProxyType({t: tuple(k) for t, k in sorted(net["by_tag"].items())}),
        )

    def machine_by_node_key(self, key: bytes) -> Machine | None:
        return self._by_node_key.get(key)

    def placement(self, vm: str) -> tuple[str, ...]:
        """The machines that run `vm` (`select.placement`, computed once)."""
        got = self._placement.get(vm)
        if got is None:
            from clanagent.inventory import select

            got = self._placement[vm] = tuple(select.placement(self.doc, vm))
        return got

    def vms_on(self, machine: str) -> tuple[str, ...]:
        """The VMs placed on `machine` (`select.vms_for`, computed once)."""
        got = self._vms_on.get(machine)
        if got is None:
            from clanagent.inventory import select

            got = self._vms_on[machine] = tuple(select.vms_for(self.doc, machine))
        return got

    def node_keys(self) -> frozenset[bytes]:
        """The node keys admitted to the clan (every machine of the inventory)."""
        return self._node_keys

    def is_admin(self, key: bytes) -> bool:
        return key in self.admins

    def __repr__(self) -> str:
        return (
            f"Inventory(clan={self.clan_name!r}, machines={len(self.machines)}, "
            f"hash={self.hash.hex()[:12]})"
        )


def _service(name: str, s: dict[str, Any]) -> Service:
    roles = {
        r: Role(
            service=name,
            name=r,
            machines=tuple(role["machines"]),
            tags=tuple(role["tags"]),
            settings=_frozen_value(role["settings"]),
            exports=tuple(role["exports"]),
            imports=tuple(role["imports"]),
        )
        for r, role in sorted(s["roles"].items())
    }
    secrets = {
        x: Secret(
            service=name,
            name=x,
            generator=sec["generator"],
            length=sec["length"],
            command=sec["command"],
            depends=tuple(sec["depends"]),
            scope=sec["scope"],
            rotate_days=sec["rotate_days"],
            secret_files=tuple(sec["secret_files"]),
            public_files=tuple(sec["public_files"]),
        )
        for x, sec in sorted(s["secrets"].items())
    }
    return Service(
        name=name,
        type=s["type"],
        settings=_frozen_value(s["settings"]),
        roles=MappingProxyType(roles),
        secrets=MappingProxyType(secrets),
        reload=s["reload"],
    )


def _vm(name: str, v: dict[str, Any]) -> Vm:
    return Vm(
        name=name,
        machines=tuple(v["machines"]),
        tags=tuple(v["tags"]),
        count=v["count"],
        vcpus=v["vcpus"],
        memory_mb=v["memory_mb"],
        kernel=v["kernel"],
        initrd=v["initrd"],
        rootfs=v["rootfs"],
        disk_mb=v["disk_mb"],
        networks=tuple(v["networks"]),
        secrets=tuple(v["secrets"]),
        backend=v["backend"],
        graphics=v["graphics"],
    )
