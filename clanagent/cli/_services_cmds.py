"""clanctl's services and secrets commands.

Owns: showing service instances, their roles, machines and the exports wired
between them; and the secrets commands.  Must never: print a secret value
(only public parts are ever shown).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..control.client import ControlClient
from ._table import table

__all__ = ["add_parsers"]


def cmd_services(client: ControlClient, args: argparse.Namespace) -> Any:
    view = client.call("services")
    if args.json:
        return view
    if not view:
        print("no services in the inventory")
        return None
    for svc in view:
        reload = f"  (reload: {svc['reload']})" if svc.get("reload") else ""
        print(f"{svc['service']}  type {svc['type']}{reload}")
        rows = []
        for role in svc["roles"]:
            published = []
            for p in role.get("published", []):
                if p["published"]:
                    vals = ", ".join(f"{k}={v}" for k, v in sorted(p["values"].items()))
                    published.append(f"{p['machine']}: {vals or '-'}")
                else:
                    published.append(f"{p['machine']}: (not yet)")
            rows.append(
                (
                    role["role"],
                    ",".join(role["machines"]) or "-",
                    ",".join(role["exports"]) or "-",
                    ",".join(role["imports"]) or "-",
                    ",".join(role["imported_by"]) or "-",
                    "; ".join(published) or "-",
                )
            )
        print(
            table(
                ["  ROLE", "MACHINES", "EXPORTS", "IMPORTS", "IMPORTED BY", "PUBLISHED"],
                [("  " + r[0], *r[1:]) for r in rows],
            )
        )
        print()
    return None


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("services", help="service instances, roles, machines and their wiring")
    s.set_defaults(handler=cmd_services)
