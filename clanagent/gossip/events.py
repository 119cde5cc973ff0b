"""Messages, actions and member events of SWIM membership.

Owns: the frozen dataclasses that go into and come out of
`clanagent.gossip.membership.Membership`, and the wire shape of each
membership message (`to_wire()` gives a msgpack-ready list, `from_wire()`
checks every type, range and length of untrusted input and raises
`clanagent.wire.WireError` on anything else).  Field validation in
`__post_init__` uses the same checks, so a message object is valid however
it was built.

Must never: encode bytes itself (the node composer tags each message with its
append-only type number and calls `clanagent.wire.pack`), or accept `bool`
where an int is meant, or let any exception but `WireError` out of
`from_wire`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from clanagent.wire import WireError

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


_MAX_STATE = max(MemberState)

# -- checks shared by __post_init__ and from_wire -------------------------


def _int(value: Any, name: str, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{name} must be an int")
    if not 0 <= value <= hi:
        raise WireError(f"{name} out of range")
    return value


def _str(value: Any, name: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise WireError(f"{name} must be a str")
    if not 0 < len(value) <= max_len:
        raise WireError(f"{name} must have 1..{max_len} characters")
    return value


def _opt_str(value: Any, name: str, max_len: int) -> str | None:
    return None if value is None else _str(value, name, max_len)


def _bytes(value: Any, name: str, max_len: int) -> bytes:
    if not isinstance(value, bytes):
        raise WireError(f"{name} must be bytes")
    if len(value) > max_len:
        raise WireError(f"{name} longer than {max_len} bytes")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(f"{name} must be a bool")
    return value


def _fields(value: Any, n: int, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise WireError(f"{what} must be an array")
    if len(value) != n:
        raise WireError(f"{what} must have {n} fields, not {len(value)}")
    return value


# -- messages ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """Are you alive?  `target` guards against a reused address answering."""

    seq: int
    target: str
    source: str
    source_addr: str | None = None

    def __post_init__(self) -> None:
        _int(self.seq, "seq", MAX_SEQ)
        _str(self.target, "target", MAX_NODE_ID_LEN)
        _str(self.source, "source", MAX_NODE_ID_LEN)
        _opt_str(self.source_addr, "source_addr", MAX_ADDR_LEN)

    def to_wire(self) -> list[Any]:
        return [self.seq, self.target, self.source, self.source_addr]

    @classmethod
    def from_wire(cls, value: Any) -> Ping:
        seq, target, source, source_addr = _fields(value, 4, "ping")
        return cls(seq, target, source, source_addr)


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Please ping `target` for me and relay its ack (and a nack if it is silent)."""

    seq: int
    target: str
    target_addr: str
    requester: str
    requester_addr: str
    nack: bool = True

    def __post_init__(self) -> None:
        _int(self.seq, "seq", MAX_SEQ)
        _str(self.target, "target", MAX_NODE_ID_LEN)
        _str(self.target_addr, "target_addr", MAX_ADDR_LEN)
        _str(self.requester, "requester", MAX_NODE_ID_LEN)
        _str(self.requester_addr, "requester_addr", MAX_ADDR_LEN)
        _bool(self.nack, "nack")

    def to_wire(self) -> list[Any]:
        return [
            self.seq,
            self.target,
            self.target_addr,
            self.requester,
            self.requester_addr,
            self.nack,
        ]

    @classmethod
    def from_wire(cls, value: Any) -> IndirectPing:
        return cls(*_fields(value, 6, "indirect ping"))


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a Ping (directly, or relayed by the helper of an indirect probe)."""

    seq: int

    def __post_init__(self) -> None:
        _int(self.seq, "seq", MAX_SEQ)

    def to_wire(self) -> list[Any]:
        return [self.seq]

    @classmethod
    def from_wire(cls, value: Any) -> Ack:
        return cls(*_fields(value, 1, "ack"))


@dataclass(frozen=True, slots=True)
class Nack:
    """Lifeguard: the helper of an indirect probe got no ack in time.

    Proves the helper is reachable, so a missing nack points at *us*.
    """

    seq: int

    def __post_init__(self) -> None:
        _int(self.seq, "seq", MAX_SEQ)

    def to_wire(self) -> list[Any]:
        return [self.seq]

    @classmethod
    def from_wire(cls, value: Any) -> Nack:
        return cls(*_fields(value, 1, "nack"))


@dataclass(frozen=True, slots=True)
class Suspect:
    """`from_node` suspects `node` at `incarnation` (gossiped)."""

    incarnation: int
    node: str
    from_node: str

    def __post_init__(self) -> None:
        _int(self.incarnation, "incarnation", MAX_INCARNATION)
        _str(self.node, "node", MAX_NODE_ID_LEN)
        _str(self.from_node, "from", MAX_NODE_ID_LEN)

    def to_wire(self) -> list[Any]:
        return [self.incarnation, self.node, self.from_node]

    @classmethod
    def from_wire(cls, value: Any) -> Suspect:
        return cls(*_fields(value, 3, "suspect"))


@dataclass(frozen=True, slots=True)
class Alive:
    """`node` is alive at `addr` with `incarnation` (gossiped; refutes suspicion)."""

    incarnation: int
    node: str
    addr: str
    meta: bytes = b""

    def __post_init__(self) -> None:
        _int(self.incarnation, "incarnation", MAX_INCARNATION)
        _str(self.node, "node", MAX_NODE_ID_LEN)
        _str(self.addr, "addr", MAX_ADDR_LEN)
        _bytes(self.meta, "meta", MAX_META_LEN)

    def to_wire(self) -> list[Any]:
        return [self.incarnation, self.node, self.addr, self.meta]

    @classmethod
    def from_wire(cls, value: Any) -> Alive:
        return cls(*_fields(value, 4, "alive"))


@dataclass(frozen=True, slots=True)
class Dead:
    """`from_node` declares `node` dead; from the node itself it means it left."""

    incarnation: int
    node: str
    from_node: str

    def __post_init__(self) -> None:
        _int(self.incarnation, "incarnation", MAX_INCARNATION)
        _str(self.node, "node", MAX_NODE_ID_LEN)
        _str(self.from_node, "from", MAX_NODE_ID_LEN)

    def to_wire(self) -> list[Any]:
        return [self.incarnation, self.node, self.from_node]

    @classmethod
    def from_wire(cls, value: Any) -> Dead:
        return cls(*_fields(value, 3, "dead"))


@dataclass(frozen=True, slots=True)
class NodeStateEntry:
    """One member in a full-state exchange (memberlist `pushNodeState`)."""

    node: str
    addr: str
    incarnation: int
    state: MemberState
    meta: bytes = b""

    def __post_init__(self) -> None:
        _str(self.node, "node", MAX_NODE_ID_LEN)
        _str(self.addr, "addr", MAX_ADDR_LEN)
        _int(self.incarnation, "incarnation", MAX_INCARNATION)
        if not isinstance(self.state, MemberState):
            _int(self.state, "state", _MAX_STATE)
            object.__setattr__(self, "state", MemberState(self.state))
        _bytes(self.meta, "meta", MAX_META_LEN)

    def to_wire(self) -> list[Any]:
        return [self.node, self.addr, self.incarnation, int(self.state), self.meta]

    @classmethod
    def from_wire(cls, value: Any) -> NodeStateEntry:
        return cls(*_fields(value, 5, "node state"))


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full membership state, sent on join and every push/pull interval.

    A request (`reply=False`) is answered with our own state (`reply=True`);
    both sides then merge what they got, as memberlist's `mergeState`.
    """

    reply: bool
    states: tuple[NodeStateEntry, ...]

    def __post_init__(self) -> None:
        _bool(self.reply, "reply")
        if not isinstance(self.states, tuple):
            raise WireError("states must be a tuple")
        if len(self.states) > MAX_PUSH_PULL_STATES:
            raise WireError("too many states")
        for entry in self.states:
            if not isinstance(entry, NodeStateEntry):
                raise WireError("states must hold NodeStateEntry values")

    def to_wire(self) -> list[Any]:
        return [self.reply, [entry.to_wire() for entry in self.states]]

    @classmethod
    def from_wire(cls, value: Any) -> PushPull:
        reply, states = _fields(value, 2, "push/pull")
        if not isinstance(states, list):
            raise WireError("states must be an array")
        if len(states) > MAX_PUSH_PULL_STATES:
            raise WireError("too many states")
        return cls(reply, tuple(NodeStateEntry.from_wire(s) for s in states))


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | PushPull

# Every message class, for the composer's type table and for tests.
MESSAGE_CLASSES: tuple[type, ...] = (Ping, IndirectPing, Ack, Nack, Suspect, Alive, Dead, PushPull)


# -- record and anti-entropy messages ----------------------------------------
#
# Decoded (and checked field by field) by `clanagent.gossip.node.decode_message`
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
