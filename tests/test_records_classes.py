"""The class of every record kind: durable or soft, its TTL and its publish cadence."""

from __future__ import annotations

import dataclasses

import pytest

from clanagent import records
from clanagent.records import KINDS, KindSpec, is_durable, spec

DURABLE = {
    "inventory",
    "node-info",
    "endpoints",
    "export",
    "secret",
    "secret-rotate",
    "vm-request",
}
SOFT = {"topology", "vm-status", "vm-logs", "vm-logs-request", "nat"}


def test_every_kind_has_a_class():
    assert set(KINDS) == DURABLE | SOFT
    assert {k for k in KINDS if is_durable(k)} == DURABLE
    assert {k for k in KINDS if not spec(k).durable} == SOFT


@pytest.mark.parametrize("kind", sorted(DURABLE))
def test_durable_kinds_never_expire(kind):
    s = spec(kind)
    assert s.durable and s.ttl is None and s.refresh is None
    assert s.min_interval >= 0


@pytest.mark.parametrize("kind", sorted(SOFT))
def test_soft_kinds_expire_after_their_refresh(kind):
    s = spec(kind)
    assert not s.durable and s.ttl is not None and s.ttl > 0
    assert 0 < s.min_interval < s.ttl
    if s.refresh is not None:
        # two refreshes per TTL: one lost republish never expires a live record
        assert s.min_interval <= s.refresh <= s.ttl / 2


def test_the_republished_soft_kinds_refresh_periodically():
    # a status that does not change must still be seen while its publisher lives
    # topology: every 300 s in a small clan, stretched with the clan up to
    # the registry's refresh (the longest); three of those fit in the TTL
    from clanagent.topology import refresh_for

    assert spec("topology").refresh == refresh_for(10**6) == 10_000.0
    assert spec("topology").ttl == 30_000.0
    assert refresh_for(3) == 300.0
    assert spec("vm-status").refresh is not None
    # one-shot answers and requests may simply expire
    assert spec("vm-logs").refresh is None and spec("vm-logs-request").refresh is None


def test_unknown_kinds():
    assert spec("no-such-kind") is None
    assert is_durable("no-such-kind") is True  # the safe default
    assert KINDS["topology"] is spec("topology")


@pytest.mark.parametrize(
    "change",
    [
        {"ttl": 10.0},  # durable with a ttl
        {"refresh": 10.0},  # durable with a refresh
        {"durable": False},  # soft without a ttl
        {"durable": False, "ttl": -1.0},
        {"durable": False, "ttl": 10.0, "min_interval": 10.0},
        {"durable": False, "ttl": 10.0, "min_interval": 1.0, "refresh": 6.0},
        {"durable": False, "ttl": 10.0, "min_interval": 2.0, "refresh": 1.0},
        {"min_interval": -1.0},
    ],
)
def test_a_wrong_table_is_caught(change):
    base = KindSpec("x", lambda b: b, lambda r, p, c: None)
    base.check()
    with pytest.raises(AssertionError):
        dataclasses.replace(base, **change).check()


def test_the_registry_checks_itself():
    for kind in KINDS:
        KINDS[kind].check()
    assert records._registry().keys() == set(KINDS)
