"""The ports module: by-kind dispatch with fault isolation, and the agent's ports."""

from __future__ import annotations

from clanagent.identity import Identity
from clanagent.ports import Subscriptions
from clanagent.wire import SignedRecord

IDENT = Identity.generate()


def rec(kind: str, key: str = "", version: int = 1) -> SignedRecord:
    return SignedRecord.create(IDENT, kind, key, version, {"v": version})


def test_a_record_reaches_only_the_handlers_of_its_kind():
    subs = Subscriptions()
    got: dict[str, list[str]] = {"a": [], "ab": []}
    subs.subscribe(["a"], lambda r: got["a"].append(r.kind))
    subs.subscribe(["a", "b"], lambda r: got["ab"].append(r.kind))
    for kind in ("a", "b", "c"):
        subs.dispatch(rec(kind))
    assert got == {"a": ["a"], "ab": ["a", "b"]}
    assert subs.kinds() == {"a", "b"}


def test_a_failing_handler_is_counted_and_the_others_still_hear(caplog):
    subs = Subscriptions()
    heard = []

    def broken(_r):
        raise KeyError("bug")

    subs.subscribe(["a"], broken)
    subs.subscribe(["a"], lambda r: heard.append(r.key))
    subs.dispatch(rec("a", "k1"))
    subs.dispatch(rec("a", "k2", 2))
    assert heard == ["k1", "k2"] and subs.faults == 2
    assert "record handler failed" in caplog.text


def test_node_membership_follows_the_node_it_is_given_and_isolates_faults():
    from types import SimpleNamespace

    from clanagent.ports import NodeMembership

    current: list = [None]
    view = NodeMembership(lambda: current[0])
    assert view.state("x") is None and view.rows() == [] and not view.synced()
    current[0] = SimpleNamespace(
        member_state=lambda nid: "alive" if nid == "x" else None,
        members=lambda: [{"node_id": "x", "state": "alive"}],
        stats={"ae_synced": 1},
    )
    assert view.state("x") == "alive" and view.rows()[0]["node_id"] == "x" and view.synced()
    heard = []
    view.subscribe(lambda: 1 / 0)
    view.subscribe(lambda: heard.append(1))
    view.changed()
    assert heard == [1] and view.faults == 1
