"""The gossip datagram and its messages, sans-IO.

Owns: the protocol version, the append-only message-type table (`MsgType`),
the named limits on a datagram, encoding a message or a compound of them and
decoding one `[type, body]` item into a typed, fully checked message
(`decode_message`), a member's meta, and the actions a `GossipNode` returns
(`SendTo`, `Persist`, `MemberChanged`, `RecordAccepted`, `PeerMisbehaved`).

Must never: renumber or reuse a message type, let an unchecked field out of
`decode_message`, or raise anything but `WireError` on a peer's bytes.

Datagram:  [PROTOCOL_VERSION, [[type, body], [type, body], ...]]
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any

from .. import limits as sizes
from ..wire import Limits, SignedRecord, WireError, pack, pack_plain, unpack
from . import antientropy as ae
from .events import (
    Ack,
    AeReply,
    AeRequest,
    Alive,
    Dead,
    IndirectPing,
    Message,
    Nack,
    Ping,
    PushPull,
    RecordMessage,
    Suspect,
)

__all__ = [
    "PROTOCOL_VERSION",
    "MIN_PROTOCOL_VERSION",
    "MsgType",
    "MAX_DATAGRAM",
    "MAX_ITEMS",
    "DATAGRAM_LIMITS",
    "SendTo",
    "Persist",
    "MemberChanged",
    "RecordAccepted",
    "PeerMisbehaved",
    "NodeAction",
    "compound",
    "encode_message",
    "encode_node_meta",
    "decode_node_meta",
    "decode_message",
]

PROTOCOL_VERSION = 1
MIN_PROTOCOL_VERSION = 1


class MsgType(enum.IntEnum):
    """Message types on the wire.  Only append to this list."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    SUSPECT = 5
    ALIVE = 6
    DEAD = 7
    PUSH_PULL = 8
    RECORD = 9  # body: one signed record envelope (bin)
    AE_REQUEST = 10  # body: our digest
    AE_REPLY = 11  # body: {"d": delta for you, "g": our digest or nil}


_MEMBERSHIP_TYPES: dict[type, MsgType] = {
    Ping: MsgType.PING,
    IndirectPing: MsgType.INDIRECT_PING,
    Ack: MsgType.ACK,
    Nack: MsgType.NACK,
    Suspect: MsgType.SUSPECT,
    Alive: MsgType.ALIVE,
    Dead: MsgType.DEAD,
    PushPull: MsgType.PUSH_PULL,
}
_MEMBERSHIP_CLASSES: dict[int, Any] = {int(t): c for c, t in _MEMBERSHIP_TYPES.items()}

# Named limits on what a peer controls, from the clan-size targets
# (clanagent.limits).  A datagram is [version, [[type, body], ...]]: its own
# maps are a few keys (an anti-entropy reply), its arrays the message list,
# a digest (MAX_DIGEST_ORIGINS pairs) or a delta's records; the records in it
# are bins, each decoded again under RECORD_LIMITS -- the limits every record
# is created under, so no record a peer could create is refused here.
MAX_DATAGRAM = sizes.MAX_FRAME  # one session frame (see session.DEFAULT_MAX_PLAINTEXT)
MAX_ITEMS = 4096  # messages in one compound
DATAGRAM_LIMITS = Limits(
    max_frame=MAX_DATAGRAM,
    max_depth=12,
    max_str=64 * 1024,
    max_bin=MAX_DATAGRAM,  # a record: judged by RECORD_LIMITS, not here
    max_array=sizes.MAX_TABLE,
    max_map=64,
)
# Records we remember having seen (by id), so the many duplicate copies an

# -- actions (what a GossipNode returns) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendTo:
    """Deliver `data` to the node at `addr` (a datagram: it may be lost).

    `node_id` is None when we do not know who listens there (a seed)."""

    node_id: str | None
    addr: str
    data: bytes


@dataclass(frozen=True, slots=True, eq=False)
class Persist:
    """Make `records` durable, then call `node.persisted(now, records, results)`
    with this same tuple and `store.put_many`'s results."""

    records: tuple[SignedRecord, ...]


@dataclass(frozen=True, slots=True)
class MemberChanged:
    node_id: str
    name: str
    addr: str
    state: str  # alive, suspect, dead, left
    incarnation: int
    change: str  # joined, suspect, dead, alive, left, updated


@dataclass(frozen=True, slots=True)
class RecordAccepted:
    record: SignedRecord


@dataclass(frozen=True, slots=True)
class PeerMisbehaved:
    node_id: str | None
    addr: str
    reason: str
    score: int


NodeAction = SendTo | Persist | MemberChanged | RecordAccepted | PeerMisbehaved


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes([0x90 | n])
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


_VERSION_PREFIX = b"\x92" + pack(PROTOCOL_VERSION)


def compound(items: list[bytes]) -> bytes:
    """A datagram from pre-encoded `[type, body]` items (no re-encoding)."""
    return _VERSION_PREFIX + _array_header(len(items)) + b"".join(items)


def encode_message(msg: Message) -> bytes:
    # Membership messages are lists of scalars: canonical as they are.
    return pack_plain([int(_MEMBERSHIP_TYPES[type(msg)]), msg.to_wire()])


def encode_node_meta(name: str) -> bytes:
    return pack({"n": name[:64]})


@functools.lru_cache(maxsize=4096)
def decode_node_meta(meta: bytes) -> str:
    """The machine name in a member's meta ("" when there is none or it is
    malformed).  Cached: every listing of the members decodes every meta, a
    million decodes a refresh wave in a 1000-machine simulation; a member
    sending ever new metas only churns a bounded cache."""
    try:
        value = unpack(meta, DATAGRAM_LIMITS) if meta else {}
    except WireError:
        return ""
    name = value.get("n") if isinstance(value, dict) else None
    return name if isinstance(name, str) else ""


def decode_message(mtype: Any, body: Any) -> Message | RecordMessage | AeRequest | AeReply | None:
    """One `[type, body]` item as a typed, fully checked message.

    None for a type we do not know (a newer peer's); WireError for anything
    malformed.  Nothing else escapes: this runs before any state is touched.
    """
    if type(mtype) is not int:
        raise WireError("message type must be an int")
    cls = _MEMBERSHIP_CLASSES.get(mtype)
    if cls is not None:
        msg: Message = cls.from_wire(body)
        return msg
    if mtype == MsgType.RECORD:
        return RecordMessage(body)
    if mtype == MsgType.AE_REQUEST:
        return AeRequest(ae.decode_digest(body))
    if mtype == MsgType.AE_REPLY:
        if type(body) is not dict or body.keys() != {"d", "g"}:
            raise WireError("anti-entropy reply must be {d, g}")
        delta = ae.decode_delta(body["d"], DATAGRAM_LIMITS)
        digest = None if body["g"] is None else ae.decode_digest(body["g"])
        return AeReply(delta.records, delta.complete_through, digest)
    return None
