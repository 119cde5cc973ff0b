"""Secret records and rotate requests: building, strict parsing, tampering, choosing current."""

from __future__ import annotations

import copy

import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clanagent.identity import Identity
from clanagent.secrets.crypto import open_payload, recover_payload
from clanagent.secrets.model import SecretInstance
from clanagent.secrets.record import (
    SecretBody,
    build_rotate_request,
    build_secret_record,
    choose_current,
    open_body,
    parse_rotate_request,
    parse_secret_record,
)
from clanagent.wire import SignedRecord, WireError, pack, unpack

INST = SecretInstance("svc", "key", "role:server")
T0 = 1_700_000_000


def _make(n=2, generation=1, created=T0, maker=0, public=None):
    ids = [Identity.generate() for _ in range(n)]
    admin = nacl.signing.SigningKey.generate()
    rec = build_secret_record(
        ids[maker],
        INST,
        generation,
        created,
        {"private": b"s3cret"},
        public or {"public": b"pub"},
        {i.public_key: i.box_public for i in ids},
        [bytes(admin.verify_key)],
        inputs={"svc/other": 2},
    )
    return ids, admin, rec


def _resign(ident, rec, body):
    return SignedRecord.create(ident, rec.kind, rec.key, rec.version, body)


def test_round_trip_through_bytes():
    ids, admin, rec = _make()
    again = SignedRecord.decode(rec.encode())
    body = parse_secret_record(again)
    assert body.instance == INST and body.generation == 1 and body.created == T0
    assert body.recipients == sorted(i.public_key for i in ids)
    assert body.public == {"public": b"pub"} and body.inputs == {"svc/other": 2}
    assert rec.key == "svc/key" and rec.version == 1 and rec.origin == ids[0].public_key
    for i in ids:
        assert open_payload(body.nonce, body.ciphertext, body.keys, i.public_key, i.box_key) == {
            "private": b"s3cret"
        }
    assert recover_payload(body.nonce, body.ciphertext, body.keys, admin) == {"private": b"s3cret"}
    per_machine = SecretInstance("svc", "own", "alpha")
    r2 = build_secret_record(
        ids[0], per_machine, 1, T0, {"v": b"x"}, {}, {ids[0].public_key: ids[0].box_public}, []
    )
    assert r2.key == "svc/own@alpha" and parse_secret_record(r2).instance == per_machine


def test_forged_fields_are_rejected():
    ids, _, rec = _make()
    signer = ids[0]

    def forged(**changes):
        body = copy.deepcopy(rec.body)
        body.update(changes)
        return _resign(signer, rec, body)

    for bad in (
        forged(generation=0),
        forged(created=-1),
        forged(recipients=list(reversed(rec.body["recipients"]))),
        forged(recipients=[]),
        forged(recipients=rec.body["recipients"][:1]),  # keys no longer match recipients
        forged(admins=[]),
        forged(nonce=b"x" * 23),
        forged(ciphertext=b"x"),
        forged(public={"../etc/passwd": b"x"}),
        forged(keys={k: v[:-1] for k, v in rec.body["keys"].items()}),
        forged(service="../x"),
        forged(scope="role:../x"),
        forged(inputs={"nope": 1}),
        forged(extra=1),
        forged(generation=True),
    ):
        with pytest.raises(WireError):
            parse_secret_record(bad)
    # the key must agree with the body (the version is the origin's own record
    # counter, which gossip assigns; the generation lives in the body)
    body = rec.body
    with pytest.raises(WireError, match="key"):
        parse_secret_record(SignedRecord.create(signer, "secret", "svc/other", 1, body))
    assert parse_secret_record(SignedRecord.create(signer, "secret", "svc/key", 7, body))
    with pytest.raises(WireError, match="kind"):
        parse_secret_record(SignedRecord.create(signer, "secret-rotate", "svc/key", 1, body))


def test_bad_signature_is_rejected_unless_told_verified():
    ids, _, rec = _make()
    forged = SignedRecord(ids[1].public_key, rec.payload, rec.signature)
    with pytest.raises(WireError, match="signature"):
        parse_secret_record(forged)
    assert parse_secret_record(forged, verify=False).generation == 1
    with pytest.raises(WireError):
        SignedRecord.decode(forged.encode())


def test_choose_current_picks_highest_valid_allowed():
    ids = [Identity.generate() for _ in range(3)]
    recips = {i.public_key: i.box_public for i in ids}

    def rec(maker, gen, created):
        return build_secret_record(ids[maker], INST, gen, created, {"v": b"x"}, {}, recips, [])

    r1, r2, r2b, r3 = rec(0, 1, T0), rec(1, 2, T0 + 5), rec(2, 2, T0 + 9), rec(2, 3, T0)
    allowed = [i.public_key for i in ids]
    assert choose_current([r1, r2, r2b], allowed).record == r2b
    assert choose_current([r2b, r1, r2], allowed).record == r2b
    assert choose_current([r1, r2, r2b, r3], allowed).record == r3
    # r3's origin is not allowed any more
    rejected = []
    cur = choose_current([r1, r2, r2b, r3], allowed[:2], rejected=rejected)
    assert cur.record == r2 and {r for r, _ in rejected} == {r2b, r3}
    # a tampered copy of the highest one loses to a valid lower one
    body = copy.deepcopy(r3.body)
    body["ciphertext"] = bytes([body["ciphertext"][0] ^ 1]) + body["ciphertext"][1:]
    bad = _resign(ids[2], r3, body)

    def opens(b: SecretBody) -> None:
        open_payload(b.nonce, b.ciphertext, b.keys, ids[0].public_key, ids[0].box_key)

    assert choose_current([r1, bad], allowed, opens=opens).record == r1
    assert choose_current([], allowed) is None


def test_rotate_request():
    ident = Identity.generate()
    r = build_rotate_request(ident, "svc/key", 4, T0)
    again = parse_rotate_request(SignedRecord.decode(r.encode()))
    assert (again.generation, again.requested) == (4, T0) and r.version == T0
    with pytest.raises(WireError):
        parse_rotate_request(
            SignedRecord.create(ident, "secret-rotate", "svc/key", 1, {"generation": 1})
        )
    with pytest.raises(WireError):
        parse_rotate_request(
            SignedRecord.create(
                ident, "secret-rotate", "svc/key", 1, {"generation": -1, "requested": 1}
            )
        )


_wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.binary(max_size=40)
    | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4)
    ),
    max_leaves=20,
)
_FIELDS = list(SecretBody.__dataclass_fields__)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_hypothesis_parse_body_or_wire_error(data):
    """Arbitrary values (and mutations of a valid body) give a checked body or WireError."""
    _, _, rec = _make()
    valid = rec.body
    if data.draw(st.booleans()):
        body = data.draw(_wire_values)
    else:
        body = copy.deepcopy(valid)
        for _ in range(data.draw(st.integers(1, 3))):
            name = data.draw(st.sampled_from([*_FIELDS, "zz"]))
            if data.draw(st.booleans()) and name in body:
                del body[name]
            else:
                body[name] = data.draw(_wire_values)
    try:
        parsed = SecretBody.from_wire(unpack(pack(body)), path="body")
    except WireError:
        return
    # whatever parses satisfies every invariant
    assert parsed.generation >= 1 and parsed.recipients == sorted(set(parsed.recipients))
    assert set(parsed.keys) == {k.hex() for k in parsed.recipients + parsed.admins}
    assert len(parsed.nonce) == 24


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_hypothesis_record_bytes(raw):
    try:
        rec = SignedRecord.decode(raw)
        parse_secret_record(rec)
    except WireError:
        pass


def test_open_body():
    ids, _, rec = _make(3)
    body = parse_secret_record(rec)
    for i in ids:
        assert open_body(body, i.public_key, i.box_key) == {"private": b"s3cret"}
    stranger = Identity.generate()
    assert open_body(body, stranger.public_key, stranger.box_key) is None
    with pytest.raises(WireError):
        open_body(body, ids[0].public_key, stranger.box_key)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["generation", "requested", "x"]), _wire_values, max_size=3))
def test_hypothesis_rotate_request(body):
    ident = _IDENT
    try:
        rec = SignedRecord.create(ident, "secret-rotate", "svc/key", 1, body)
        r = parse_rotate_request(rec)
    except WireError:
        return
    assert r.generation >= 0 and r.requested >= 1


_IDENT = Identity.generate()
