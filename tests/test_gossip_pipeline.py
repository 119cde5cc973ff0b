"""The record pipeline (`gossip/pipeline.py`) on its own, without a node: its
seam is the two callbacks it is given (`offence`, `spread`) and the store."""

from __future__ import annotations

from typing import Any

from clanagent.gossip import antientropy as ae
from clanagent.gossip.messages import NodeAction, Persist, RecordAccepted
from clanagent.gossip.pipeline import RecordPipeline
from clanagent.identity import Identity, node_id_of
from clanagent.store import Store
from clanagent.wire import SignedRecord

CLAN = b"clan-pipeline"


class Recorder:
    """The node's side of the seam: what the pipeline asked of it."""

    def __init__(self) -> None:
        self.offences: list[tuple[str | None, str, str]] = []
        self.spread: list[tuple[list[SignedRecord], bool, str]] = []

    def offence(self, out: list[NodeAction], node: str | None, addr: str, reason: str) -> None:
        self.offences.append((node, addr, reason))

    def spread_(
        self, now: float, records: Any, rebroadcast: bool, addr: str, out: list[NodeAction]
    ) -> None:
        self.spread.append((list(records), rebroadcast, addr))


def pipeline(store: Store | None = None, **kw: Any) -> tuple[RecordPipeline, Recorder]:
    me = Identity.generate()
    store = store if store is not None else Store.open(None)
    rec = Recorder()
    p = RecordPipeline(
        me,
        clan=CLAN,
        store=store,
        antientropy=ae.AntiEntropy(store, bytes(me.public_key)),
        stats={
            k: 0
            for k in (
                "records_received",
                "records_duplicate",
                "records_stale",
                "records_invalid",
                "records_accepted",
                "records_refused",
                "records_undecodable",
                "records_deferred",
                "records_over_quota",
                "records_over_version",
                "soft_expired",
            )
        },
        offence=rec.offence,
        spread=rec.spread_,
        **kw,
    )
    return p, rec


def test_a_good_record_is_stored_handed_out_and_given_to_the_node_to_spread() -> None:
    p, seen = pipeline()
    origin = Identity.generate()
    r = SignedRecord.create(origin, "svc", "k", 1, {"v": 1}, clan=CLAN)
    out: list[NodeAction] = []
    p.on_record(1.0, "relay:1", "relay", r.encode(), out)
    assert out == [RecordAccepted(r)]
    assert p.store.get(origin.public_key, "svc", "k") == r
    assert seen.spread == [([r], True, "relay:1")] and seen.offences == []
    # Its copies cost a hash from now on.
    p.on_record(2.0, "relay:1", "relay", r.encode(), out)
    assert p.stats["records_duplicate"] == 1 and len(seen.spread) == 1


def test_a_refused_body_scores_its_origin_down_never_a_relay() -> None:
    def refuse(rec: SignedRecord) -> None:
        raise ValueError("no such kind")

    p, seen = pipeline(validate=refuse)
    origin = Identity.generate()
    r = SignedRecord.create(origin, "svc", "k", 1, {"v": 1}, clan=CLAN)
    out: list[NodeAction] = []
    p.on_record(1.0, "relay:1", "relay", r.encode(), out)
    assert out == [] and seen.offences == [] and p.stats["records_refused"] == 1
    r2 = SignedRecord.create(origin, "svc", "k2", 2, {"v": 1}, clan=CLAN)
    p.on_record(1.0, "o:1", node_id_of(origin.public_key), r2.encode(), out)
    assert [o[0] for o in seen.offences] == [node_id_of(origin.public_key)]
    assert "no such kind" in seen.offences[0][2]
    assert seen.spread == []


def test_a_forged_signature_is_the_senders_doing() -> None:
    p, seen = pipeline()
    origin = Identity.generate()
    r = SignedRecord.create(origin, "svc", "k", 1, {"v": 1}, clan=CLAN)
    forged = SignedRecord(r.signer, r.payload, bytes(64))
    p.on_record(1.0, "relay:1", "relay", forged.encode(), [])
    assert seen.offences and seen.offences[0][:2] == ("relay", "relay:1")
    assert p.store.get(origin.public_key, "svc", "k") is None


def test_publish_without_push_is_left_to_anti_entropy(tmp_path) -> None:
    p, seen = pipeline(Store.open(tmp_path / "s"))
    out: list[NodeAction] = []
    rec = p.publish(1.0, "svc", "k", {"v": 1}, out, push=False)
    # A durable store: the shell persists first, then the pipeline goes on.
    assert len(out) == 1 and isinstance(out[0], Persist) and out[0].records == (rec,)
    assert seen.spread == []  # not before it is durable
    results = p.store.put_many((rec,))
    more: list[NodeAction] = []
    p.persisted(2.0, out[0].records, results, more)
    assert more == [RecordAccepted(rec)]
    assert seen.spread == [([rec], False, "")]
    assert p.stats["published_unpushed"] == 1
    # The next version of ours counts up from it.
    assert p.publish(3.0, "svc", "k", {"v": 2}, [], push=True).version == rec.version + 1
