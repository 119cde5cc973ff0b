"""GossipNode against hostile members: malformed messages, internal faults,
over-bound versions, refused bodies, quotas and floods (issue 12).  Sans-IO."""

from __future__ import annotations

import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clanagent.gossip.node import GossipNode, MsgType, SendTo, compound
from clanagent.identity import Identity
from clanagent.wire import SignedRecord, pack
from tests.test_gossip_node import CLAN, make_nodes


def _item(mtype: int, body) -> bytes:
    return pack([int(mtype), body])


def _acks(actions) -> list[SendTo]:
    return [a for a in actions if isinstance(a, SendTo)]


# -- 1. crash by a member --------------------------------------------------------


def test_suspect_with_a_list_as_from_node_is_dropped_and_the_node_keeps_working():
    """Regression: a valid Suspect (which starts a suspicion timer) followed by a
    Suspect whose from_node is a list ended the agent (unhashable type)."""
    router, nodes = make_nodes(3)
    router.run_until(2.0)
    n0, n1, n2 = nodes["n0"], nodes["n1"], nodes["n2"]
    inc = n2.incarnation
    data = compound(
        [
            _item(MsgType.SUSPECT, [inc, n2.node_id, n1.node_id]),
            _item(MsgType.SUSPECT, [inc, n2.node_id, ["x"]]),
        ]
    )
    n0.receive(router.now, "n1", data, from_node=n1.node_id)
    assert n0.member_state(n2.node_id) == "suspect"
    c = n0.counters()
    assert c["malformed"] == 1 and c["internal_errors"] == 0
    # Still working: a ping is answered.
    ping = compound([_item(MsgType.PING, [7, n0.node_id, n1.node_id, "n1"])])
    assert _acks(n0.receive(router.now, "n1", ping, from_node=n1.node_id))


def test_an_internal_fault_drops_the_rest_of_the_datagram_counts_and_logs_once(monkeypatch, caplog):
    router, nodes = make_nodes(2)
    router.run_until(2.0)
    n0, n1 = nodes["n0"], nodes["n1"]
    ping = _item(MsgType.PING, [7, n0.node_id, n1.node_id, "n1"])
    real = n0.membership.receive

    def broken(now, from_addr, msg):
        raise RuntimeError("injected")

    monkeypatch.setattr(n0.membership, "receive", broken)
    caplog.set_level(logging.ERROR, logger="clanagent.gossip.node")
    for _ in range(3):
        rec, _ = n1.publish(router.now, "svc", "k", 1)
        # The record after the faulty ping is dropped with the rest of the datagram.
        data = compound([ping, pack([int(MsgType.RECORD), rec.encode()])])
        out = n0.receive(router.now, "n1", data, from_node=n1.node_id)
        assert out == []
    assert n0.counters()["internal_errors"] == 3
    assert n0.store.get(n1.origin, "svc", "k") is None
    assert len([r for r in caplog.records if "internal error" in r.getMessage()]) == 1
    # Not the peer's fault as far as we can tell: not scored down.
    assert n0.peer_scores().get(n1.node_id, 0) == 0
    monkeypatch.setattr(n0.membership, "receive", real)
    assert _acks(n0.receive(router.now, "n1", compound([ping]), from_node=n1.node_id))


def test_fault_log_keys_are_bounded(monkeypatch):
    router, nodes = make_nodes(1)
    n0 = nodes["n0"]

    def broken(now, from_addr, msg):
        raise RuntimeError("injected")

    monkeypatch.setattr(n0.membership, "receive", broken)
    ping = compound([_item(MsgType.PING, [7, n0.node_id, "x", "x"])])
    for i in range(600):
        n0.receive(0.0, f"a{i}", ping)
    assert n0.counters()["internal_errors"] == 600
    assert len(n0._faults_logged) <= 256


# -- structured but wrong messages ------------------------------------------------

_OTHER = Identity.generate()
_RECORD = SignedRecord.create(_OTHER, "svc", "k", 1, {"v": 1}, clan=CLAN).encode()
_ORIGIN = bytes(_OTHER.public_key)

# Per field kind: values that are of the wrong type, size or range.
_WRONG = {
    "seq": [-1, 2**32, True, 1.5, "1", None, b"1", [1], {}],
    "inc": [-1, -(2**63), False, 1.5, "1", None, [1]],
    "id": ["", "x" * 257, 1, None, b"x", ["x"], True, {"a": 1}],
    "opt_addr": ["", "x" * 257, 1, b"x", True, ["x"]],
    "meta": ["x", 1, None, b"x" * 513, [b""], True],
    "bool": [0, 1, None, "true", b"\x01", [True]],
    "state": [-1, 4, True, "0", None, 1.0],
    "origin": [b"x" * 31, b"x" * 33, "x" * 32, None, 1, [b"x"]],
    "version": [-1, 2**64 - 1, True, "1", None, 1.0],
    "record": [b"", b"\x93\x01\x02\x03", "rec", 1, None, b"x" * 100, [_RECORD]],
}


def _templates(node_id: str) -> dict[MsgType, object]:
    """A valid body per message type, with field kinds in place of values."""
    return {
        MsgType.PING: ["seq", "id", "id", "opt_addr"],
        MsgType.INDIRECT_PING: ["seq", "id", "id", "id", "id", "bool"],
        MsgType.ACK: ["seq"],
        MsgType.NACK: ["seq"],
        MsgType.SUSPECT: ["inc", "id", "id"],
        MsgType.ALIVE: ["inc", "id", "id", "meta"],
        MsgType.DEAD: ["inc", "id", "id"],
        MsgType.PUSH_PULL: ["bool", [["id", "id", "inc", "state", "meta"]]],
        MsgType.RECORD: "record",
        MsgType.AE_REQUEST: [["origin", "version"]],
        MsgType.AE_REPLY: {
            "d": {"c": [["origin", "version"]], "r": ["record"]},
            "g": [["origin", "version"]],
        },
    }


_VALID = {
    "seq": 5,
    "inc": 1,
    "id": "peer",
    "opt_addr": "peer:1",
    "meta": b"",
    "bool": False,
    "state": 0,
    "origin": _ORIGIN,
    "version": 1,
    "record": _RECORD,
}


def _leaves(t, path=()):
    """Paths of every field (leaf) and every container of a template."""
    if isinstance(t, str):
        yield path, t
        return
    yield path, None
    items = enumerate(t) if isinstance(t, list) else t.items()
    for k, v in items:
        yield from _leaves(v, (*path, k))


def _materialise(t):
    if isinstance(t, str):
        return _VALID[t]
    if isinstance(t, list):
        return [_materialise(v) for v in t]
    return {k: _materialise(v) for k, v in t.items()}


def _wrong_bodies() -> list[tuple[MsgType, object]]:
    out: list[tuple[MsgType, object]] = []
    for mtype, tmpl in _templates("").items():
        for path, kind in _leaves(tmpl):
            sub = tmpl
            for p in path:
                sub = sub[p]
            if kind is not None:
                wrongs = _WRONG[kind]
            else:
                valid = _materialise(sub)
                wrongs = [None, 1, "x", b"x", True]
                variable = len(sub) == 1 and (isinstance(sub[0], list) or sub[0] == "record")
                if isinstance(valid, list) and variable:
                    wrongs += [[*valid, 1], [*valid, None], {}]
                elif isinstance(valid, list):
                    wrongs += [valid[:-1], [*valid, 1], {}]
                else:
                    wrongs += [{**valid, "z": 1}, dict(list(valid.items())[:-1]), []]
            for w in wrongs:
                out.append((mtype, _replace(tmpl, path, w)))
    return out


def _replace(tmpl, path, w):
    if not path:
        return w
    if isinstance(tmpl, str):
        raise AssertionError
    if isinstance(tmpl, list):
        return [
            _replace(v, path[1:], w) if i == path[0] else _materialise(v)
            for i, v in enumerate(tmpl)
        ]
    return {
        k: (_replace(v, path[1:], w) if k == path[0] else _materialise(v)) for k, v in tmpl.items()
    }


WRONG_BODIES = _wrong_bodies()
_STATE: dict[str, object] = {}


def _shared_node() -> GossipNode:
    node = _STATE.get("node")
    if node is None:
        router, nodes = make_nodes(3)
        router.run_until(2.0)
        node = nodes["n0"]
        _STATE["node"] = node
        _STATE["now"] = router.now
        _STATE["n"] = 0
    return node  # type: ignore[return-value]


def test_every_message_type_and_field_is_covered():
    assert {m for m, _ in WRONG_BODIES} == set(MsgType)
    assert len(WRONG_BODIES) > 300


def test_valid_templates_are_accepted_without_counting():
    node = _shared_node()
    for mtype, tmpl in _templates("").items():
        before = node.counters()
        node.receive(_STATE["now"], "tmpl", compound([_item(mtype, _materialise(tmpl))]))
        after = node.counters()
        assert after["malformed"] == before["malformed"], mtype
        assert after["internal_errors"] == 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(WRONG_BODIES), st.booleans())
def test_structured_but_wrong_messages_are_dropped_and_counted(case, second):
    node = _shared_node()
    _STATE["n"] += 1  # a fresh sender each time, so scoring never silences it
    sender = f"h{_STATE['n']}"
    mtype, body = case
    items = [_item(mtype, body)]
    ping = _item(MsgType.PING, [9, node.node_id, sender, sender])
    if second:
        items.append(ping)
    before = node.counters()
    out = node.receive(_STATE["now"], sender, compound(items))
    after = node.counters()
    dropped = (after["malformed"] - before["malformed"]) + (
        after["records_invalid"] - before["records_invalid"]
    )
    assert dropped == 1, (mtype, body)
    assert after["internal_errors"] == 0
    # The valid message after it in the same datagram is still handled.
    if second:
        assert any(isinstance(a, SendTo) and a.addr == sender for a in out)
    # And the node still answers a fresh valid ping.
    out = node.receive(_STATE["now"], "ok", compound([ping]))
    assert any(isinstance(a, SendTo) for a in out)
