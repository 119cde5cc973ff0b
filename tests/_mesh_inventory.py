"""A four-machine inventory for the mesh tests (alpha, beta, gamma, delta;
`web` is a micro VM on the clan network placed on one of the servers)."""

from __future__ import annotations

from clanagent.identity import Identity
from clanagent.inventory.model import Inventory
from tests.test_inventory_parse import base, parse, wg

NAMES = ("alpha", "beta", "gamma", "delta")
TAGS = {"alpha": ["server"], "beta": ["laptop"], "gamma": ["server"], "delta": ["laptop"]}


def make_inventory(idents: dict[str, Identity]) -> Inventory:
    d = base()
    d["machines"] = {}
    for n, name in enumerate(NAMES, 1):
        ident = idents[name]
        d["machines"][name] = {
            "node_key": ident.public_key.hex(),
            "box_key": ident.box_public.hex(),
            "wg_key": wg(n),
            "tags": TAGS[name],
        }
    d["machines"]["alpha"]["endpoints"] = ["198.51.100.7:7946"]
    d["vms"] = {"web": {"tags": ["server"], "kernel": "/k", "networks": ["clan"]}}
    r = parse(d)
    assert r.errors == [], r.errors
    return Inventory(r.doc)


def identities() -> dict[str, Identity]:
    return {name: Identity.generate() for name in NAMES}
