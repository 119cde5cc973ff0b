"""Which machine to route each micro VM's overlay address to.

Owns: `vm_routes`, the pure rule that turns the inventory and the signed
`vm-status` records into "machine (node key) -> VM addresses it hosts", which
the mesh adds to that peer's WireGuard allowed-ips.

A VM address is given to a machine only when all of these hold:
- the inventory puts the VM on the clan network (`networks` has "clan") and
  places it on that machine (`placement`);
- the machine's own signed `vm-status` record for the VM says it runs and
  names the address;
- the address is the one every node computes (`overlay.vm_ip6`), and it is no
  machine's overlay address.
A record's address is compared, never used: a host cannot pull another
machine's (or VM's) traffic to itself by claiming an address.  When a VM runs
on several machines (count > 1), its one address goes to the first of them
(by name) that reports it running; the other instances are not reachable over
the overlay (a /128 can have only one WireGuard peer).

Must never: do I/O, read the clock, or return an address for a machine that
the inventory does not place the VM on.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from ..inventory.select import placement
from .overlay import overlay_ip6, vm_ip6

__all__ = ["VM_STATUS_KIND", "CLAN_NETWORK", "vm_routes"]

VM_STATUS_KIND = "vm-status"  # the same kind vmhost.service publishes
CLAN_NETWORK = "clan"  # the same name as vmhost.spec.CLAN_NETWORK


def vm_routes(
    doc: dict[str, Any],
    clan_id: bytes,
    records: Iterable[tuple[bytes, str, Any]],
    gone: frozenset[bytes] = frozenset(),
) -> dict[bytes, list[ipaddress.IPv6Address]]:
    """Node key -> the VM overlay addresses that machine hosts (sorted).

    `records` are (origin node key, record key, body) of `vm-status` records,
    already signature-checked by the store.  `gone`: machines known to be
    dead or to have left; their last "running" is not believed (a VM placed
    on several machines moves to one that is up)."""
    machine_of = {m["node_key"]: name for name, m in doc["machines"].items()}
    machine_ips = {overlay_ip6(clan_id, k) for k in machine_of}
    running: dict[str, set[str]] = {}  # vm -> machines that report it running at its address
    for origin, key, body in records:
        machine = machine_of.get(origin)
        if origin in gone:
            continue
        if machine is None or not isinstance(body, dict) or body.get("vm") != key:
            continue
        entry = doc["vms"].get(key)
        if entry is None or CLAN_NETWORK not in entry.get("networks", ()):
            continue
        if body.get("state") != "running":
            continue
        addr = vm_ip6(clan_id, key)
        if body.get("overlay") != str(addr) or addr in machine_ips:
            continue
        running.setdefault(key, set()).add(machine)
    out: dict[bytes, list[ipaddress.IPv6Address]] = {}
    node_key_of = {name: k for k, name in machine_of.items()}
    for vm, machines in running.items():
        host = next((m for m in placement(doc, vm) if m in machines), None)
        if host is not None:
            out.setdefault(node_key_of[host], []).append(vm_ip6(clan_id, vm))
    return {k: sorted(v) for k, v in out.items()}
