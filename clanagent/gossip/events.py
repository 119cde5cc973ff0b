"""Messages, actions and member events of SWIM membership.

Owns: the frozen dataclasses that go into and come out of
`clanagent.gossip.membership.Membership`, and the wire shape of each
membership message.  Each message is a `clanagent.wire.CheckedRecord` in
array form: its annotations (exact types, `Range`, `Size`) are its schema,
and the one record engine (`clanagent.wire.schema`) checks them when a
message is decoded (`from_wire()`, which raises `WireError` on anything
else) and when one is built, so a message object is valid however it was
made.  `to_wire()` gives a msgpack-ready list.

Must never: encode bytes itself (the node composer tags each message with its
append-only type number and calls `clanagent.wire.pack`), check a field by
hand (a rule belongs in the annotations), or let any exception but
`WireError` out of `from_wire`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, ClassVar

from clanagent.wire import CheckedRecord, Range, Size, WireError

__all__ = [
    # limits of untrusted input
    "MAX_NODE_ID_LEN",
    "MAX_ADDR_LEN",
    "MAX_META_LEN",
    "MAX_SEQ",
    "MAX_INCARNATION",
    "MAX_PUSH_PULL_STATES",
    # member states
    "MemberState",
    # messages
    "Ping",
    "IndirectPing",
    "Ack",
    "Nack",
    "Suspect",
    "Alive",
    "Dead",
    "NodeStateEntry",
    "PushPull",
    "Message",
    "MESSAGE_CLASSES",
    # record and anti-entropy messages, decoded
    "RecordMessage",
    "AeRequest",
    "AeReply",
    # actions
    "Send",
    # member events
    "MemberJoined",
    "MemberSuspect",
    "MemberDead",
    "MemberAlive",
    "MemberLeft",
    "MemberUpdated",
    "MemberEvent",
    "Action",
]

# Named bounds on every size or value a peer controls.
MAX_NODE_ID_LEN = 256  # characters in a node id
MAX_ADDR_LEN = 256  # characters in an opaque address ("host:port", onion, ...)
MAX_META_LEN = 512  # bytes of node metadata (memberlist MetaMaxSize)
MAX_SEQ = 2**32 - 1  # probe sequence numbers wrap like memberlist's uint32
MAX_INCARNATION = 2**64 - 1
MAX_PUSH_PULL_STATES = 16 * 1024  # entries in one full-state exchange


class MemberState(enum.IntEnum):
    """A member's state as seen by one node; the values are on the wire."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


# -- field types: the bounds every message field is checked against ---------

Seq = Annotated[int, Range(0, MAX_SEQ)]
Incarnation = Annotated[int, Range(0, MAX_INCARNATION)]
NodeId = Annotated[str, Size(1, MAX_NODE_ID_LEN)]
Addr = Annotated[str, Size(1, MAX_ADDR_LEN)]
Meta = Annotated[bytes, Size(0, MAX_META_LEN)]


class _Message(CheckedRecord):
    """A membership message: checked when built, an array on the wire."""

    __slots__ = ()
    WIRE_ARRAY: ClassVar[bool] = True


# -- messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping(_Message):
    """Are you alive?  `target` guards against a reused address answering."""

    seq: Seq
    target: NodeId
    source: NodeId
    source_addr: Addr | None = None


@dataclass(frozen=True, slots=True)
class IndirectPing(_Message):
    """Please ping `target` for me and relay its ack (and a nack if it is silent)."""

    seq: Seq
    target: NodeId
    target_addr: Addr
    requester: NodeId
    requester_addr: Addr
    nack: bool = True


@dataclass(frozen=True, slots=True)
class Ack(_Message):
    """Answer to a Ping (directly, or relayed by the helper of an indirect probe)."""

    seq: Seq


@dataclass(frozen=True, slots=True)
class Nack(_Message):
    """Lifeguard: the helper of an indirect probe got no ack in time.

    Proves the helper is reachable, so a missing nack points at *us*.
    """

    seq: Seq


@dataclass(frozen=True, slots=True)
class Suspect(_Message):
    """`from_node` suspects `node` at `incarnation` (gossiped)."""

    incarnation: Incarnation
    node: NodeId
    from_node: NodeId


@dataclass(frozen=True, slots=True)
class Alive(_Message):
    """`node` is alive at `addr` with `incarnation` (gossiped; refutes suspicion)."""

    incarnation: Incarnation
    node: NodeId
    addr: Addr
    meta: Meta = b""


@dataclass(frozen=True, slots=True)
class Dead(_Message):
    """`from_node` declares `node` dead; from the node itself it means it left."""

    incarnation: Incarnation
    node: NodeId
    from_node: NodeId


@dataclass(frozen=True, slots=True)
class NodeStateEntry(_Message):
    """One member in a full-state exchange (memberlist `pushNodeState`)."""

    node: NodeId
    addr: Addr
    incarnation: Incarnation
    state: MemberState
    meta: Meta = b""


@dataclass(frozen=True, slots=True)
class PushPull(_Message):
    """Full membership state, sent on join and every push/pull interval.

    A request (`reply=False`) is answered with our own state (`reply=True`);
    both sides then merge what they got, as memberlist's `mergeState`.
    """

    reply: bool
    states: Annotated[tuple[NodeStateEntry, ...], Size(0, MAX_PUSH_PULL_STATES)]


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | PushPull

# Every message class, for the composer's type table and for tests.
MESSAGE_CLASSES: tuple[type, ...] = (Ping, IndirectPing, Ack, Nack, Suspect, Alive, Dead, PushPull)


# -- record and anti-entropy messages ----------------------------------------
#
# Decoded (and checked field by field) by `clanagent.gossip.messages.decode_message`
# with the anti-entropy shape checks, before anything reaches node state.


@dataclass(frozen=True, slots=True)
class RecordMessage:
    """One signed record envelope, still encoded (its signature is checked later)."""

    data: bytes

    def __post_init__(self) -> None:
        if type(self.data) is not bytes or not self.data:
            raise WireError("record body must be non-empty bin")


@dataclass(frozen=True, slots=True)
class AeRequest:
    """A peer's anti-entropy digest: origin -> watermark."""

    digest: dict[bytes, int]


@dataclass(frozen=True, slots=True)
class AeReply:
    """A delta for us (records still encoded, plus completeness claims) and,
    when the peer wants ours too, its digest."""

    records: tuple[bytes, ...]
    claims: dict[bytes, int]
    digest: dict[bytes, int] | None


# -- actions ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send `message` directly to `addr` (`to` is the node id, None for a seed
    whose id we do not know yet)."""

    to: str | None
    addr: str
    message: Message


# -- member events ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberJoined:
    """A member we did not know, or knew as dead/left, is alive."""

    node: str
    addr: str
    incarnation: int
    meta: bytes = b""


@dataclass(frozen=True, slots=True)
class MemberSuspect:
    """A member is suspected of having failed."""

    node: str
    addr: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberDead:
    """A member was declared failed."""

    node: str
    addr: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberAlive:
    """A suspected member refuted the suspicion (or was heard alive again)."""

    node: str
    addr: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberLeft:
    """A member left gracefully (it announced its own death)."""

    node: str
    addr: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """An alive member changed its metadata or address."""

    node: str
    addr: str
    incarnation: int
    meta: bytes = b""


MemberEvent = MemberJoined | MemberSuspect | MemberDead | MemberAlive | MemberLeft | MemberUpdated
Action = Send | MemberEvent
