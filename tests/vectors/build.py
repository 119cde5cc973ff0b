"""Build the wire-format test vectors from fixed keys and fixed randomness.

Owns: the inputs of every vector (seeds, clan id, the handshake's ephemeral
secrets, the probe nonce, message fields) and running *our* implementation
on them to get the exact bytes.  `tests/test_vectors.py` compares what this
builds with the JSON files beside it; `scripts/regen_vectors.py` rewrites
those files (only when a wire change is deliberate).

Must never: use real randomness or a clock, or reach into the code under
test by anything but the public names that the protocol spec
(docs/protocol.md) describes.  The one exception is the session keys of the
handshake (read from the ciphers it produced), published so that an
implementer can check the key schedule step by step.
"""

from __future__ import annotations

import hashlib
from typing import Any

import nacl.public
import nacl.signing

from clanagent.gossip import antientropy as ae
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
from clanagent.gossip.handshake import Handshake, Role
from clanagent.gossip.node import MsgType, compound, encode_message, encode_node_meta
from clanagent.identity import Identity, clamp_curve25519
from clanagent.mesh import probe
from clanagent.records import VmStatusBody
from clanagent.wire import NodeInfo, SignedRecord, pack

__all__ = ["FILES", "build_all", "identity", "seed"]


def seed(label: str) -> bytes:
    """32 fixed bytes named by `label` (BLAKE2b-256 of it): the vectors' "randomness"."""
    return hashlib.blake2b(label.encode(), digest_size=32).digest()


def identity(name: str) -> Identity:
    """A node identity whose three private keys are `seed(name + "/sign" | "/box" | "/wg")`."""
    return Identity(
        signing_key=nacl.signing.SigningKey(seed(name + "/sign")),
        box_key=nacl.public.PrivateKey(seed(name + "/box")),
        wg_private=clamp_curve25519(seed(name + "/wg")),
    )


CLAN_ID = seed("clan")
ALICE = "alice"  # the initiator
BOB = "bob"  # the responder


def _h(b: bytes) -> str:
    return b.hex()


def _keys(name: str) -> dict[str, str]:
    ident = identity(name)
    return {
        "sign_seed": _h(seed(name + "/sign")),
        "sign_public": _h(ident.public_key),
        "box_secret": _h(seed(name + "/box")),
        "box_public": _h(ident.box_public),
        "node_id": ident.node_id,
    }


def _fixed_rng(value: bytes):  # type: ignore[no-untyped-def]
    def rng(n: int) -> bytes:
        if n != len(value):
            raise AssertionError(f"asked for {n} random bytes, the vector fixes {len(value)}")
        return value

    return rng


def handshake_pair() -> tuple[Handshake, Handshake, list[bytes]]:
    """Run a whole handshake between alice (initiator) and bob (responder)."""
    a, b = identity(ALICE), identity(BOB)
    ini = Handshake(
        Role.INITIATOR, a, CLAN_ID, lambda k: k == b.public_key, _fixed_rng(seed("alice/eph"))
    )
    res = Handshake(
        Role.RESPONDER, b, CLAN_ID, lambda k: k == a.public_key, _fixed_rng(seed("bob/eph"))
    )
    hello = ini.start()
    reply = res.receive(hello)
    assert reply is not None
    finish = ini.receive(reply)
    assert finish is not None
    confirm = res.receive(finish)
    assert confirm is not None
    assert ini.receive(confirm) is None and ini.done and res.done
    return ini, res, [hello, reply, finish, confirm]


def build_handshake() -> dict[str, Any]:
    ini, res, (hello, reply, finish, confirm) = handshake_pair()
    return {
        "description": "A whole handshake: alice initiates, bob responds (docs/protocol.md, 'Handshake').",
        "clan_id": _h(CLAN_ID),
        "initiator": {**_keys(ALICE), "ephemeral_secret": _h(seed("alice/eph"))},
        "responder": {**_keys(BOB), "ephemeral_secret": _h(seed("bob/eph"))},
        "version": 1,
        "messages": [
            {"name": "HELLO", "from": "initiator", "hex": _h(hello)},
            {"name": "REPLY", "from": "responder", "hex": _h(reply)},
            {"name": "FINISH", "from": "initiator", "hex": _h(finish)},
            {"name": "CONFIRM", "from": "responder", "hex": _h(confirm)},
        ],
        "session": {
            "key_i2r": _h(ini.cipher._send_key),
            "key_r2i": _h(ini.cipher._recv_key),
        },
    }


FRAME_PLAINTEXTS = [
    ("initiator", b"hello, bob"),
    ("initiator", b""),
    ("responder", b"hello, alice"),
    ("initiator", bytes(range(40))),
]


def build_frames() -> dict[str, Any]:
    ini, res, _ = handshake_pair()
    frames = []
    for sender, plaintext in FRAME_PLAINTEXTS:
        cipher = ini.cipher if sender == "initiator" else res.cipher
        frames.append(
            {"from": sender, "plaintext": _h(plaintext), "hex": _h(cipher.seal(plaintext))}
        )
    return {
        "description": (
            "Frames of the session from handshake.json, in this order; each direction "
            "counts its own frames from 0 (docs/protocol.md, 'Frames')."
        ),
        "frames": frames,
    }


def _signed_records() -> list[tuple[str, SignedRecord]]:
    a, b = identity(ALICE), identity(BOB)
    info = NodeInfo(name="alice", version="0.1.0", addrs=["192.0.2.1:9945"])
    status = VmStatusBody(
        vm="web",
        machine="bob",
        state="running",
        reason="",
        accel="tcg",
        pid=4242,
        crashes=0,
        booted=1_800_000_000,
        overlay="fd00::2",
        at=1_800_000_005,
    )
    return [
        ("node-info", SignedRecord.create(a, "node-info", "", 1_800_000_000_000, info, CLAN_ID)),
        (
            "vm-status",
            SignedRecord.create(b, "vm-status", "web", 1_800_000_000_123, status, CLAN_ID),
        ),
    ]


def build_records() -> dict[str, Any]:
    out = []
    for name, rec in _signed_records():
        out.append(
            {
                "name": name,
                "signer": ALICE if rec.signer == identity(ALICE).public_key else BOB,
                "clan": _h(rec.clan),
                "kind": rec.kind,
                "key": rec.key,
                "version": rec.version,
                "body": _jsonable(rec.body),
                "payload": _h(rec.payload),
                "signature": _h(rec.signature),
                "record_id": _h(rec.record_id),
                "hex": _h(rec.encode()),
            }
        )
    return {
        "description": (
            "Signed records (docs/protocol.md, 'Signed records'); signers' keys are in "
            "handshake.json; bodies are shown with bytes as hex strings."
        ),
        "records": out,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bin": value.hex()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def gossip_messages() -> list[tuple[str, Any, bytes]]:
    """(name, decoded message, encoded [type, body] item) for every message type."""
    a, b = identity(ALICE), identity(BOB)
    ida, idb = a.node_id, b.node_id
    addr_a, addr_b = "192.0.2.1:9945", "192.0.2.2:9945"
    meta = encode_node_meta("alice")
    members: list[tuple[str, Any]] = [
        ("PING", Ping(7, idb, ida, addr_a)),
        ("INDIRECT_PING", IndirectPing(8, idb, addr_b, ida, addr_a, True)),
        ("ACK", Ack(7)),
        ("NACK", Nack(8)),
        ("SUSPECT", Suspect(3, idb, ida)),
        ("ALIVE", Alive(4, ida, addr_a, meta)),
        ("DEAD", Dead(5, idb, ida)),
        (
            "PUSH_PULL",
            PushPull(
                False,
                (
                    NodeStateEntry(ida, addr_a, 4, MemberState.ALIVE, meta),
                    NodeStateEntry(idb, addr_b, 5, MemberState.DEAD, b""),
                ),
            ),
        ),
    ]
    out = [(name, msg, encode_message(msg)) for name, msg in members]
    recs = _signed_records()
    node_info = recs[0][1]
    out.append(("RECORD", node_info, pack([int(MsgType.RECORD), node_info.encode()])))
    digest = {a.public_key: 1_800_000_000_000, b.public_key: 1_800_000_000_123}
    out.append(("AE_REQUEST", digest, pack([int(MsgType.AE_REQUEST), ae.encode_digest(digest)])))
    status = recs[1][1]
    delta = ae.Delta((status,), {b.public_key: status.version}, 0)
    reply_body = {"d": ae.encode_delta(delta), "g": ae.encode_digest(digest)}
    reply = ("AE_REPLY", (delta, digest), pack([int(MsgType.AE_REPLY), reply_body]))
    out.append(reply)
    return out


def build_gossip() -> dict[str, Any]:
    items = gossip_messages()
    messages = []
    for name, _msg, item in items:
        messages.append(
            {
                "name": name,
                "type": int(MsgType[name]),
                "item": _h(item),
                "datagram": _h(compound([item])),
            }
        )
    return {
        "description": (
            "Every gossip message type, each as its [type, body] item and as a datagram "
            "[1, [item]] of its own; 'compound' holds PING, ACK and ALIVE in one datagram "
            "(docs/protocol.md, 'Gossip datagrams')."
        ),
        "messages": messages,
        "compound": _h(compound([items[0][2], items[2][2], items[5][2]])),
    }


PROBES = [("PING", probe.PING, 17, 1_800_000_000.25), ("PONG", probe.PONG, 17, 1_800_000_000.25)]


def build_probes() -> dict[str, Any]:
    a, b = identity(ALICE), identity(BOB)
    out = []
    for name, kind, pid, sent_at in PROBES:
        sender, receiver = (a, b) if kind == probe.PING else (b, a)
        nonce = seed(f"probe/{name}")[:24]
        data = probe.encode(
            kind,
            pid,
            sent_at,
            sender.public_key,
            sender.box_key,
            receiver.box_public,
            rng=_fixed_rng(nonce),
        )
        out.append(
            {
                "name": name,
                "from": ALICE if sender is a else BOB,
                "kind": kind,
                "probe_id": pid,
                "sent_at": sent_at,
                "nonce": _h(nonce),
                "hex": _h(data),
            }
        )
    return {
        "description": (
            "Path probes over UDP: alice pings bob, bob answers (docs/protocol.md, "
            "'Path probes'); box keys are in handshake.json."
        ),
        "probes": out,
    }


FILES = {
    "handshake.json": build_handshake,
    "frames.json": build_frames,
    "records.json": build_records,
    "gossip.json": build_gossip,
    "probes.json": build_probes,
}


def build_all() -> dict[str, dict[str, Any]]:
    """file name -> its JSON content."""
    return {name: fn() for name, fn in FILES.items()}
