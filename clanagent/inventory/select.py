"""What the inventory asks of one machine: its roles, services, VMs and path preference.

Owns: the selection rules (names or tags pick machines; VM placement with
`count`; network preference by tag), as pure functions of a valid canonical
document, so that every node computes the same answer for every machine.

Must never: depend on anything but the document (no clock, no randomness, no
local state), or return a machine, role or VM the document does not name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from clanagent.inventory.parse import DEFAULT_NETWORKS
from clanagent.wire import pack

__all__ = [
    "machines_for",
    "roles_of",
    "services_of",
    "placement",
    "vms_for",
    "path_preference",
]

# Domain-separates placement scores from every other hash of these names.
_PLACEMENT_DOMAIN = "clanagent-vm-placement-v1"


def machines_for(doc: dict[str, Any], names: Iterable[str], tags: Iterable[str]) -> list[str]:
    """The machines named in `names` or carrying any of `tags`, sorted; unknown names are ignored."""
    machines = doc["machines"]
    wanted_tags = set(tags)
    picked = {n for n in names if n in machines}
    picked.update(n for n, m in machines.items() if wanted_tags.intersection(m["tags"]))
    return sorted(picked)


def _selects(doc: dict[str, Any], entry: dict[str, Any], machine: str) -> bool:
    if machine in entry["machines"]:
        return True
    m = doc["machines"].get(machine)
    return m is not None and not set(entry["tags"]).isdisjoint(m["tags"])


def roles_of(doc: dict[str, Any], machine: str) -> list[tuple[str, str]]:
    """(service, role) pairs that `machine` holds, sorted."""
    if machine not in doc["machines"]:
        return []
    return [
        (sname, rname)
        for sname, svc in sorted(doc["services"].items())
        for rname, role in sorted(svc["roles"].items())
        if _selects(doc, role, machine)
    ]


def services_of(doc: dict[str, Any], machine: str) -> list[str]:
    """The services in which `machine` holds at least one role, sorted."""
    return sorted({s for s, _ in roles_of(doc, machine)})


def _score(vm: str, machine: str) -> bytes:
    return hashlib.blake2b(pack([_PLACEMENT_DOMAIN, vm, machine]), digest_size=16).digest()


def placement(doc: dict[str, Any], vm: str) -> list[str]:
    """The machines that run VM `vm`, sorted by name.

    Rendezvous hashing: every candidate (named or tagged) gets a score from
    hash(vm, machine) and the `count` lowest win.  Every node computes the same
    set, and adding or removing one candidate moves at most one instance.
    """
    entry = doc["vms"].get(vm)
    if entry is None:
        return []
    candidates = machines_for(doc, entry["machines"], entry["tags"])
    ranked = sorted(candidates, key=lambda m: (_score(vm, m), m))
    return sorted(ranked[: entry["count"]])


def vms_for(doc: dict[str, Any], machine: str) -> list[str]:
    """The VMs placed on `machine`, sorted."""
    if machine not in doc["machines"]:
        return []
    return [vm for vm in sorted(doc["vms"]) if machine in placement(doc, vm)]


def path_preference(doc: dict[str, Any], machine: str) -> list[str]:
    """The network kinds to try for `machine`, best first.

    The preference of the first of the machine's (sorted) tags that has one
    in `networks.by_tag`, else `networks.default`; a machine that is not
    public (tag "no-public") never gets "public".
    """
    networks = doc.get("networks") or {}
    m = doc["machines"].get(machine)
    kinds: list[str] | None = None
    if m is not None:
        by_tag = networks.get("by_tag") or {}
        for tag in sorted(m["tags"]):
            if tag in by_tag:
                kinds = by_tag[tag]
                break
    if kinds is None:
        kinds = networks.get("default", DEFAULT_NETWORKS)
    if m is not None and not m["public"]:
        return [k for k in kinds if k != "public"]
    return list(kinds)
