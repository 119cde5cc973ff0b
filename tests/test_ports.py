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


def test_a_member_the_node_forgot_keeps_its_last_state_until_it_returns():
    """memberlist reaps a dead or left member after gossip_to_the_dead_time;
    `clanctl machines` and the map still say "left" (not "unknown") for it,
    until it is seen again. A new node (clan change) starts afresh."""
    from types import SimpleNamespace

    from clanagent.ports import NodeMembership

    table = {"a": "alive", "b": "alive"}

    def fake_node():
        return SimpleNamespace(
            member_state=table.get,
            members=lambda: [{"node_id": n, "state": s} for n, s in table.items()],
            stats={},
        )

    node = fake_node()
    view = NodeMembership(lambda: node)
    table["b"] = "left"
    view.changed()  # the node tells: b left
    del table["b"]  # ... and later reaps it
    assert view.state("b") == "left"
    assert {r["node_id"]: r["state"] for r in view.rows()} == {"a": "alive", "b": "left"}
    table["b"] = "alive"  # b comes back
    assert {r["node_id"]: r["state"] for r in view.rows()} == {"a": "alive", "b": "alive"}
    del table["b"]  # gone without a word (never seen dead or left): unknown
    assert view.state("b") is None and [r["node_id"] for r in view.rows()] == ["a"]
    table["b"] = "dead"
    view.rows()
    del table["b"]
    node = fake_node()  # a clan change: a new node
    assert view.state("b") is None and [r["node_id"] for r in view.rows()] == ["a"]


def test_a_change_of_one_member_notes_that_member_without_listing_all():
    """A 1000-machine join is 1000 changes: listing every member on each made
    it N^2 rows per agent. Told which member changed, the view looks at it alone."""
    from types import SimpleNamespace

    from clanagent.ports import NodeMembership

    table = {f"m{i}": "alive" for i in range(1000)}
    listed = []

    def members():
        listed.append(1)
        return [{"node_id": n, "state": s} for n, s in table.items()]

    def member_row(nid):
        return None if nid not in table else {"node_id": nid, "state": table[nid]}

    node = SimpleNamespace(member_state=table.get, members=members, member_row=member_row, stats={})
    view = NodeMembership(lambda: node)
    view.rows()  # the first look at this node
    listed.clear()
    for i in range(1, 1000):
        view.changed(f"m{i}")
    assert listed == []
    table["m7"] = "left"
    view.changed("m7")
    del table["m7"]  # reaped
    assert view.state("m7") == "left"
    assert listed == []
    table["m7"] = "alive"  # back
    view.changed("m7")
    assert view.state("m7") == "alive"
    assert [r for r in view.rows() if r["node_id"] == "m7"] == [{"node_id": "m7", "state": "alive"}]
