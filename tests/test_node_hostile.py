"""GossipNode against hostile members: malformed messages, internal faults,
over-bound versions, refused bodies, quotas and floods (issue 12).  Sans-IO."""

from __future__ import annotations

import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clanagent.gossip.config import GossipConfig, RecordLimits
from clanagent.gossip.node import GossipNode, MsgType, PeerMisbehaved, Persist, SendTo, compound
from clanagent.identity import Identity, node_id_of
from clanagent.store import Store, file_name
from clanagent.wire import (
    MAX_RECORD_VERSION,
    RECORD_SIGNATURE_DOMAIN,
    SignedRecord,
    WireError,
    pack,
)
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


def test_a_flood_of_suspicions_makes_a_node_probe_a_bounded_number_of_members():
    """A hostile member accuses every other member at once: each accusation
    may make us a witness (we probe the suspect), but never more than
    MAX_WITNESS_PROBES at a time, and nobody is declared dead for it."""
    from clanagent.gossip.membership import MAX_WITNESS_PROBES
    from clanagent.wire import unpack

    router, nodes = make_nodes(40, config=GossipConfig.lan())
    router.run_until(8.0)
    n0, n1 = nodes["n0"], nodes["n1"]
    n0.membership._rng.random = lambda: 0.0  # worst case: witness every time
    items = [
        _item(MsgType.SUSPECT, [node.incarnation, node.node_id, n1.node_id])
        for name, node in nodes.items()
        if name not in ("n0", "n1")
    ]
    out = n0.receive(router.now, "n1", compound(items), from_node=n1.node_id)
    pinged = {
        a.node_id for a in _acks(out) for mtype, _ in unpack(a.data)[1] if mtype == MsgType.PING
    }
    assert len(pinged) == MAX_WITNESS_PROBES
    assert n0.membership.stats["witness_overflow"] == len(items) - MAX_WITNESS_PROBES
    router.handle("n0", out)
    router.run_until(router.now + 30.0)
    assert all(n0.member_state(node.node_id) == "alive" for node in nodes.values())


def test_forged_accusations_about_us_get_no_answers_and_real_ones_one_each():
    """Suspects about us are answered directly only when the accuser itself
    sent them: a member forging accusers cannot make us send for them."""
    router, nodes = make_nodes(4)
    router.run_until(3.0)
    n0, n1 = nodes["n0"], nodes["n1"]
    others = [nodes[f"n{i}"].node_id for i in (2, 3)]
    forged = [_item(MsgType.SUSPECT, [1, n0.node_id, who]) for who in others * 20]
    n0.receive(router.now, "n1", compound(forged), from_node=n1.node_id)
    assert n0.membership.stats["refute_direct"] == 0
    own = [_item(MsgType.SUSPECT, [1, n0.node_id, n1.node_id])] * 20
    out = n0.receive(router.now, "n1", compound(own), from_node=n1.node_id)
    assert n0.membership.stats["refute_direct"] == 20  # one answer per accusation sent
    assert all(a.node_id == n1.node_id for a in _acks(out))


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
                # (an AE reply's digest "g" may be nil)
                wrongs = [1, "x", b"x", True] + ([] if path == ("g",) else [None])
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


# -- helpers for record tests --------------------------------------------------------


def _raw_record(ident: Identity, kind: str, key: str, version: int, body, clan=CLAN):
    """A correctly signed record at any version `decode` admits (create refuses >= 2**53)."""
    payload = pack({"clan": clan, "kind": kind, "key": key, "version": version, "body": body})
    sig = ident.sign(RECORD_SIGNATURE_DOMAIN + payload)
    return SignedRecord(bytes(ident.public_key), payload, sig)


def _node(store=None, **kw) -> GossipNode:
    return GossipNode(
        Identity.generate(),
        GossipConfig.local(),
        addr="me",
        clan=CLAN,
        store=store if store is not None else Store.open(None),
        rng=random.Random(1),
        now=0.0,
        **kw,
    )


def _records_datagram(recs) -> bytes:
    return compound([pack([int(MsgType.RECORD), r.encode()]) for r in recs])


def _scored(actions) -> list[PeerMisbehaved]:
    return [a for a in actions if isinstance(a, PeerMisbehaved)]


# -- 2. version bound -------------------------------------------------------------------


def test_create_refuses_versions_at_or_over_the_bound():
    ident = Identity.generate()
    assert MAX_RECORD_VERSION == 2**53
    SignedRecord.create(ident, "k", "x", MAX_RECORD_VERSION - 1, 1)
    for v in (MAX_RECORD_VERSION, 2**63 - 1):
        with pytest.raises(WireError):
            SignedRecord.create(ident, "k", "x", v, 1)


def test_node_refuses_over_bound_records_scores_the_origin_not_a_relay():
    node = _node()
    origin = Identity.generate()
    rec = _raw_record(origin, "svc", "k", 2**63 - 1, 1)
    # From the origin itself: counted and scored.
    out = node.receive(1.0, "o", _records_datagram([rec]), from_node=origin.node_id)
    assert node.counters()["records_over_version"] == 1
    assert _scored(out) and node.store.get(rec.origin, "svc", "k") is None
    # Relayed by someone else: counted, the relay is not scored.
    rec2 = _raw_record(origin, "svc", "k2", MAX_RECORD_VERSION, 1)
    out = node.receive(1.0, "r", _records_datagram([rec2]), from_node="relay")
    assert node.counters()["records_over_version"] == 2 and not _scored(out)
    # Through anti-entropy, too; the claim cannot move the watermark.
    delta = {
        "c": [[rec.origin, 2**63 - 1]],
        "r": [_raw_record(origin, "svc", "k3", 2**60, 1).encode()],
    }
    node.receive(1.0, "r", compound([pack([int(MsgType.AE_REPLY), {"d": delta, "g": None}])]))
    assert node.counters()["records_over_version"] == 3
    assert node.antientropy.digest().get(rec.origin, 0) == 0
    assert len(node.store) == 0


def test_store_quarantines_over_bound_records_and_the_agent_still_publishes(tmp_path):
    ident = Identity.generate()
    store = Store.open(tmp_path / "s")
    assert store.put(SignedRecord.create(ident, "node", "self", 5, {"a": 1}, clan=CLAN))
    # What an earlier agent wrote: its own record at 2**63-1 (put refuses it now,
    # so write the file as the old store did).
    huge = _raw_record(ident, "svc", "x", 2**63 - 1, 1)
    (tmp_path / "s" / file_name(huge.origin, "svc", "x")).write_bytes(huge.encode())
    reopened = Store.open(tmp_path / "s")  # must not raise
    assert reopened.stats["over_version"] == 1
    assert reopened.get(huge.origin, "svc", "x") is None
    assert reopened.max_version(huge.origin) == 5
    assert len(list((tmp_path / "s" / "corrupt").iterdir())) == 1
    node = GossipNode(
        ident,
        GossipConfig.local(),
        addr="me",
        clan=CLAN,
        store=reopened,
        rng=random.Random(1),
        now=0.0,
    )
    rec, actions = node.publish(1.0, "svc", "x", {"v": 2})
    assert rec.version == 6
    for a in actions:
        if isinstance(a, Persist):
            node.persisted(1.0, a.records)
    assert Store.open(tmp_path / "s").get(rec.origin, "svc", "x").version == 6


def test_store_refuses_over_bound_puts_and_publish_skips_held_over_bound():
    store = Store.open(None)
    ident = Identity.generate()
    assert not store.put(_raw_record(ident, "svc", "x", MAX_RECORD_VERSION, 1, clan=b""))
    assert store.stats["refused_over_version"] == 1
    # A store that holds one anyway (injected): publish still picks a valid version.
    node = GossipNode(
        ident,
        GossipConfig.local(),
        addr="me",
        clan=CLAN,
        store=store,
        rng=random.Random(1),
        now=0.0,
    )
    bad = _raw_record(ident, "svc", "x", 2**63 - 1, 1)
    with store._lock:
        store._set_nolock((bad.origin, "svc", "x"), bad)
    store.put(SignedRecord.create(ident, "svc", "y", 3, 1, clan=CLAN))
    rec, _ = node.publish(1.0, "svc", "z", 1)
    assert rec.version == 4
    assert store.get(rec.origin, "svc", "z") == rec


# -- 3. quotas and the validate hook --------------------------------------------------


def test_store_quota_per_origin_counts_bytes_and_replacements_by_delta():
    q = RecordLimits(
        max_records_per_origin=3, max_bytes_per_origin=10_000, max_records=5, max_bytes=10**6
    )
    store = Store.open(None, quota=q)
    a, b, me = Identity.generate(), Identity.generate(), Identity.generate()
    recs = [SignedRecord.create(a, "svc", f"k{i}", i + 1, "x") for i in range(4)]
    assert store.put_many(recs) == [True, True, True, False]
    assert store.stats["refused_quota"] == 1
    assert store.over_quota(recs[3]) is not None
    # A newer version of a held key replaces it: no new record is counted.
    newer = SignedRecord.create(a, "svc", "k0", 10, "y" * 100)
    assert store.put(newer)
    count, size = store.usage(a.public_key)
    assert count == 3 and size == sum(r.size for r in (newer, recs[1], recs[2]))
    # Bytes per origin.
    big = SignedRecord.create(b, "svc", "big", 1, b"z" * 9_000)
    assert store.put(big)
    assert not store.put(SignedRecord.create(b, "svc", "big2", 2, b"z" * 2_000))
    # Totals (5 records): a's 3 + b's 1 + one more, then full for others...
    assert store.put(SignedRecord.create(b, "svc", "s", 3, 1))
    assert not store.put(SignedRecord.create(b, "svc", "t", 4, 1))
    # ... but not for a reserved origin (our own), which has its per-origin quota.
    store.reserve(me.public_key)
    assert store.put(SignedRecord.create(me, "svc", "mine", 1, 1))
    assert store.usage() == (6, store.usage()[1])
    # Deleting gives room back (our record counts in the totals too: 6 of 5).
    assert store.delete(b.public_key, "svc", "s")
    assert not store.put(SignedRecord.create(b, "svc", "t", 4, 1))
    assert store.delete(b.public_key, "svc", "big")
    assert store.put(SignedRecord.create(b, "svc", "t", 4, 1))


def test_store_load_moves_what_is_beyond_the_quota_aside_lowest_versions_kept(tmp_path):
    a = Identity.generate()
    store = Store.open(tmp_path / "s")
    recs = [SignedRecord.create(a, "junk", f"k{i}", i + 1, i) for i in range(10)]
    assert all(store.put_many(recs))
    q = RecordLimits(max_records_per_origin=4)
    reopened = Store.open(tmp_path / "s", quota=q)
    assert reopened.usage(a.public_key)[0] == 4
    assert [r.version for r in reopened.by_origin(a.public_key)] == [1, 2, 3, 4]
    assert reopened.stats["over_quota"] == 6
    assert len(list((tmp_path / "s" / "corrupt").iterdir())) == 6
    assert Store.open(tmp_path / "s", quota=q).usage(a.public_key)[0] == 4


class Refusal(ValueError):
    def __init__(self, why: str, transient: bool = False) -> None:
        super().__init__(why)
        self.transient = transient


def test_validate_hook_refuses_scores_only_the_origin_and_defers_transient():
    decisions: dict[str, Exception | None] = {}

    def validate(rec):
        exc = decisions.get(rec.kind)
        if exc is not None:
            raise exc

    node = _node(validate=validate)
    origin = Identity.generate()
    decisions["junk"] = Refusal("unknown kind")
    decisions["later"] = Refusal("inventory not known yet", transient=True)
    junk = SignedRecord.create(origin, "junk", "k", 1, 1, clan=CLAN)
    # Relayed: refused and counted, the relay is not scored for the content.
    out = node.receive(1.0, "r", _records_datagram([junk]), from_node="relay")
    assert node.counters()["records_refused"] == 1 and not _scored(out)
    # From its origin: scored down.
    junk2 = SignedRecord.create(origin, "junk", "k2", 2, 1, clan=CLAN)
    out = node.receive(1.0, "o", _records_datagram([junk2]), from_node=origin.node_id)
    assert node.counters()["records_refused"] == 2 and _scored(out)
    assert len(node.store) == 0
    # Transient: deferred, not scored, not stored -- and taken when it comes again.
    later = SignedRecord.create(origin, "later", "k", 3, 1, clan=CLAN)
    out = node.receive(1.0, "o", _records_datagram([later]), from_node=origin.node_id)
    assert node.counters()["records_deferred"] == 1 and not _scored(out)
    assert node.store.get(later.origin, "later", "k") is None
    decisions["later"] = None
    node.receive(2.0, "o", _records_datagram([later]), from_node=origin.node_id)
    assert node.store.get(later.origin, "later", "k") == later
    # A bad signature stays the sender's fault, relay or not.
    forged = bytearray(SignedRecord.create(origin, "svc", "k", 4, 1, clan=CLAN).encode())
    forged[-1] ^= 1
    data = compound([pack([int(MsgType.RECORD), bytes(forged)])])
    assert _scored(node.receive(3.0, "r", data, from_node="relay"))


def test_refused_records_in_anti_entropy_do_not_move_the_watermark():
    def validate(rec):
        if rec.kind == "junk":
            raise Refusal("unknown kind")

    node = _node(validate=validate)
    origin = Identity.generate()
    good = SignedRecord.create(origin, "svc", "a", 1, 1, clan=CLAN)
    junk = SignedRecord.create(origin, "junk", "b", 2, 1, clan=CLAN)
    delta = {"c": [[good.origin, 2]], "r": [good.encode(), junk.encode()]}
    node.receive(1.0, "r", compound([pack([int(MsgType.AE_REPLY), {"d": delta, "g": None}])]))
    assert node.store.get(good.origin, "svc", "a") == good
    assert node.counters()["records_refused"] == 1
    assert node.antientropy.digest().get(good.origin, 0) <= 1


def test_over_quota_records_are_refused_counted_and_the_origin_scored():
    node = _node(store=Store.open(None, quota=RecordLimits(max_records_per_origin=2)))
    origin = Identity.generate()
    recs = [SignedRecord.create(origin, "svc", f"k{i}", i + 1, i, clan=CLAN) for i in range(3)]
    out = node.receive(1.0, "o", _records_datagram(recs), from_node=origin.node_id)
    assert node.counters()["records_over_quota"] == 1 and len(_scored(out)) == 1
    assert node.store.usage(origin.public_key)[0] == 2


# -- 4. score recovery ----------------------------------------------------------------


def test_scores_decay_and_an_ignored_peer_is_heard_again():
    node = _node()
    ping = compound([_item(MsgType.PING, [1, node.node_id, "p", "p"])])
    bad = compound([_item(MsgType.PING, [1, 2, 3, 4])])
    for _ in range(10):
        node.receive(0.0, "p", bad, from_node="p")
    assert node.peer_scores()["p"] == -100
    assert node.receive(1.0, "p", ping, from_node="p") == []  # ignored at the floor
    assert node.counters()["ignored_peer"] == 1
    node.receive(61.0, "x", ping)  # time passes
    assert node.peer_scores()["p"] == -99
    assert _acks(node.receive(61.0, "p", ping, from_node="p"))
    node.receive(100 * 60.0 + 1, "x", ping)
    assert node.peer_scores()["p"] == 0


def test_the_score_table_is_capped():
    node = _node()
    bad = compound([_item(MsgType.PING, [1, 2, 3, 4])])
    for i in range(5000):
        node.receive(0.0, f"a{i}", bad)
    scores = node.peer_scores()
    assert len(scores) == 4096 and "a4999" in scores and "a0" not in scores


def test_counters_name_every_drop_reason():
    c = _node().counters()
    for k in (
        "internal_errors",
        "records_refused",
        "records_deferred",
        "records_over_quota",
        "records_over_version",
        "malformed",
        "records_invalid",
    ):
        assert c[k] == 0


# -- 5. a junk flood ------------------------------------------------------------------

FLOOD = 30_000
_FLOOD_CACHE: list[SignedRecord] = []


def _flood_records() -> list[SignedRecord]:
    if not _FLOOD_CACHE:
        flooder = Identity.generate()
        _FLOOD_CACHE.extend(
            SignedRecord.create(flooder, "junk", f"j{i}", i + 1, {"pad": "x" * 64}, clan=CLAN)
            for i in range(FLOOD)
        )
    return _FLOOD_CACHE


def _push_flood(node: GossipNode, recs, from_node: str, per_datagram: int = 100) -> float:
    import time

    t0 = time.perf_counter()
    for i in range(0, len(recs), per_datagram):
        out = node.receive(
            1.0, from_node, _records_datagram(recs[i : i + per_datagram]), from_node=from_node
        )
        for a in out:
            if isinstance(a, Persist):
                node.persisted(1.0, a.records)
    return time.perf_counter() - t0


def _legit_still_stored(node: GossipNode) -> None:
    legit = Identity.generate()
    recs = [SignedRecord.create(legit, "svc", f"k{i}", i + 1, i, clan=CLAN) for i in range(20)]
    node.receive(2.0, "friend", _records_datagram(recs), from_node=legit.node_id)
    assert all(node.store.get(r.origin, r.kind, r.key) == r for r in recs)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["unknown-kind", "over-quota"])
@pytest.mark.parametrize("sender", ["origin", "relay"])
def test_a_30000_record_flood_is_bounded_and_legit_records_still_get_in(how, sender, capsys):
    recs = _flood_records()
    quota = RecordLimits()

    def validate(rec):
        if rec.kind != "svc":
            raise Refusal(f"unknown kind {rec.kind!r}")

    node = _node(
        store=Store.open(None, quota=quota),
        validate=validate if how == "unknown-kind" else None,
    )
    from_node = node_id_of(recs[0].origin) if sender == "origin" else "relay"
    elapsed = _push_flood(node, recs, from_node)
    held, size = node.store.usage(recs[0].origin)
    c = node.counters()
    if how == "unknown-kind":
        assert held == 0
    else:
        assert held <= quota.max_records_per_origin and size <= quota.max_bytes_per_origin
    if sender == "relay":
        # Every record was looked at: all counted, the relay never scored.
        dropped = c["records_refused"] + c["records_over_quota"]
        assert dropped == FLOOD - held
        assert node.peer_scores() == {}
    else:
        # The origin is silenced at the score floor after ten refusals.
        assert c["ignored_peer"] > 0 and node.peer_scores()[from_node] <= -100
    # Memory bounded: the dedup cache and the rebroadcast queue stay bounded.
    queued = len(node._rq) + len(node._rq_big)
    assert len(node._records._seen) <= 65536 and queued <= quota.max_records_per_origin
    _legit_still_stored(node)
    with capsys.disabled():
        print(f"\nflood {how} via {sender}: {FLOOD} records in {elapsed:.2f} s, stored {held}")


def test_a_batch_the_store_refuses_for_quota_is_counted_and_keeps_the_watermark():
    node = _node(store=Store.open(None, quota=RecordLimits(max_records_per_origin=2)))
    origin = Identity.generate()
    recs = [SignedRecord.create(origin, "svc", f"k{i}", i + 1, i, clan=CLAN) for i in range(3)]
    delta = {"c": [[origin.public_key, 3]], "r": [r.encode() for r in recs]}
    node.receive(1.0, "r", compound([pack([int(MsgType.AE_REPLY), {"d": delta, "g": None}])]))
    assert node.store.usage(origin.public_key)[0] == 2
    assert node.counters()["records_over_quota"] == 1
    assert node.antientropy.digest().get(origin.public_key, 0) == 2


def test_every_wrong_body_is_dropped_and_counted_exhaustively():
    """The same property as the hypothesis test, over the whole table once."""
    node = _shared_node()
    for mtype, body in WRONG_BODIES:
        _STATE["n"] += 1
        sender = f"x{_STATE['n']}"
        before = node.counters()
        node.receive(_STATE["now"], sender, compound([_item(mtype, body)]))
        after = node.counters()
        dropped = (after["malformed"] - before["malformed"]) + (
            after["records_invalid"] - before["records_invalid"]
        )
        assert dropped == 1 and after["internal_errors"] == 0, (mtype, body)


def test_own_versions_never_go_backwards_after_a_restart_that_forgot_them():
    """Soft records are not on disk: a restarted node's store does not know how
    far its versions went. With a wall clock, the next version is at least the
    clock in ms (so above anything published before the restart), and a
    counter above the clock still wins."""
    ident = Identity.generate()
    clock = [1_700_000_000.0]

    def node_over(store: Store) -> GossipNode:
        return GossipNode(
            ident,
            GossipConfig.local(),
            addr="me",
            clan=CLAN,
            store=store,
            rng=random.Random(1),
            now=0.0,
            wall_clock=lambda: clock[0],
        )

    before, _ = node_over(Store.open(None)).publish(1.0, "svc", "x", {"v": 1})
    assert before.version >= 1_700_000_000_000
    clock[0] += 5.0  # restarted 5 s later, knowing nothing
    after, _ = node_over(Store.open(None)).publish(1.0, "svc", "y", {"v": 1})
    assert after.version > before.version
    ahead = Store.open(None)
    assert ahead.put(_raw_record(ident, "svc", "z", after.version + 10**6, 1, clan=CLAN))
    again, _ = node_over(ahead).publish(1.0, "svc", "x", {"v": 2})
    assert again.version == after.version + 10**6 + 1


def test_versions_count_by_one_after_the_first_of_a_run():
    """Only the first record of a run is floored at the clock; the rest are
    consecutive, so peers advance their watermarks on each broadcast instead
    of waiting for an anti-entropy exchange with us (which resent our latest
    records on every idle exchange)."""
    ident = Identity.generate()
    clock = [1_700_000_000.0]
    node = GossipNode(
        ident,
        GossipConfig.local(),
        addr="me",
        clan=CLAN,
        store=Store.open(None),
        rng=random.Random(1),
        now=0.0,
        wall_clock=lambda: clock[0],
    )
    first, _ = node.publish(1.0, "svc", "a", {"v": 1})
    clock[0] += 60.0
    second, _ = node.publish(2.0, "svc", "b", {"v": 1})
    third, _ = node.publish(3.0, "svc", "a", {"v": 2})
    assert first.version >= 1_700_000_000_000
    assert (second.version, third.version) == (first.version + 1, first.version + 2)
