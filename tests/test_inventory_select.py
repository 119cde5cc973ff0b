"""What applies to a machine (select) and the typed views (model)."""

from __future__ import annotations

import base64
import hashlib
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.inventory.model import Inventory, doc_hash
from clanagent.inventory.parse import InventoryInvalid
from clanagent.inventory.select import (
    machines_for,
    path_preference,
    placement,
    roles_of,
    services_of,
    vms_for,
)
from clanagent.wire import pack
from tests.test_inventory_parse import base, edit, parse


def machine(n: int, tags: list[str], **extra) -> dict:
    return {
        "node_key": f"{n:02x}" * 32,
        "box_key": f"{n + 100:02x}" * 32,
        "wg_key": base64.b64encode(bytes([n]) * 32).decode(),
        "tags": tags,
        **extra,
    }


def doc_with(machines: dict, **changes) -> dict:
    d = base()
    d["machines"] = machines
    d["services"]["backup"]["roles"]["server"]["machines"] = []
    for path, value in changes.items():
        edit(path.replace("__", "."), value)(d)
    r = parse(d)
    assert r.errors == [], r.errors
    return r.doc


def fleet(n: int, tag: str = "server") -> dict:
    return {f"m{i}": machine(i + 1, [tag]) for i in range(n)}


def test_machines_for_names_and_tags():
    doc = doc_with({"a": machine(1, ["x"]), "b": machine(2, ["y"]), "c": machine(3, ["x", "y"])})
    assert machines_for(doc, [], ["x"]) == ["a", "c"]
    assert machines_for(doc, ["b"], []) == ["b"]
    assert machines_for(doc, ["c", "b"], ["x"]) == ["a", "b", "c"]
    assert machines_for(doc, ["nope"], ["z"]) == []
    assert machines_for(doc, [], []) == []


def test_roles_and_services_of():
    doc = parse(base()).doc
    assert roles_of(doc, "alpha") == [("backup", "server")]
    assert roles_of(doc, "beta") == [("backup", "client")]
    assert roles_of(doc, "nobody") == []
    assert services_of(doc, "alpha") == ["backup"]
    d = base()
    d["services"]["dns"] = {
        "type": "unbound",
        "roles": {"resolver": {"tags": ["server", "laptop"]}},
    }
    d["services"]["backup"]["roles"]["client"]["machines"] = ["alpha"]
    doc = parse(d).doc
    assert roles_of(doc, "alpha") == [
        ("backup", "client"),
        ("backup", "server"),
        ("dns", "resolver"),
    ]
    assert services_of(doc, "alpha") == ["backup", "dns"]
    assert services_of(doc, "beta") == ["backup", "dns"]


def test_placement_count_and_determinism():
    doc = doc_with(fleet(6), vms__web__count=2)
    placed = placement(doc, "web")
    assert len(placed) == 2 and placed == sorted(placed)
    assert set(placed) <= set(doc["machines"])
    # the same inventory written in another order places identically
    reordered = dict(reversed(list(doc["machines"].items())))
    assert placement({**doc, "machines": reordered}, "web") == placed
    # every machine agrees on who runs it
    assert [m for m in doc["machines"] if "web" in vms_for(doc, m)] == placed
    for m in doc["machines"]:
        assert vms_for(doc, m) == (["web"] if m in placed else [])


def test_placement_is_pinned():
    # Every node must compute the same placement forever: pin the rule.
    doc = doc_with(fleet(6), vms__web__count=2)
    scores = {
        m: hashlib.blake2b(pack(["clanagent-vm-placement-v1", "web", m]), digest_size=16).digest()
        for m in doc["machines"]
    }
    assert placement(doc, "web") == sorted(sorted(scores, key=scores.get)[:2])
    assert placement(doc, "web") == ["m1", "m5"]


def test_the_inventory_answers_placement_as_select_does_once_per_version():
    doc = doc_with(fleet(6), vms__web__count=2)
    inv = Inventory(doc)
    assert inv.placement("web") == tuple(placement(doc, "web")) == ("m1", "m5")
    for m in [*doc["machines"], "nobody"]:
        assert inv.vms_on(m) == tuple(vms_for(doc, m))
    assert inv.placement("nope") == () and inv.vms_on("nobody") == ()
    assert inv.placement("web") is inv.placement("web")  # kept, not recomputed


def test_placement_more_count_than_candidates_and_names():
    doc = doc_with(fleet(2), vms__web__count=5)
    assert placement(doc, "web") == ["m0", "m1"]
    doc = doc_with(fleet(3), vms__web__tags=[], vms__web__machines=["m2"], vms__web__count=1)
    assert placement(doc, "web") == ["m2"]
    assert vms_for(doc, "m2") == ["web"] and vms_for(doc, "m0") == []
    assert placement(doc, "nope") == [] and vms_for(doc, "nope") == []


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 8), count=st.integers(1, 4), new=st.integers(20, 40))
def test_placement_is_stable_when_a_machine_joins(n, count, new):
    before = doc_with(fleet(n), vms__web__count=count)
    machines = fleet(n)
    machines[f"n{new}"] = machine(new + 100, ["server"])
    after = doc_with(machines, vms__web__count=count)
    old, now = set(placement(before, "web")), set(placement(after, "web"))
    assert len(now) == min(count, n + 1)
    # at most one instance moves, and only onto the newcomer
    assert now - old <= {f"n{new}"}
    assert len(old - now) <= 1


def test_path_preference():
    machines = {
        "desk": machine(1, ["server"]),
        "lap": machine(2, ["laptop", "zz"]),
        "hidden": machine(3, ["no-public", "server"]),
        "quiet": machine(4, [], public=False),
        "both": machine(5, ["alpha", "laptop"]),
    }
    doc = doc_with(
        machines,
        networks__by_tag={"laptop": ["tor", "lan"], "zz": ["public"], "alpha": ["public", "tor"]},
        networks__default=["public", "lan", "tor"],
    )
    assert path_preference(doc, "desk") == ["public", "lan", "tor"]
    assert path_preference(doc, "lap") == ["tor", "lan"]  # laptop sorts before zz
    assert path_preference(doc, "hidden") == ["lan", "tor"]
    assert path_preference(doc, "quiet") == ["lan", "tor"]
    assert path_preference(doc, "both") == ["public", "tor"]  # alpha sorts first
    assert path_preference(doc, "unknown") == ["public", "lan", "tor"]


def test_no_public_by_tag_preference_drops_public():
    doc = doc_with(
        {"h": machine(1, ["no-public", "server"])}, networks__by_tag={"server": ["public"]}
    )
    assert path_preference(doc, "h") == []


# ------------------------------------------------------------------- model


def test_inventory_views():
    doc = parse(base()).doc
    inv = Inventory(doc)
    assert inv.clan_id == bytes.fromhex("00112233445566778899aabbccddeeff")
    assert inv.clan_name == "home" and inv.threshold == 1
    assert inv.admins == (b"\xaa" * 32,)
    alpha = inv.machines["alpha"]
    assert alpha.node_key == b"\x11" * 32 and alpha.tags == ("server",) and alpha.public
    assert inv.machine_by_node_key(b"\x21" * 32).name == "beta"
    assert inv.machine_by_node_key(b"\x00" * 32) is None
    assert inv.node_keys() == frozenset({b"\x11" * 32, b"\x21" * 32})
    backup = inv.services["backup"]
    assert backup.roles["server"].machines == ("alpha",)
    assert backup.secrets["repokey"].scope_role == "server"
    assert backup.secrets["sshkey"].scope_role is None
    assert backup.secrets["sshkey"].depends == ("repokey",)
    assert inv.vms["web"].memory_mb == 256 and inv.vms["web"].backend == "auto"
    assert inv.networks.by_tag["laptop"] == ("lan", "tor")
    assert inv.hash == doc_hash(doc) == hashlib.blake2b(pack(doc), digest_size=32).digest()
    assert inv.is_admin(b"\xaa" * 32) and not inv.is_admin(b"\x11" * 32)
    with pytest.raises(TypeError):
        inv.machines["x"] = alpha  # type: ignore[index]
    assert isinstance(inv.machines, types.MappingProxyType)


def test_inventory_settings_are_read_only():
    d = base()
    d["services"]["backup"]["settings"] = {"a": [1, {"b": 2}]}
    inv = Inventory(parse(d).doc)
    s = inv.services["backup"].settings
    assert s["a"][0] == 1 and s["a"][1]["b"] == 2
    with pytest.raises(TypeError):
        s["a"][1]["b"] = 3  # type: ignore[index]


def test_inventory_refuses_invalid_doc():
    doc = parse(base()).doc
    doc["clan"]["threshold"] = 5
    with pytest.raises(InventoryInvalid, match="clan.threshold"):
        Inventory(doc)


def test_doc_hash_ignores_dict_order():
    doc = parse(base()).doc
    flipped = dict(reversed(list(doc.items())))
    assert doc_hash(flipped) == doc_hash(doc)
    other = parse(edit("clan.name", "work")(base())).doc
    assert doc_hash(other) != doc_hash(doc)
