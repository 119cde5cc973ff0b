"""The clan map: link classification, merging both ends' views, record checks."""

from __future__ import annotations

import pytest

from clanagent.topology import (
    TopologyService,
    _bucket,
    _parse_body,
    classify_addr,
    merge_links,
)


@pytest.mark.parametrize(
    "addr, kind",
    [
        ("127.0.0.1:7946", "lan"),
        ("10.1.2.3:7946", "lan"),
        ("[fe80::1]:7946", "lan"),
        ("[fd00::1]:7946", "lan"),
        ("8.8.8.8:7946", "public"),
        ("[2001:4860::8888]:7946", "public"),
        ("abcdefghijklmnop.onion:7946", "tor"),
        ("host.example:7946", "other"),
        ("", "other"),
    ],
)
def test_addresses_are_classified(addr, kind):
    assert classify_addr(addr) == kind


def link(peer, kind, rtt=1.0):
    return {"peer": peer, "kind": kind, "rtt_ms": rtt}


def test_one_edge_per_pair_up_when_either_end_sees_it():
    views = {
        "a": [link("b", "lan", 0.5), link("c", "down", None)],
        "b": [link("a", "lan", 0.7), link("c", "tor", 300.0)],
        "c": [link("a", "public", 20.0), link("b", "tor", 310.0)],
    }
    edges = merge_links(views, {"a", "b", "c"})
    assert [(e["a"], e["b"], e["kind"], e["rtt_ms"]) for e in edges] == [
        ("a", "b", "lan", 0.5),
        ("a", "c", "public", 20.0),  # a's session is down, c reaches a
        ("b", "c", "tor", 300.0),
    ]
    assert edges[1]["seen_by"]["a"]["kind"] == "down"


def test_an_offline_machine_has_only_down_links():
    views = {"a": [link("b", "lan")], "b": [link("a", "lan")]}
    assert merge_links(views, {"a"})[0]["kind"] == "down"
    assert merge_links({"a": [link("a", "lan")]}, {"a"}) == []  # no self loops


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"links": [], "capabilities": []},
        {"at": "1", "links": [], "capabilities": []},
        {"at": 1, "links": [{"peer": "b", "kind": "wormhole", "rtt_ms": 1}], "capabilities": []},
        {"at": 1, "links": [{"peer": 5, "kind": "lan"}], "capabilities": []},
        {"at": 1, "links": ["x"], "capabilities": []},
    ],
)
def test_malformed_records_are_ignored(body):
    assert _parse_body(body) is None


def test_records_are_cleaned():
    body = {
        "at": 5,
        "links": [{"peer": "b", "kind": "lan", "rtt_ms": -3}],
        "capabilities": [
            {"name": "kvm", "available": True, "reason": "x" * 1000},
            {"name": 3, "available": True},
        ],
    }
    parsed = _parse_body(body)
    assert parsed["links"] == [{"peer": "b", "kind": "lan", "rtt_ms": None}]
    assert len(parsed["capabilities"]) == 1 and len(parsed["capabilities"][0]["reason"]) == 300


def test_rtt_jitter_does_not_republish():
    assert _bucket(1.0) == _bucket(1.1)
    assert _bucket(1.0) != _bucket(4.0)
    a = {"links": [link("b", "lan", 1.0)], "capabilities": []}
    b = {"links": [link("b", "lan", 1.1)], "capabilities": []}
    c = {"links": [link("b", "down", None)], "capabilities": []}
    assert TopologyService._shape(a) == TopologyService._shape(b) != TopologyService._shape(c)
