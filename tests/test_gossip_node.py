"""GossipNode as a pure state machine: a tiny in-test router, no sockets."""

from __future__ import annotations

import heapq
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.gossip.config import GossipConfig
from clanagent.gossip.node import (
    GossipNode,
    MemberChanged,
    MsgType,
    PeerMisbehaved,
    Persist,
    RecordAccepted,
    SendTo,
    compound,
)
from clanagent.identity import Identity
from clanagent.store import Store
from clanagent.wire import SignedRecord, pack

CLAN = b"test-clan"


class Router:
    """Delivers SendTo actions after 1 ms; records every other action."""

    def __init__(self, nodes: dict[str, GossipNode]) -> None:
        self.nodes = nodes
        self.q: list = []
        self.seq = 0
        self.now = 0.0
        self.events: list[tuple[float, str, object]] = []
        self.down: set[str] = set()

    def handle(self, src: str, actions) -> None:
        for a in actions:
            if isinstance(a, SendTo):
                self.seq += 1
                heapq.heappush(self.q, (self.now + 0.001, self.seq, a.addr, src, a.data))
            elif isinstance(a, Persist):
                self.handle(src, self.nodes[src].persisted(self.now, a.records))
            else:
                self.events.append((self.now, src, a))

    def run_until(self, t: float) -> None:
        while True:
            live = {a: n for a, n in self.nodes.items() if a not in self.down}
            nd, addr = min((n.next_deadline(), a) for a, n in live.items())
            nq = self.q[0][0] if self.q else float("inf")
            if min(nd, nq) > t:
                self.now = t
                return
            if nq <= nd:
                self.now, _, dst, src, data = heapq.heappop(self.q)
                if dst in live:
                    self.handle(dst, live[dst].receive(self.now, src, data))
            else:
                self.now = nd
                self.handle(addr, live[addr].tick(self.now))


def make_nodes(
    n: int, config=None, stores=None, soft_ttl=None
) -> tuple[Router, dict[str, GossipNode]]:
    config = config or GossipConfig.local()
    nodes = {}
    for i in range(n):
        store = stores[i] if stores else Store.open(None)
        nodes[f"n{i}"] = GossipNode(
            Identity.generate(),
            config,
            addr=f"n{i}",
            clan=CLAN,
            store=store,
            rng=random.Random(i),
            now=0.0,
            name=f"m{i}",
            soft_ttl=soft_ttl,
        )
    router = Router(nodes)
    for i in range(1, n):
        router.handle(f"n{i}", nodes[f"n{i}"].join(0.0, ["n0"]))
    return router, nodes


def test_join_publish_and_converge():
    router, nodes = make_nodes(5)
    # Four join through n0 at once: each learns the others from n0's alive
    # broadcasts (2 transmissions each in the local config) or else from its
    # first push/pull (within one 15 s interval): 8.25 s with these seeds.
    while router.now < 20.0:
        router.run_until(router.now + 0.25)
        if all(sum(m["state"] == "alive" for m in n.members()) == 5 for n in nodes.values()):
            break
    for node in nodes.values():
        assert sum(m["state"] == "alive" for m in node.members()) == 5
    rec, actions = nodes["n3"].publish(router.now, "svc", "k", {"v": 1})
    router.handle("n3", actions)
    router.run_until(router.now + 1.0)
    assert all(n.store.get(rec.origin, "svc", "k") == rec for n in nodes.values())
    accepted = [e for e in router.events if isinstance(e[2], RecordAccepted)]
    assert {src for _, src, _ in accepted} == set(nodes)  # the publisher too
    joined = [e for e in router.events if isinstance(e[2], MemberChanged)]
    assert joined and all(e[2].name.startswith("m") for e in joined)


def test_newer_version_replaces_and_versions_are_per_origin():
    router, nodes = make_nodes(3)
    router.run_until(2.0)
    a = nodes["n1"]
    r1, acts = a.publish(router.now, "k", "x", 1)
    router.handle("n1", acts)
    r2, acts = a.publish(router.now, "k", "y", 2)
    router.handle("n1", acts)
    r3, acts = a.publish(router.now, "k", "x", 3)
    router.handle("n1", acts)
    assert (r1.version, r2.version, r3.version) == (1, 2, 3)
    router.run_until(router.now + 1.0)
    for n in nodes.values():
        assert n.store.get(a.origin, "k", "x").body == 3
        assert n.store.get(a.origin, "k", "y").body == 2


def test_forged_record_is_dropped_counted_and_scores_the_peer_down():
    router, nodes = make_nodes(2)
    router.run_until(2.0)
    target = nodes["n0"]
    honest = Identity.generate()
    rec = SignedRecord.create(honest, "k", "x", 1, {"a": 1}, clan=CLAN)
    data = bytearray(rec.encode())
    data[-1] ^= 1  # break the signature
    datagram = compound([pack([int(MsgType.RECORD), bytes(data)])])
    actions = target.receive(router.now, "evil", datagram)
    assert target.stats["records_invalid"] == 1
    assert target.store.get(rec.origin, "k", "x") is None
    bad = [a for a in actions if isinstance(a, PeerMisbehaved)]
    assert bad and "bad signature" in bad[0].reason and bad[0].score < 0
    assert not any(isinstance(a, SendTo) for a in actions)  # nothing forwarded


def test_wrong_clan_and_unadmitted_origins_are_refused():
    router, nodes = make_nodes(1)
    node = nodes["n0"]
    other = SignedRecord.create(Identity.generate(), "k", "x", 1, 1, clan=b"other")
    node.receive(0.0, "p", compound([pack([int(MsgType.RECORD), other.encode()])]))
    assert node.stats["records_invalid"] == 1 and len(node.store) == 0
    stranger = Identity.generate()
    strict = GossipNode(
        Identity.generate(),
        GossipConfig.local(),
        addr="s",
        clan=CLAN,
        store=Store.open(None),
        rng=random.Random(1),
        now=0.0,
        admit=lambda rec: rec.origin != stranger.public_key,
    )
    rec = SignedRecord.create(stranger, "k", "x", 1, 1, clan=CLAN)
    acts = strict.receive(0.0, "p", compound([pack([int(MsgType.RECORD), rec.encode()])]))
    assert len(strict.store) == 0
    assert any("not admitted" in a.reason for a in acts if isinstance(a, PeerMisbehaved))


def test_a_peer_that_keeps_misbehaving_is_ignored():
    router, nodes = make_nodes(1)
    node = nodes["n0"]
    for _ in range(12):
        node.receive(0.0, "evil", b"\xc1garbage")
    assert node.stats["malformed"] == 10  # then the floor was reached
    assert node.stats["ignored_peer"] == 2
    # another peer is unaffected
    node.receive(0.0, "good", b"\xc1")
    assert node.stats["malformed"] == 11


def test_unknown_message_types_are_skipped_not_punished():
    router, nodes = make_nodes(1)
    node = nodes["n0"]
    acts = node.receive(0.0, "newer", compound([pack([999, {"future": True}])]))
    assert not any(isinstance(a, PeerMisbehaved) for a in acts)
    assert node.stats["unknown_type"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_are_counted_never_raised(data):
    node = GossipNode(
        Identity.generate(),
        GossipConfig.local(),
        addr="x",
        clan=CLAN,
        store=Store.open(None),
        rng=random.Random(0),
        now=0.0,
    )
    node.receive(0.0, "fuzz", data)
    node.receive(0.0, "fuzz", compound([data]) if data else b"")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 12),
            st.binary(max_size=60)
            | st.integers(-(2**63), 2**64 - 1)
            | st.lists(st.integers(-(2**63), 2**64 - 1), max_size=3),
        ),
        max_size=4,
    )
)
def test_well_framed_garbage_messages_never_raise(items):
    node = GossipNode(
        Identity.generate(),
        GossipConfig.local(),
        addr="x",
        clan=CLAN,
        store=Store.open(None),
        rng=random.Random(0),
        now=0.0,
    )
    node.receive(0.0, "fuzz", compound([pack([t, body]) for t, body in items]))


def test_anti_entropy_fills_what_gossip_missed():
    config = GossipConfig.local()
    router, nodes = make_nodes(3, config)
    router.run_until(2.0)
    # n2 is cut off while n1 writes; gossip gives up on it, anti-entropy heals it
    router.down.add("n2")
    recs = []
    for i in range(20):
        rec, acts = nodes["n1"].publish(router.now, "bulk", f"k{i}", i)
        recs.append(rec)
        router.handle("n1", acts)
    router.run_until(router.now + 0.5)
    assert nodes["n2"].store.get(recs[0].origin, "bulk", "k0") is None
    router.down.discard("n2")
    router.run_until(router.now + config.push_pull_interval * 2 + 5)
    assert all(nodes["n2"].store.get(r.origin, r.kind, r.key) for r in recs)
    assert nodes["n2"].antientropy.watermark(recs[0].origin) == recs[-1].version


def test_disk_store_waits_for_persist(tmp_path):
    store = Store.open(tmp_path / "records")
    node = GossipNode(
        Identity.generate(),
        GossipConfig.local(),
        addr="x",
        clan=CLAN,
        store=store,
        rng=random.Random(0),
        now=0.0,
    )
    rec, actions = node.publish(0.0, "k", "x", 1)
    persists = [a for a in actions if isinstance(a, Persist)]
    assert len(persists) == 1 and persists[0].records == (rec,)
    assert store.get(rec.origin, "k", "x") is None  # not before the shell says so
    results = store.put_many(persists[0].records)
    out = node.persisted(0.0, persists[0].records, results)
    assert any(isinstance(a, RecordAccepted) for a in out)
    # a record from a peer is only broadcast onward after it is durable
    peer = Identity.generate()
    prec = SignedRecord.create(peer, "k", "y", 1, 2, clan=CLAN)
    acts = node.receive(0.0, "p", compound([pack([int(MsgType.RECORD), prec.encode()])]))
    (p,) = [a for a in acts if isinstance(a, Persist)]
    node.persist_failed(p.records)  # disk full: forgotten, so it can arrive again
    acts = node.receive(0.0, "p", compound([pack([int(MsgType.RECORD), prec.encode()])]))
    assert any(isinstance(a, Persist) for a in acts)


def test_restarted_node_reasserts_its_records_above_the_old_run():
    router, nodes = make_nodes(3)
    router.run_until(2.0)
    old = nodes["n2"]
    for i in range(3):
        router.handle("n2", old.publish(router.now, "cfg", "main", f"old{i}")[1])
    router.run_until(router.now + 1.0)
    # restart n2 with the same identity and an empty store
    new = GossipNode(
        old.identity,
        GossipConfig.local(),
        addr="n2",
        clan=CLAN,
        store=Store.open(None),
        rng=random.Random(99),
        now=router.now,
    )
    nodes["n2"] = new
    rec, acts = new.publish(router.now, "cfg", "main", "fresh")
    assert rec.version == 1  # it does not know better yet
    router.handle("n2", acts)
    router.handle("n2", new.join(router.now, ["n0"]))
    router.run_until(router.now + 5.0)
    for n in nodes.values():
        held = n.store.get(old.origin, "cfg", "main")
        assert held.body == "fresh" and held.version > 3


@pytest.mark.parametrize("loss_free_leave", [True])
def test_graceful_leave_is_seen_as_left(loss_free_leave):
    router, nodes = make_nodes(4)
    router.run_until(3.0)
    router.handle("n3", nodes["n3"].leave(router.now))
    router.run_until(router.now + 0.5)
    router.down.add("n3")
    router.run_until(router.now + 1.0)
    for a in ("n0", "n1", "n2"):
        assert nodes[a].member_state(nodes["n3"].node_id) == "left"


def test_fast_encoding_is_canonical():
    """encode_message skips pack()'s sorting walk: its bytes must still be pack()'s."""
    from clanagent.gossip.events import (
        Ack,
        Alive,
        Dead,
        IndirectPing,
        MemberState,
        Nack,
        NodeStateEntry,
        Ping,
        PushPull,
        Suspect,
    )
    from clanagent.gossip.messages import _MEMBERSHIP_TYPES, encode_message

    msgs = [
        Ping(1, "a", "b", "b:1"),
        IndirectPing(2, "a", "a:1", "b", "b:1", True),
        Ack(3),
        Nack(4),
        Suspect(5, "a", "b"),
        Alive(6, "a", "a:1", b"meta"),
        Dead(7, "a", "b"),
        PushPull(False, (NodeStateEntry("a", "a:1", 1, MemberState.ALIVE, b""),)),
    ]
    for m in msgs:
        assert encode_message(m) == pack([int(_MEMBERSHIP_TYPES[type(m)]), m.to_wire()])


def test_soft_records_expire_unless_their_origin_refreshes_them():
    """A peer's record of a soft kind lives `soft_ttl(kind)` seconds after its
    last new version arrived; a refresh extends it, durable kinds and our own
    records never expire, and an expired record is not pulled back by
    anti-entropy from a peer that still holds it."""
    ttl = {"status": 20.0}
    router, nodes = make_nodes(3, soft_ttl=ttl.get)
    router.run_until(2.0)
    a, b = nodes["n1"], nodes["n2"]
    router.handle("n1", a.publish(router.now, "status", "s", {"v": 1})[1])
    router.handle("n1", a.publish(router.now, "status", "kept", {"v": 1})[1])
    router.handle("n1", a.publish(router.now, "inventory-ish", "d", {"v": 1})[1])
    router.run_until(router.now + 1.0)
    assert b.store.get(a.origin, "status", "s") is not None
    # "kept" is refreshed (a new version) every 8 s, "s" never again
    t0 = router.now
    while router.now < t0 + 30.0:
        router.run_until(router.now + 8.0)
        router.handle("n1", a.publish(router.now, "status", "kept", {"v": router.now})[1])
    router.run_until(router.now + 1.0)
    for node in (nodes["n0"], b):
        assert node.store.get(a.origin, "status", "s") is None  # expired
        assert node.store.get(a.origin, "status", "kept") is not None  # refreshed
        assert node.store.get(a.origin, "inventory-ish", "d") is not None  # durable
        assert node.stats["soft_expired"] == 1
    assert a.store.get(a.origin, "status", "s") is not None  # our own: never here
    # anti-entropy rounds (push-pull every few seconds in the local profile)
    # do not bring the expired record back
    router.run_until(router.now + 3 * a.config.push_pull_interval)
    assert b.store.get(a.origin, "status", "s") is None


def test_bytes_sent_are_split_by_what_they_were_for():
    router, nodes = make_nodes(4)
    router.run_until(2.0)
    router.handle("n1", nodes["n1"].publish(router.now, "svc", "k", {"v": "x" * 200})[1])
    router.run_until(router.now + 3 * nodes["n1"].config.push_pull_interval)
    for node in nodes.values():
        st = node.stats
        parts = st["bytes_sent_membership"] + st["bytes_sent_gossip"] + st["bytes_sent_ae"]
        assert parts == st["bytes_sent"] > 0
        assert st["bytes_sent_ae"] > 0  # push-pull rounds ran
    assert sum(n.stats["bytes_sent_records"] for n in nodes.values()) >= 3 * 200
    assert nodes["n1"].stats["bytes_sent_gossip"] > 0


def test_big_records_are_pushed_less_often_than_small_ones_soft_least():
    """A soft record over BIG_RECORD bytes (a topology view) costs its bytes
    every time it is pushed and is republished anyway: it gets memberlist's
    plain retransmit budget (anti-entropy brings it to whoever the push
    missed). A small record gets twice that; a big durable one (an inventory
    edit, which the clan waits for) enough that a member misses it with odds
    of about DURABLE_MISS (`durable_push_limit`: 9 in a clan of 6, where the
    plain budget is 4)."""
    from clanagent.gossip.node import BIG_RECORD, RECORD_RETRANSMIT_FACTOR, durable_push_limit

    router, nodes = make_nodes(6, soft_ttl=lambda kind: 60.0 if kind == "status" else None)
    router.run_until(3.0)
    sent: list[bytes] = []
    handle = router.handle

    def spy(src, actions):
        actions = list(actions)
        if src == "n1":
            sent.extend(a.data for a in actions if isinstance(a, SendTo))
        handle(src, actions)

    router.handle = spy
    n1 = nodes["n1"]
    recs = {}
    for name, kind, size in (
        ("small", "svc", 100),
        ("big_durable", "svc", 2 * BIG_RECORD),
        ("big_soft", "status", 2 * BIG_RECORD),
    ):
        recs[name], acts = n1.publish(router.now, kind, name, {"v": "b" * size})
        router.handle("n1", acts)
    router.run_until(router.now + 20.0)
    for node in nodes.values():
        for rec in recs.values():
            assert node.store.get(rec.origin, rec.kind, rec.key) is not None  # all arrive
    pushes = {name: sum(rec.signature in data for data in sent) for name, rec in recs.items()}
    limit = n1.config.retransmit_limit(6)
    assert pushes["small"] == limit * RECORD_RETRANSMIT_FACTOR, pushes
    assert pushes["big_durable"] == durable_push_limit(n1.config.retransmit_mult, 6) == 9, pushes
    assert pushes["big_soft"] == limit, pushes


def test_an_unpushed_refresh_reaches_every_member_by_anti_entropy_about_once_each():
    """`publish(push=False)` (a soft record republished unchanged, only to renew
    its TTL) is not pushed by the epidemic: anti-entropy brings it to each
    member about once, where a pushed record is sent `transmit_limit` times
    by every member."""
    router, nodes = make_nodes(6)
    router.run_until(3.0)
    sent: list[bytes] = []
    handle = router.handle

    def spy(src, actions):
        actions = list(actions)
        sent.extend(a.data for a in actions if isinstance(a, SendTo))
        handle(src, actions)

    router.handle = spy
    n1 = nodes["n1"]
    pushed, acts = n1.publish(router.now, "status", "a", {"v": "p" * 100})
    router.handle("n1", acts)
    quiet, acts = n1.publish(router.now, "status", "b", {"v": "q" * 100}, push=False)
    router.handle("n1", acts)
    router.run_until(router.now + 8 * n1.config.push_pull_interval)
    for node in nodes.values():
        assert node.store.get(n1.origin, "status", "b") == quiet  # it still arrives
    sends = {
        name: sum(rec.signature in data for data in sent)
        for name, rec in (("pushed", pushed), ("quiet", quiet))
    }
    assert sends["pushed"] >= 5 * n1.config.retransmit_limit(6), sends
    assert sends["quiet"] <= 2 * 5, sends  # five members lacked it
    assert n1.stats["published_unpushed"] == 1


def test_the_record_item_size_is_exact_across_msgpack_headers_and_the_push_limit():
    """`_too_big_to_push` reckons a RECORD item's size without encoding it;
    it must agree with the encoded item byte for byte, at the bin-header
    steps (256 and 65536 bytes) and at the gossip budget itself."""
    from clanagent.gossip import node as gnode
    from clanagent.wire import pack_plain

    ident = Identity.generate()
    base = SignedRecord.create(ident, "k", "x", 1, "", clan=CLAN).size
    seen_fit = seen_over = False
    for target in (255, 256, 65535, 65536, gnode._PUSH_MAX - 4):
        for size in range(target - 6, target + 7):
            rec = SignedRecord.create(ident, "k", "x", 1, "y" * max(0, size - base), clan=CLAN)
            item = pack_plain([int(MsgType.RECORD), rec.encode()])
            assert gnode._record_item_size(rec.size) == len(item), rec.size
            assert gnode._too_big_to_push(rec) == (len(item) > gnode._PUSH_MAX)
            seen_fit |= len(item) == gnode._PUSH_MAX
            seen_over |= len(item) == gnode._PUSH_MAX + 1
    assert seen_fit and seen_over
