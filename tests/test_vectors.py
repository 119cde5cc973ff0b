"""The wire-format test vectors (tests/vectors/*.json) against our implementation.

Each vector is checked both ways: our code, run on the vector's fixed keys
and randomness, produces exactly the recorded bytes; and our decoders read
the recorded bytes back to the recorded fields.  The handshake's key
schedule is also recomputed here from docs/protocol.md alone (hashlib and
libsodium, none of our code), so the spec and the code cannot drift apart.

A failure here means the wire format changed.  If that was deliberate,
regenerate with `scripts/regen_vectors.py` and update docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import msgpack
import nacl.bindings as sodium
import nacl.signing
import pytest

from clanagent.gossip.antientropy import WireDelta
from clanagent.gossip.events import AeReply, AeRequest, RecordMessage
from clanagent.gossip.handshake import Handshake, Role
from clanagent.gossip.node import DATAGRAM_LIMITS, PROTOCOL_VERSION, decode_message
from clanagent.gossip.session import SessionCipher
from clanagent.mesh import probe
from clanagent.records import VmStatusBody
from clanagent.wire import NodeInfo, SignedRecord, unpack
from tests.vectors import build
from tests.vectors.build import ALICE, BOB, CLAN_ID, identity, seed

VECTORS = Path(__file__).parent / "vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


@pytest.mark.parametrize("name", sorted(build.FILES))
def test_our_code_reproduces_every_vector_byte_for_byte(name):
    assert build.FILES[name]() == load(name), (
        f"tests/vectors/{name} no longer matches what the code produces: the wire format "
        "changed.  If deliberate, run scripts/regen_vectors.py and update docs/protocol.md."
    )


def test_every_vector_file_is_built():
    on_disk = {p.name for p in VECTORS.glob("*.json")}
    assert on_disk == set(build.FILES)


# -- the handshake, recomputed from the spec alone ----------------------------


def _transcript_mix(h, label: bytes, data: bytes) -> None:
    h.update(len(label).to_bytes(1, "big") + label)
    h.update(len(data).to_bytes(4, "big") + data)


def _kdf(secret: bytes, label: bytes, th: bytes) -> bytes:
    h = hashlib.blake2b(key=secret, digest_size=32, person=b"clanagent kdf v1")
    h.update(len(label).to_bytes(1, "big") + label)
    h.update(th)
    return h.digest()


def _aead_open(key: bytes, ciphertext: bytes, aad: bytes, nonce: bytes = bytes(24)) -> bytes:
    return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)


def test_handshake_key_schedule_follows_the_spec():
    v = load("handshake.json")
    hello, reply, finish, confirm = (bytes.fromhex(m["hex"]) for m in v["messages"])
    clan = bytes.fromhex(v["clan_id"])
    key_i = bytes.fromhex(v["initiator"]["sign_public"])
    key_r = bytes.fromhex(v["responder"]["sign_public"])
    eph_i_secret = bytes.fromhex(v["initiator"]["ephemeral_secret"])
    eph_r_secret = bytes.fromhex(v["responder"]["ephemeral_secret"])

    m1 = msgpack.unpackb(hello)
    assert list(m1) == ["c", "e", "t", "v"]  # canonical: keys sorted
    clan_tag = hashlib.blake2b(clan, digest_size=8, person=b"clanagent clan  ").digest()
    assert m1 == {
        "t": 1,
        "v": [1, 1],
        "c": clan_tag,
        "e": sodium.crypto_scalarmult_base(eph_i_secret),
    }
    m2 = msgpack.unpackb(reply)
    assert m2["t"] == 2 and m2["v"] == 1
    assert m2["e"] == sodium.crypto_scalarmult_base(eph_r_secret)

    th = hashlib.blake2b(digest_size=32, person=b"clanagent hs v1 ")
    _transcript_mix(th, b"clan", clan)
    _transcript_mix(th, b"hello", hello)
    _transcript_mix(th, b"version", (1).to_bytes(2, "big"))
    _transcript_mix(th, b"eph r", m2["e"])
    dh = sodium.crypto_scalarmult(eph_i_secret, m2["e"])
    assert dh == sodium.crypto_scalarmult(eph_r_secret, m1["e"])
    th2 = th.copy().digest()
    k_hs_r2i = _kdf(dh, b"handshake r->i", th2)
    k_hs_i2r = _kdf(dh, b"handshake i->r", th2)

    payload_r = msgpack.unpackb(_aead_open(k_hs_r2i, m2["x"], th2))
    assert payload_r["k"] == key_r
    _transcript_mix(th, b"key r", key_r)
    nacl.signing.VerifyKey(key_r).verify(
        b"clanagent responder sig v1\0" + th.copy().digest(), payload_r["s"]
    )
    _transcript_mix(th, b"sig r", payload_r["s"])

    m3 = msgpack.unpackb(finish)
    assert set(m3) == {"t", "x"} and m3["t"] == 3
    payload_i = msgpack.unpackb(_aead_open(k_hs_i2r, m3["x"], th.copy().digest()))
    assert payload_i["k"] == key_i
    _transcript_mix(th, b"key i", key_i)
    nacl.signing.VerifyKey(key_i).verify(
        b"clanagent initiator sig v1\0" + th.copy().digest(), payload_i["s"]
    )
    _transcript_mix(th, b"sig i", payload_i["s"])

    th_final = th.copy().digest()
    assert _kdf(dh, b"session i->r", th_final).hex() == v["session"]["key_i2r"]
    assert _kdf(dh, b"session r->i", th_final).hex() == v["session"]["key_r2i"]
    k_confirm = _kdf(dh, b"confirm r->i", th_final)
    mac = hashlib.blake2b(th_final, key=k_confirm, digest_size=32).digest()
    assert msgpack.unpackb(confirm) == {"t": 4, "m": mac}


def test_recorded_handshake_messages_are_accepted_by_our_code():
    v = load("handshake.json")
    hello, reply, finish, confirm = (bytes.fromhex(m["hex"]) for m in v["messages"])
    a, b = identity(ALICE), identity(BOB)
    # The responder takes the recorded HELLO and FINISH...
    res = Handshake(
        Role.RESPONDER, b, CLAN_ID, lambda k: k == a.public_key, lambda n: seed("bob/eph")
    )
    assert res.receive(hello) == reply
    assert res.receive(finish) == confirm and res.done
    assert res.peer_public_key == a.public_key
    # ...and a tampered HELLO is refused.
    other = Handshake(Role.RESPONDER, b, CLAN_ID, lambda k: True, lambda n: seed("bob/eph"))
    with pytest.raises(Exception, match="clan|canonical|malformed"):
        other.receive(hello[:-3] + b"\x02" + hello[-2:])


# -- frames ------------------------------------------------------------------


def test_frames_open_with_the_recorded_keys_and_counter_nonces():
    keys = load("handshake.json")["session"]
    i2r, r2i = bytes.fromhex(keys["key_i2r"]), bytes.fromhex(keys["key_r2i"])
    # Our cipher, built from the published keys alone (the responder's side
    # opens alice's frames and vice versa)...
    at_bob = SessionCipher(r2i, i2r)
    at_alice = SessionCipher(i2r, r2i)
    counters = {"initiator": 0, "responder": 0}
    for f in load("frames.json")["frames"]:
        frame, plaintext = bytes.fromhex(f["hex"]), bytes.fromhex(f["plaintext"])
        cipher = at_bob if f["from"] == "initiator" else at_alice
        assert cipher.open(frame) == plaintext
        # ...and the spec's nonce: 16 zero bytes then the direction's counter.
        key = i2r if f["from"] == "initiator" else r2i
        nonce = bytes(16) + counters[f["from"]].to_bytes(8, "big")
        assert _aead_open(key, frame, b"clanagent frame v1", nonce) == plaintext
        assert len(frame) == len(plaintext) + 16
        counters[f["from"]] += 1


# -- signed records ------------------------------------------------------------


def test_signed_records_decode_verify_and_parse():
    bodies = {"node-info": NodeInfo, "vm-status": VmStatusBody}
    for r in load("records.json")["records"]:
        data = bytes.fromhex(r["hex"])
        rec = SignedRecord.decode(data)  # verifies the signature
        assert rec.signer == identity(r["signer"]).public_key
        assert (rec.clan.hex(), rec.kind, rec.key, rec.version) == (
            r["clan"],
            r["kind"],
            r["key"],
            r["version"],
        )
        assert rec.payload.hex() == r["payload"] and rec.signature.hex() == r["signature"]
        assert rec.record_id == hashlib.blake2b(data, digest_size=32).digest()
        assert rec.record_id.hex() == r["record_id"]
        # The envelope and its signed content, from the spec.
        assert msgpack.unpackb(data) == [rec.signer, rec.payload, rec.signature]
        nacl.signing.VerifyKey(rec.signer).verify(
            b"clanagent-record-v1\0" + rec.payload, rec.signature
        )
        header = msgpack.unpackb(rec.payload)
        assert list(header) == ["body", "clan", "key", "kind", "version"]
        assert type(rec.parse_body()) is bodies[r["kind"]]
        # One flipped bit of the payload breaks the signature.
        broken = bytearray(data)
        broken[-70] ^= 1
        with pytest.raises(ValueError):
            SignedRecord.decode(bytes(broken))


# -- gossip ----------------------------------------------------------------------


def test_every_gossip_message_decodes_to_what_was_encoded():
    v = load("gossip.json")
    expected = {name: msg for name, msg, _item in build.gossip_messages()}
    assert [m["name"] for m in v["messages"]] == list(expected)
    for m in v["messages"]:
        version, items = unpack(bytes.fromhex(m["datagram"]), DATAGRAM_LIMITS)
        assert version == PROTOCOL_VERSION and len(items) == 1
        mtype, body = items[0]
        assert mtype == m["type"]
        got = decode_message(mtype, body)
        want = expected[m["name"]]
        if m["name"] == "RECORD":
            assert isinstance(got, RecordMessage) and got.data == want.encode()
        elif m["name"] == "AE_REQUEST":
            assert isinstance(got, AeRequest) and got.digest == want
        elif m["name"] == "AE_REPLY":
            delta, digest = want
            assert isinstance(got, AeReply)
            assert got.records == tuple(r.encode() for r in delta.records)
            assert got.claims == delta.complete_through and got.digest == digest
            assert WireDelta(got.records, got.claims).records == got.records
        else:
            assert got == want
    version, items = unpack(bytes.fromhex(v["compound"]), DATAGRAM_LIMITS)
    assert [t for t, _ in items] == [1, 3, 6]


# -- path probes ------------------------------------------------------------------


def test_probes_decode_with_the_receivers_box_key():
    for p in load("probes.json")["probes"]:
        sender = identity(p["from"])
        receiver = identity(BOB if p["from"] == ALICE else ALICE)
        data = bytes.fromhex(p["hex"])
        assert data[:8] == b"clanprb1" and data[8:40] == sender.public_key
        assert data[40:64].hex() == p["nonce"]
        got = probe.decode(data, receiver.box_key, {sender.public_key: sender.box_public})
        assert got == (sender.public_key, p["kind"], p["probe_id"], p["sent_at"])
        # The body, opened with libsodium's crypto_box from the spec.
        plain = sodium.crypto_box_open(
            data[64:], data[40:64], sender.box_public, bytes(receiver.box_key)
        )
        assert msgpack.unpackb(plain) == [p["kind"], p["probe_id"], p["sent_at"]]
