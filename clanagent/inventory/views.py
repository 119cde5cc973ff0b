"""What the control API shows of the inventory (plain wire values).

Owns: the shapes of `inventory.show`, `inventory.history`,
`inventory.conflicts` and `machines` replies.  Must never: change state.
"""

from __future__ import annotations

from typing import Any

from ..identity import node_id_of
from .manager import InventoryManager
from .select import roles_of, vms_for

__all__ = ["show", "history", "conflicts", "machines"]


def _conflicts(manager: InventoryManager) -> list[dict[str, Any]]:
    head = manager.head
    if head is None:
        return []
    return [
        {
            "path": c.path,
            "section": c.section,
            "name": c.name,
            "base": c.base,
            "variants": [{"version": h, "value": v} for h, v in c.variants],
        }
        for c in head.conflicts
    ]


def show(manager: InventoryManager) -> dict[str, Any]:
    head = manager.head
    anchor = manager.anchor
    return {
        "clan": None
        if anchor is None
        else {"id": anchor.clan_id, "name": anchor.name, "admins": list(anchor.admins)},
        "doc": None if head is None else head.doc,
        "leaves": [] if head is None else list(head.leaves),
        "versions": 0 if manager.history is None else len(manager.history),
        "conflicts": _conflicts(manager),
    }


def history(manager: InventoryManager) -> list[dict[str, Any]]:
    if manager.history is None:
        return []
    return [
        {
            "hash": e.hash,
            "parents": list(e.parents),
            "time": e.time,
            "message": e.message,
            "signers": list(e.signers),
        }
        for e in manager.history.log()
    ]


def conflicts(manager: InventoryManager) -> list[dict[str, Any]]:
    return _conflicts(manager)


def member_states(
    manager: InventoryManager, member_rows: list[dict[str, Any]], own_key: bytes
) -> dict[bytes, str]:
    """Node key -> gossip state for every machine of the inventory ("unknown"
    for one gossip has not seen), this node itself as "self"."""
    states: dict[bytes, str] = {}
    inv = manager.inventory
    if inv is not None:
        by_id = {m["node_id"]: m["state"] for m in member_rows}
        for key in inv.node_keys():
            states[key] = by_id.get(node_id_of(key), "unknown")
    states[own_key] = "self"
    return states


def machines(manager: InventoryManager, member_states: dict[bytes, str]) -> list[dict[str, Any]]:
    """Every machine of the inventory with its tags, online state, services and VMs.

    `member_states` maps node keys to the gossip state ("alive", "dead", ...)
    and includes this node itself as "self".
    """
    inv = manager.inventory
    if inv is None:
        return []
    doc = inv.doc
    rows = []
    for name in sorted(doc["machines"]):
        m = doc["machines"][name]
        state = member_states.get(m["node_key"], "unknown")
        rows.append(
            {
                "name": name,
                "node_key": m["node_key"],
                "node_id": node_id_of(m["node_key"]),
                "tags": list(m["tags"]),
                "online": state in ("alive", "self"),
                "state": state,
                "services": [f"{s}.{r}" for s, r in roles_of(doc, name)],
                "vms": list(vms_for(doc, name)),
            }
        )
    return rows
