"""Diffing inventory documents and showing the diff to a human."""

from __future__ import annotations

import copy

from hypothesis import given, settings

from clanagent.inventory.diff import Change, diff_docs, format_diff
from clanagent.wire import pack
from tests.test_inventory_parse import base, edit, parse, valid_docs


def doc(*pairs) -> dict:
    r = parse(edit(*pairs)(base()) if pairs else base())
    assert r.errors == [], r.errors
    return r.doc


def test_no_changes():
    a = doc()
    assert diff_docs(a, copy.deepcopy(a)) == []
    assert format_diff([]) == "no changes"


def test_field_change():
    a = doc()
    b = doc("machines.alpha.tags", ["server", "db"])
    changes = diff_docs(a, b)
    assert changes == [Change("change", "machines.alpha.tags", ["server"], ["db", "server"])]
    assert format_diff(changes) == '~ machines.alpha.tags: ["server"] -> ["db", "server"]'


def test_entry_add_and_remove():
    a = doc()
    b = copy.deepcopy(a)
    b["machines"]["gamma"] = dict(a["machines"]["alpha"], node_key=b"\x33" * 32)
    del b["vms"]["web"]
    changes = diff_docs(a, b)
    assert [(c.kind, c.path) for c in changes] == [("add", "machines.gamma"), ("remove", "vms.web")]
    assert changes[0].new == b["machines"]["gamma"] and changes[0].old is None
    assert changes[1].old == a["vms"]["web"] and changes[1].new is None
    assert format_diff(changes) == "+ machines.gamma\n- vms.web"


def test_keys_are_short_hex():
    a = doc()
    b = doc("machines.alpha.node_key", "ab" * 32)
    assert format_diff(diff_docs(a, b)) == "~ machines.alpha.node_key: 111111111111 -> abababababab"
    c = copy.deepcopy(a)
    c["machines"]["alpha"]["sealed_endpoints"] = b"\x01\x02"
    assert format_diff(diff_docs(a, c)) == '~ machines.alpha.sealed_endpoints: "" -> 0102'


def test_nested_tables_are_diffed_key_by_key():
    a = doc()
    b = doc(
        "services.backup.settings",
        {"x": 1, "odd key": "v"},
        "services.backup.roles.server.settings",
        {"port": 22},
        "services.backup.roles.extra",
        {},
    )
    changes = diff_docs(a, b)
    assert [(c.kind, c.path) for c in changes] == [
        ("add", "services.backup.roles.extra"),
        ("add", "services.backup.roles.server.settings.port"),
        ("add", 'services.backup.settings."odd key"'),
        ("add", "services.backup.settings.x"),
    ]
    assert format_diff(changes).splitlines() == [
        "+ services.backup.roles.extra",
        "+ services.backup.roles.server.settings.port = 22",
        '+ services.backup.settings."odd key" = "v"',
        "+ services.backup.settings.x = 1",
    ]
    assert format_diff(diff_docs(b, a)).splitlines()[0] == "- services.backup.roles.extra"


def test_sections_in_reading_order():
    a = doc()
    b = doc(
        "vms.web.count", 2, "clan.threshold", 1, "clan.name", "work", "networks.default", ["tor"]
    )
    assert [c.path for c in diff_docs(a, b)] == ["clan.name", "networks.default", "vms.web.count"]
    assert format_diff(diff_docs(a, b)).splitlines() == [
        '~ clan.name: "home" -> "work"',
        '~ networks.default: ["lan", "public", "tor"] -> ["tor"]',
        "~ vms.web.count: 1 -> 2",
    ]


def test_from_nothing():
    a = doc()
    changes = diff_docs(None, a)
    assert [(c.kind, c.path) for c in changes] == [
        ("add", "format"),
        ("add", "clan"),
        ("add", "machines"),
        ("add", "networks"),
        ("add", "services"),
        ("add", "vms"),
    ]
    assert format_diff(changes).splitlines()[:2] == ["+ format = 1", "+ clan"]
    assert [c.kind for c in diff_docs(a, None)] == ["remove"] * 6


def test_values_equal_in_python_but_not_on_the_wire_differ():
    assert diff_docs({"s": {"v": 1}}, {"s": {"v": True}}) == [Change("change", "s.v", 1, True)]
    assert len(diff_docs({"s": {"v": 0.0}}, {"s": {"v": -0.0}})) == 1


@settings(max_examples=100, deadline=None)
@given(valid_docs(), valid_docs())
def test_diff_is_empty_exactly_when_docs_are_equal(a, b):
    changes = diff_docs(a, b)
    assert (changes == []) == (pack(a) == pack(b))
    assert diff_docs(a, a) == []
    # reversing swaps adds and removes
    back = diff_docs(b, a)
    flip = {"add": "remove", "remove": "add", "change": "change"}
    assert [(flip[c.kind], c.path) for c in back] == [(c.kind, c.path) for c in changes]
    assert isinstance(format_diff(changes), str)
