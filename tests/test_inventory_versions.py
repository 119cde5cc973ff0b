"""Tests for clanagent.inventory.versions: signed versions, validity rules, the DAG and head."""

from __future__ import annotations

import copy
import random
from typing import Any

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.inventory.versions import (
    INVENTORY_SIGNATURE_DOMAIN,
    InventoryHistory,
    InventoryVersion,
    LocalInventoryError,
    OfferStatus,
    Policy,
    RejectReason,
    TrustAnchor,
    check_signatures,
    make_version,
    sign,
    signing_message,
)
from clanagent.wire import WireError, pack, unpack

CLAN = bytes(range(16))
KEYS = [nacl.signing.SigningKey(bytes([i + 1]) * 32) for i in range(5)]
PUB = [bytes(k.verify_key) for k in KEYS]


def no_issues(doc: dict[str, Any]) -> list[Any]:
    return []


def make_doc(admins=(0,), threshold=1, clan=CLAN, machines=None, **extra) -> dict[str, Any]:
    doc = {
        "format": 1,
        "clan": {
            "id": clan,
            "name": "home",
            "admins": sorted(PUB[i] for i in admins),
            "threshold": threshold,
        },
        "machines": machines if machines is not None else {},
        "networks": {"default": ["lan"], "by_tag": {}},
        "services": {},
        "vms": {},
    }
    doc.update(extra)
    return doc


def machine(n: int, tags=()) -> dict[str, Any]:
    return {"node_key": bytes([n]) * 32, "tags": sorted(tags)}


def history(admins=(0,), validate=no_issues, **kw) -> InventoryHistory:
    return InventoryHistory(TrustAnchor(CLAN, frozenset(PUB[i] for i in admins)), validate, **kw)


def genesis(h: InventoryHistory, admins=(0,), threshold=1, signers=(0,)) -> InventoryVersion:
    v = make_version(make_doc(admins, threshold), [], 1000, "init", [KEYS[i] for i in signers])
    r = h.offer(v)
    assert r.status is OfferStatus.ACCEPTED, r
    return v


def edit(doc: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    for path, value in changes.items():
        section, _, name = path.partition("__")
        if value is None:
            out[section].pop(name, None)
        elif name:
            out[section][name] = value
        else:
            out[section] = value
    return out


# ------------------------------------------------------------- the value


def test_hash_excludes_signatures_and_signing_is_sorted_one_per_key():
    v = make_version(make_doc(), [], 5, "m")
    s1 = sign(sign(v, KEYS[2]), KEYS[0])
    s2 = sign(sign(s1, KEYS[0]), KEYS[2])  # re-signing replaces, does not duplicate
    assert v.hash == s1.hash == s2.hash
    assert [k for k, _ in s1.sigs] == sorted([PUB[0], PUB[2]])
    assert len(s2.sigs) == 2
    assert check_signatures(s1, Policy(frozenset(PUB[:3]), 1)) == {PUB[0], PUB[2]}
    # Only admins of the policy count.
    assert check_signatures(s1, Policy(frozenset([PUB[2]]), 1)) == {PUB[2]}
    # The signature is over the domain-separated hash.
    key, sig = s1.sigs[0]
    nacl.signing.VerifyKey(key).verify(INVENTORY_SIGNATURE_DOMAIN + v.hash, sig)
    assert signing_message(v.hash) == INVENTORY_SIGNATURE_DOMAIN + v.hash


def test_hash_changes_with_every_hashed_field():
    base = make_version(make_doc(), [], 5, "m")
    others = [
        make_version(make_doc(threshold=1, admins=(0, 1)), [], 5, "m"),
        make_version(make_doc(), [b"\x01" * 32], 5, "m"),
        make_version(make_doc(), [], 6, "m"),
        make_version(make_doc(), [], 5, "n"),
    ]
    assert len({base.hash, *(o.hash for o in others)}) == 5


def test_wire_round_trip_through_bytes():
    v = make_version(make_doc(), [b"\x02" * 32, b"\x01" * 32], 7, "hello", KEYS[:2])
    back = InventoryVersion.from_wire(unpack(pack(v.to_wire())))
    assert back == v and back.hash == v.hash and back.parents == (b"\x01" * 32, b"\x02" * 32)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda w: w.pop("sigs"), "missing"),
        (lambda w: w.update(extra=1), "unknown"),
        (lambda w: w.update(doc=[]), "doc"),
        (lambda w: w.update(parents=[b"\x01" * 31]), "parents"),
        (lambda w: w.update(parents=[b"\x02" * 32, b"\x01" * 32]), "sorted"),
        (lambda w: w.update(parents=[b"\x01" * 32, b"\x01" * 32]), "sorted"),
        (lambda w: w.update(time=-1), "time"),
        (lambda w: w.update(time=True), "time"),
        (lambda w: w.update(message="x" * 501), "message"),
        (lambda w: w.update(sigs=[[b"\x01" * 32, b"\x00" * 63]]), "sigs"),
        (lambda w: w.update(sigs=[[b"\x01" * 32, b"\x00" * 64, 1]]), "sigs"),
        (lambda w: w.update(sigs=[[b"\x02" * 32, b"\0" * 64], [b"\x01" * 32, b"\0" * 64]]), "sigs"),
        (lambda w: w.update(sigs=[(b"\x01" * 32, b"\x00" * 64)]), "sigs"),
    ],
)
def test_from_wire_rejects_malformed(mutate, reason):
    w = make_version(make_doc(), [], 7, "m", KEYS[:1]).to_wire()
    mutate(w)
    with pytest.raises(WireError, match=reason):
        InventoryVersion.from_wire(w)


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=70)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)
version_like = st.fixed_dictionaries(
    {
        "doc": st.dictionaries(st.text(max_size=8), wire_values, max_size=3) | wire_values,
        "parents": st.lists(st.binary(min_size=31, max_size=33), max_size=3) | wire_values,
        "time": st.integers(-5, 2**64 - 1) | wire_values,
        "message": st.text(max_size=10) | wire_values,
        "sigs": st.lists(
            st.lists(st.binary(min_size=31, max_size=65), min_size=1, max_size=3), max_size=3
        )
        | wire_values,
    }
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(wire_values, version_like))
def test_from_wire_arbitrary_values_give_version_or_wire_error(value):
    try:
        v = InventoryVersion.from_wire(value)
    except WireError:
        return
    # Whatever is accepted round-trips exactly.
    assert InventoryVersion.from_wire(unpack(pack(v.to_wire()))) == v


# ------------------------------------------------------------- validity


def test_first_version_accepted_and_head_is_its_doc():
    h = history()
    v = genesis(h)
    head = h.head()
    assert head.doc == v.doc and head.leaves == (v.hash,) and head.conflicts == ()
    assert head.version_hashes == {v.hash}
    assert h.get(v.hash) == v and v.hash in h and len(h) == 1


def test_first_version_must_match_anchor():
    h = history(admins=(1,))  # the anchor trusts admin 1 only
    v = make_version(make_doc((0,)), [], 1, "x", [KEYS[0]])
    r = h.offer(v)
    assert r.status is OfferStatus.REJECTED and r.reason is RejectReason.ANCHOR_MISMATCH
    other_clan = make_version(make_doc((1,), clan=b"\xff" * 16), [], 1, "x", [KEYS[1]])
    r = h.offer(other_clan)
    assert r.reason is RejectReason.ANCHOR_MISMATCH
    assert len(h) == 0 and h.rejected_counts == {"anchor-mismatch": 2}
    # A doc that keeps the anchored admin and adds another is fine.
    ok = make_version(make_doc((0, 1)), [], 1, "x", [KEYS[1]])
    assert h.offer(ok).status is OfferStatus.ACCEPTED


def test_non_admin_signature_is_rejected():
    h = history()
    g = genesis(h)
    v = make_version(edit(g.doc, machines__a=machine(1)), [g.hash], 2, "x", [KEYS[3]])
    r = h.offer(v)
    assert r.status is OfferStatus.REJECTED and r.reason is RejectReason.UNDER_SIGNED
    assert h.head().leaves == (g.hash,) and v.hash not in h


def test_under_signed_threshold_two():
    h = history()
    g = genesis(h, admins=(0, 1), threshold=2, signers=(0, 1))
    child = edit(g.doc, machines__a=machine(1))
    one = make_version(child, [g.hash], 2, "x", [KEYS[0]])
    r = h.offer(one)
    assert r.reason is RejectReason.UNDER_SIGNED and "1 admin signature" in r.detail
    # An extra non-admin signature does not make up the difference.
    r = h.offer(sign(one, KEYS[4]))
    assert r.reason is RejectReason.UNDER_SIGNED
    two = sign(one, KEYS[1])
    assert h.offer(two).status is OfferStatus.ACCEPTED
    assert h.log()[0].signers == tuple(sorted(PUB[:2]))


def test_first_version_under_its_own_threshold_is_rejected():
    h = history()
    v = make_version(make_doc((0, 1), threshold=2), [], 1, "x", [KEYS[0]])
    assert h.offer(v).reason is RejectReason.UNDER_SIGNED


def test_admin_rotation_is_signed_by_old_admins_then_old_admin_is_powerless():
    h = history()
    g = genesis(h)  # admin 0
    rotated_doc = edit(g.doc, clan=make_doc((1,))["clan"])
    # Signed only by the NEW admin: the parent's policy (admin 0) is not met.
    bad = make_version(rotated_doc, [g.hash], 2, "rotate", [KEYS[1]])
    assert h.offer(bad).reason is RejectReason.UNDER_SIGNED
    rot = make_version(rotated_doc, [g.hash], 2, "rotate", [KEYS[0]])
    assert h.offer(rot).status is OfferStatus.ACCEPTED
    # Now admin 0 alone can no longer sign the next version; admin 1 can.
    nxt = edit(rotated_doc, machines__a=machine(1))
    assert h.offer(make_version(nxt, [rot.hash], 3, "x", [KEYS[0]])).reason is (
        RejectReason.UNDER_SIGNED
    )
    assert h.offer(make_version(nxt, [rot.hash], 3, "x", [KEYS[1]])).status is (
        OfferStatus.ACCEPTED
    )


def test_every_parent_policy_must_be_met():
    h = history(admins=(0,))
    g = genesis(h)
    a = make_version(edit(g.doc, clan=make_doc((0, 1))["clan"]), [g.hash], 2, "add 1", [KEYS[0]])
    b = make_version(edit(g.doc, clan=make_doc((0, 2))["clan"]), [g.hash], 2, "add 2", [KEYS[0]])
    assert h.offer(a).status is h.offer(b).status is OfferStatus.ACCEPTED
    merged = edit(g.doc, clan=make_doc((0, 1, 2))["clan"])
    # Signed by 1 only: parent a's policy is met, parent b's is not.
    v = make_version(merged, [a.hash, b.hash], 3, "merge", [KEYS[1]])
    assert h.offer(v).reason is RejectReason.UNDER_SIGNED
    # Signed by 1 and 2: each parent's policy is met by one of them.
    v = make_version(merged, [a.hash, b.hash], 3, "merge", [KEYS[1], KEYS[2]])
    assert h.offer(v).status is OfferStatus.ACCEPTED
    v = make_version(merged, [a.hash, b.hash], 3, "merge by 0", [KEYS[0]])
    assert h.offer(v).status is OfferStatus.ACCEPTED


def test_clan_id_change_is_rejected():
    h = history()
    g = genesis(h)
    v = make_version(make_doc(clan=b"\x01" * 16), [g.hash], 2, "x", [KEYS[0]])
    assert h.offer(v).reason is RejectReason.CLAN_ID_CHANGED


def test_doc_failing_validation_is_rejected_warnings_are_not():
    class Issue:
        def __init__(self, severity: str) -> None:
            self.severity = severity

        def __str__(self) -> str:
            return f"{self.severity}: machines.bad"

    def validate(doc):
        return [Issue("error")] if "bad" in doc["machines"] else [Issue("warning")]

    h = history(validate=validate)
    g = genesis(h)
    v = make_version(edit(g.doc, machines__bad=machine(1)), [g.hash], 2, "x", [KEYS[0]])
    r = h.offer(v)
    assert r.reason is RejectReason.INVALID_DOC and "machines.bad" in r.detail

    def crashing(doc):
        raise KeyError("boom")

    h2 = history(validate=crashing)
    r = h2.offer(make_version(make_doc(), [], 1, "x", [KEYS[0]]))
    assert r.reason is RejectReason.INVALID_DOC


def test_doc_without_usable_policy_is_rejected():
    h = history()
    doc = make_doc()
    doc["clan"]["threshold"] = 2  # more than the single admin
    assert h.offer(make_version(doc, [], 1, "x", [KEYS[0]])).reason is RejectReason.BAD_POLICY


def test_forged_and_tampered_signatures_are_rejected():
    h = history()
    g = genesis(h)
    v = make_version(edit(g.doc, machines__a=machine(1)), [g.hash], 2, "x", [KEYS[0]])
    key, sig = v.sigs[0]
    flipped = bytes([sig[0] ^ 1]) + sig[1:]
    forged = InventoryVersion(v.doc, v.parents, v.time, v.message, [(key, flipped)])
    r = h.offer(forged)
    assert r.reason is RejectReason.BAD_SIGNATURE
    # A valid signature moved onto different content does not verify either.
    moved = InventoryVersion(v.doc, v.parents, v.time, "other message", v.sigs)
    assert h.offer(moved).reason is RejectReason.BAD_SIGNATURE
    # A good version plus a garbage extra signature is rejected whole.
    extra = InventoryVersion(
        v.doc, v.parents, v.time, v.message, sorted([*v.sigs, (PUB[4], b"\0" * 64)])
    )
    assert h.offer(extra).reason is RejectReason.BAD_SIGNATURE
    assert h.rejected_counts == {"bad-signature": 3}
    assert h.offer(v).status is OfferStatus.ACCEPTED


def test_replay_of_old_version_is_a_duplicate_and_head_stays():
    h = history()
    g = genesis(h)
    v = make_version(edit(g.doc, machines__a=machine(1)), [g.hash], 2, "x", [KEYS[0]])
    h.offer(v)
    before = h.head()
    assert h.offer(g).status is OfferStatus.DUPLICATE
    assert h.offer(InventoryVersion.from_wire(g.to_wire())).status is OfferStatus.DUPLICATE
    assert h.head() == before and h.head().leaves == (v.hash,)
    assert h.rejected_counts == {}


def test_pending_until_parent_arrives_with_chain_release():
    h = history()
    g = make_version(make_doc(), [], 1, "g", [KEYS[0]])
    a = make_version(edit(g.doc, machines__a=machine(1)), [g.hash], 2, "a", [KEYS[0]])
    b = make_version(edit(a.doc, machines__b=machine(2)), [a.hash], 3, "b", [KEYS[0]])
    bad = make_version(edit(a.doc, machines__c=machine(3)), [a.hash], 3, "c", [KEYS[3]])
    assert h.offer(b).status is OfferStatus.PENDING
    assert h.offer(bad).status is OfferStatus.PENDING
    assert h.offer(b).status is OfferStatus.DUPLICATE
    assert h.offer(a).status is OfferStatus.PENDING
    assert h.head().doc is None and set(h.pending) == {a.hash, b.hash, bad.hash}
    r = h.offer(g)
    assert r.status is OfferStatus.ACCEPTED and r.accepted == (g.hash, a.hash, b.hash)
    assert h.head().leaves == (b.hash,) and h.pending == ()
    assert h.rejected_counts == {"under-signed": 1}


def test_pending_is_capped_oldest_dropped():
    h = history(max_pending=3)
    g = make_version(make_doc(), [], 1, "g", [KEYS[0]])
    kids = [
        make_version(edit(g.doc, machines__a=machine(i)), [g.hash], 2, "k", [KEYS[0]])
        for i in range(5)
    ]
    for k in kids:
        h.offer(k)
    assert h.pending == tuple(k.hash for k in kids[2:])
    assert h.rejected_counts == {"pending-overflow": 2}
    r = h.offer(g)
    assert set(r.accepted) == {g.hash, *(k.hash for k in kids[2:])}


def test_pending_overflow_of_zero_rejects_offered_version():
    h = history(max_pending=0)
    v = make_version(make_doc(), [b"\x09" * 32], 1, "g", [KEYS[0]])
    r = h.offer(v)
    assert r.status is OfferStatus.REJECTED and r.reason is RejectReason.PENDING_OVERFLOW


# ------------------------------------------------------------- DAG, merge, log


def test_concurrent_edits_merge_and_resolution_clears_conflicts():
    h = history(admins=(0, 1))
    g = genesis(h, admins=(0, 1), signers=(0,))
    base = edit(g.doc, machines__shared=machine(9), machines__gone=machine(8))
    b = make_version(base, [g.hash], 2, "base", [KEYS[0]])
    h.offer(b)
    left_doc = edit(
        base,
        machines__left=machine(1),  # only left adds
        machines__shared=machine(9, ["l"]),  # both change differently: conflict
        machines__gone=None,  # left deletes ...
        machines__same=machine(5),  # both add the same: no conflict
    )
    right_doc = edit(
        base,
        machines__right=machine(2),
        machines__shared=machine(9, ["r"]),
        machines__gone=machine(8, ["x"]),  # ... right modifies: conflict
        machines__same=machine(5),
        networks={"default": ["tor"], "by_tag": {}},  # only right changes a single entry
    )
    left = make_version(left_doc, [b.hash], 3, "left", [KEYS[0]])
    right = make_version(right_doc, [b.hash], 3, "right", [KEYS[1]])
    h.offer(left)
    h.offer(right)
    head = h.head()
    assert set(head.leaves) == {left.hash, right.hash}
    m = head.doc["machines"]
    assert m["left"] == machine(1) and m["right"] == machine(2) and m["same"] == machine(5)
    assert m["shared"] == machine(9) and m["gone"] == machine(8)  # conflicts keep base
    assert head.doc["networks"] == {"default": ["tor"], "by_tag": {}}
    by_name = {(c.section, c.name): c for c in head.conflicts}
    assert set(by_name) == {("machines", "gone"), ("machines", "shared")}
    gone = by_name[("machines", "gone")]
    assert gone.base == machine(8)
    assert dict(gone.variants) == {left.hash: None, right.hash: machine(8, ["x"])}
    # The log lists newest first, children before parents, deterministically.
    log = h.log()
    assert [e.hash for e in log][-2:] == [b.hash, g.hash]
    assert {e.hash for e in log[:2]} == {left.hash, right.hash}
    # An admin resolves: a version whose parents are both leaves.
    resolved_doc = edit(head.doc, machines__shared=machine(9, ["l", "r"]))
    res = h.new_version(resolved_doc, message="resolve", now=4, signing_keys=[KEYS[1]])
    assert res.parents == tuple(sorted([left.hash, right.hash]))
    assert h.offer(res).status is OfferStatus.ACCEPTED
    head = h.head()
    assert head.leaves == (res.hash,) and head.conflicts == () and head.doc == resolved_doc
    assert h.is_ancestor(left.hash, res.hash) and not h.is_ancestor(res.hash, left.hash)
    assert h.lowest_common_ancestor(left.hash, right.hash) == b.hash


def test_new_version_refuses_what_would_be_rejected():
    h = history()
    g = genesis(h)
    with pytest.raises(LocalInventoryError, match="under-signed"):
        h.new_version(g.doc | {"vms": {"x": {}}}, message="m", now=2, signing_keys=[KEYS[1]])
    with pytest.raises(LocalInventoryError, match="not a version we hold"):
        h.new_version(g.doc, message="m", now=2, signing_keys=[KEYS[0]], parents=[b"\1" * 32])
    with pytest.raises(LocalInventoryError, match="message"):
        h.new_version(g.doc, message="m" * 600, now=2, signing_keys=[KEYS[0]])
    v = h.new_version(g.doc, message="same doc", now=2, signing_keys=[KEYS[0]], parents=[g])
    assert v.parents == (g.hash,) and h.offer(v).status is OfferStatus.ACCEPTED


def test_lowest_common_ancestor_ties_go_to_lowest_hash():
    h = history()
    g = genesis(h)
    x = make_version(edit(g.doc, machines__x=machine(1)), [g.hash], 2, "x", [KEYS[0]])
    y = make_version(edit(g.doc, machines__y=machine(2)), [g.hash], 2, "y", [KEYS[0]])
    h.offer(x)
    h.offer(y)
    both = edit(g.doc, machines__x=machine(1), machines__y=machine(2))
    p = make_version(both, [x.hash, y.hash], 3, "p", [KEYS[0]])
    q = make_version(both, [x.hash, y.hash], 3, "q", [KEYS[0]])
    h.offer(p)
    h.offer(q)
    # Common ancestors of p and q: x, y (depth 1) and g; the lowest hash of x, y wins.
    assert h.lowest_common_ancestor(p.hash, q.hash) == min(x.hash, y.hash)
    assert h.lowest_common_ancestor(p.hash, b"\0" * 32) is None
    assert h.is_ancestor(g.hash, p.hash) and not h.is_ancestor(p.hash, p.hash)


def _random_dag(seed: int) -> list[InventoryVersion]:
    """A genesis plus random concurrent edits on random earlier versions."""
    rng = random.Random(seed)
    g = make_version(make_doc(admins=(0, 1)), [], 1, "g", [KEYS[0]])
    versions = [g]
    for i in range(rng.randint(2, 7)):
        parents = rng.sample(versions, k=min(len(versions), rng.choice([1, 1, 2])))
        doc = copy.deepcopy(parents[0].doc)
        for _ in range(rng.randint(1, 3)):
            name = rng.choice(["a", "b", "c", "d"])
            op = rng.random()
            if op < 0.3:
                doc["machines"].pop(name, None)
            else:
                doc["machines"][name] = machine(rng.randint(1, 3), [str(i)])
        if rng.random() < 0.2:
            doc["networks"] = {"default": [rng.choice(["lan", "tor"])], "by_tag": {}}
        key = KEYS[rng.randint(0, 1)]
        versions.append(make_version(doc, [p.hash for p in parents], 2 + i, f"v{i}", [key]))
    return versions


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.randoms(use_true_random=False))
def test_head_is_independent_of_arrival_order(seed, rnd):
    versions = _random_dag(seed)
    first = history(admins=(0, 1))
    for v in versions:
        first.offer(v)
    shuffled = list(versions)
    rnd.shuffle(shuffled)
    second = history(admins=(0, 1))
    for v in shuffled:
        second.offer(v)
    assert len(first) == len(second) == len(versions)
    h1, h2 = first.head(), second.head()
    assert h1.doc == h2.doc and h1.leaves == h2.leaves and h1.conflicts == h2.conflicts
    assert pack(h1.doc) == pack(h2.doc)
    assert first.log() == second.log()


# ------------------------------------------------------------- with the real validator

REAL_TOML = """
[clan]
id = "000102030405060708090a0b0c0d0e0f"
name = "home"
admins = ["{admin}"]
threshold = 1

[machines.alpha]
node_key = "{node}"
box_key = "{box}"
wg_key = "{wg}"
tags = ["server"]
endpoints = ["198.51.100.7:7946"]
"""


def real_doc() -> dict[str, Any]:
    import base64

    from clanagent.inventory.parse import load_inventory_toml

    text = REAL_TOML.format(
        admin=PUB[0].hex(),
        node=PUB[1].hex(),
        box=(b"\x05" * 32).hex(),
        wg=base64.b64encode(b"\x06" * 32).decode(),
    )
    result = load_inventory_toml(text)
    assert result.ok, result.errors
    return result.doc


def test_default_validator_is_the_real_one():
    h = InventoryHistory(TrustAnchor(CLAN, frozenset([PUB[0]])))  # validate=None
    doc = real_doc()
    g = make_version(doc, [], 1, "init", [KEYS[0]])
    assert h.offer(g).status is OfferStatus.ACCEPTED
    broken = copy.deepcopy(doc)
    broken["machines"]["alpha"]["tags"] = ["b", "a"]  # not sorted: invalid canonical doc
    r = h.offer(make_version(broken, [g.hash], 2, "x", [KEYS[0]]))
    assert r.reason is RejectReason.INVALID_DOC and "machines.alpha" in r.detail


def test_resealed_real_doc_still_validates():
    from clanagent.inventory.parse import validate_doc
    from clanagent.inventory.sealing import reseal_doc

    sealed = reseal_doc(real_doc(), {})
    assert validate_doc(sealed) == []
    h = InventoryHistory(TrustAnchor(CLAN, frozenset([PUB[0]])))
    assert h.offer(make_version(sealed, [], 1, "init", [KEYS[0]])).status is OfferStatus.ACCEPTED


def test_issue_severity_enum_warning_does_not_reject():
    import enum

    class Level(enum.Enum):
        WARNING = "warning"
        ERROR = "error"

    class Issue:
        def __init__(self, level: Level) -> None:
            self.level = level

    h = history(validate=lambda doc: [Issue(Level.WARNING)])
    assert h.offer(make_version(make_doc(), [], 1, "x", [KEYS[0]])).status is OfferStatus.ACCEPTED
    h = history(validate=lambda doc: [Issue(Level.WARNING), Issue(Level.ERROR)])
    r = h.offer(make_version(make_doc(), [], 1, "x", [KEYS[0]]))
    assert r.reason is RejectReason.INVALID_DOC and "1 error(s)" in r.detail


def test_versions_lists_parents_first_so_a_reload_never_goes_pending():
    source = history(admins=(0, 1))
    for v in reversed(_random_dag(7)):
        source.offer(v)
    reloaded = history(admins=(0, 1))
    for v in source.versions():
        assert reloaded.offer(v).status is OfferStatus.ACCEPTED
    assert reloaded.head() == source.head()


def test_merged_head_that_fails_validation_reports_issues():
    def refs_ok(doc):
        # A toy rule: every vm names only existing machines.
        return [
            f"vms.{n}: unknown machine {m}"
            for n, vm in doc["vms"].items()
            for m in vm["machines"]
            if m not in doc["machines"]
        ]

    h = history(validate=refs_ok)
    g = make_version(make_doc(machines={"a": machine(1)}), [], 1, "g", [KEYS[0]])
    h.offer(g)
    left = make_version(edit(g.doc, vms__w={"machines": ["a"]}), [g.hash], 2, "l", [KEYS[0]])
    right = make_version(edit(g.doc, machines__a=None), [g.hash], 2, "r", [KEYS[0]])
    assert h.offer(left).status is h.offer(right).status is OfferStatus.ACCEPTED
    head = h.head()
    assert head.conflicts == () and head.issues == ("vms.w: unknown machine a",)
    assert h.offer(make_version(g.doc, [left.hash, right.hash], 3, "fix", [KEYS[0]])).accepted
    assert h.head().issues == ()
