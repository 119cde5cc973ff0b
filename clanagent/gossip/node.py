"""One gossip node: membership, record dissemination and anti-entropy, sans-IO.

Owns: the datagram format (a compound of typed messages), the append-only
message-type table, piggybacking queued broadcasts on every small message,
the gossip and anti-entropy timers, verification of every record before it
is stored or forwarded (signature, version bound, the `validate` hook on its
body, the store's quotas), and peer scoring (decaying, bounded table).  The trio shell (`service.py`) and
the simulator (`tests/sim/`) drive the same object: bytes and `now` in,
actions out.

Must never: read a clock, sleep, open a socket, import trio, forward or store
a record it has not verified, let a message touch state before it is decoded
and checked field by field (`decode_message`), or let a peer's bytes raise
anything out of `receive` (bad input is counted, scored and dropped; a fault
of ours is counted, logged once and drops the rest of that datagram).

Datagram:  [PROTOCOL_VERSION, [[type, body], [type, body], ...]]
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import logging
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import limits as sizes
from ..identity import node_id_of
from ..wire import (
    MAX_RECORD_VERSION,
    RECORD_LIMITS,
    Limits,
    SignedRecord,
    WireError,
    pack,
    pack_plain,
    unpack,
    unpack_shallow,
)
from . import antientropy as ae
from .broadcast_queue import BroadcastQueue
from .config import GossipConfig, push_pull_scale
from .events import (
    Ack,
    AeReply,
    AeRequest,
    Alive,
    Dead,
    IndirectPing,
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberState,
    MemberSuspect,
    MemberUpdated,
    Message,
    Nack,
    Ping,
    PushPull,
    RecordMessage,
    Send,
    Suspect,
)
from .membership import Membership
from .rejoin import RETRY_TIMEOUT, RejoinSchedule

__all__ = [
    "PROTOCOL_VERSION",
    "MIN_PROTOCOL_VERSION",
    "MsgType",
    "GossipNode",
    "SendTo",
    "Persist",
    "MemberChanged",
    "RecordAccepted",
    "PeerMisbehaved",
    "NodeAction",
    "DATAGRAM_LIMITS",
]

log = logging.getLogger("clanagent.gossip.node")

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
# epidemic delivers cost a hash, not a signature check.
SEEN_CACHE = 65536
# Byte budgets: gossip datagrams and anti-entropy replies.
GOSSIP_BUDGET = sizes.GOSSIP_BUDGET
AE_BUDGET = sizes.AE_BUDGET  # leaves room for our digest in the same reply
# Push-pull rounds a node starts on taking a record too big to gossip.
EAGER_PULL_ROUNDS = 3
# Records are sent this many times more often than membership updates.
RECORD_RETRANSMIT_FACTOR = 2
# Records bigger than this (encoded, in bytes) are pushed with the plain
# membership budget instead (see GossipNode._rq_big).
BIG_RECORD = 1024
# Members we marked dead or left are tried again (a full state exchange, as
# a join) on a per-member schedule (rejoin.RejoinSchedule): exponential
# backoff with jitter from the push-pull interval (RECONNECT_INTERVAL when
# push-pull is off) up to RETRY_MAX_DELAY, while the inventory lists them
# (without an inventory: for RETRY_TIMEOUT).  Each due attempt is made with
# probability REJOIN_FANOUT / (alive peers), as Serf scales its reconnects,
# so the whole clan makes about REJOIN_FANOUT attempts per step, not one per
# member: a restarted node is not flooded with full-state exchanges.
RECONNECT_INTERVAL = 10.0
RECONNECT_TIMEOUT = RETRY_TIMEOUT
REJOIN_FANOUT = 3
# Peer scoring: each offence costs this much; below the floor we ignore the peer.
OFFENCE_COST = 10
SCORE_FLOOR = -100
# Scores recover: one point per SCORE_DECAY_INTERVAL toward 0, so a peer that
# stops misbehaving is heard again (from the floor: after about a minute, and
# fully after 100 minutes).  At most MAX_SCORES peers are tracked; the one
# whose last offence is oldest is forgotten first.
SCORE_DECAY_INTERVAL = 60.0
MAX_SCORES = 4096
# Longest text of a validation refusal kept in a PeerMisbehaved reason.
_MAX_REASON = 200
# Internal faults are logged once per (sender, exception type, message type);
# this many keys are remembered (oldest forgotten first).
FAULT_LOG_KEYS = 256

_COMPOUND_OVERHEAD = 16
# The largest record item a gossip round can carry (get_broadcasts' 2-byte overhead).
_PUSH_MAX = GOSSIP_BUDGET - 2


# -- actions ------------------------------------------------------------------


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

_STATE_NAMES = {
    MemberState.ALIVE: "alive",
    MemberState.SUSPECT: "suspect",
    MemberState.DEAD: "dead",
    MemberState.LEFT: "left",
}
_EVENT_NAMES = {
    MemberJoined: ("alive", "joined"),
    MemberSuspect: ("suspect", "suspect"),
    MemberDead: ("dead", "dead"),
    MemberAlive: ("alive", "alive"),
    MemberLeft: ("left", "left"),
    MemberUpdated: ("alive", "updated"),
}


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


def decode_node_meta(meta: bytes) -> str:
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


@dataclass
class _Continuation:
    claims: dict[bytes, int] | None = None  # anti-entropy completeness claims to apply
    rebroadcast: bool = True
    from_addr: str = ""


@dataclass
class _PeerScore:
    score: int = 0
    offences: int = 0
    last_reason: str = ""
    since: float = 0.0  # decay is applied up to here

    def decay(self, now: float) -> None:
        steps = int((now - self.since) // SCORE_DECAY_INTERVAL)
        if steps <= 0:
            return
        self.since += steps * SCORE_DECAY_INTERVAL
        self.score = min(0, self.score + steps)


@dataclass
class NodeStats:
    counters: dict[str, int] = field(default_factory=dict)

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n


class GossipNode:
    """A whole gossip participant as a pure state machine."""

    def __init__(
        self,
        identity: Any,
        config: GossipConfig,
        *,
        addr: str,
        clan: bytes,
        store: Any,
        rng: random.Random,
        now: float,
        name: str = "",
        admit: Callable[[SignedRecord], bool] | None = None,
        validate: Callable[[SignedRecord], None] | None = None,
        wall_clock: Callable[[], float] | None = None,
        soft_ttl: Callable[[str], float | None] | None = None,
        eager_gossip: bool = True,
        incarnation: int = 1,
        regossip_push_pull_replies: bool = True,
    ) -> None:
        self.identity = identity
        self.config = config
        self.addr = addr
        self.clan = clan
        self.store = store
        self.name = name
        self.node_id: str = identity.node_id
        self.origin: bytes = bytes(identity.public_key)
        self._rng = rng
        self._admit = admit
        # Checks a verified record's body (kind, schema, semantics): returns
        # None to accept, raises to refuse (transient=True: cannot decide yet).
        self._validate = validate
        # Our first record of this run has a version at least the wall clock
        # in ms: soft records live only in memory, so after a restart the
        # store no longer knows how far our versions went; the clock keeps
        # them from going backwards, where peers' per-origin anti-entropy
        # watermarks would never pull them (2**53 ms is 285,000 years).
        # After that first one, versions count up by one: peers advance a
        # watermark on a broadcast only when it is the next version, and a
        # clock-stamped version every time left every watermark behind until
        # an exchange with the origin itself, so idle anti-entropy resent
        # the latest records of every origin.  (A counter that runs behind
        # the clock is safe: the next run starts at the clock.)  None:
        # counter only.
        self._wall_clock = wall_clock
        self._floored = False
        # Soft kinds (clanagent.records: topology, VM status, console tails)
        # live `soft_ttl(kind)` seconds after the last new version arrived; an
        # origin that stopped refreshing (crashed, removed, partitioned away)
        # does not leave them behind forever.  Our own never expire here: we
        # refresh them.  None: nothing expires (the plain gossip core).
        self._soft_ttl = soft_ttl
        self._soft_until: dict[tuple[bytes, str, str], float] = {}
        self._soft_heap: list[tuple[float, bytes, str, str]] = []
        reserve = getattr(store, "reserve", None)
        if reserve is not None:
            # The store's totals must never stop us publishing our own records.
            reserve(self.origin)
        self._eager = eager_gossip
        self.stats: dict[str, int] = {
            "bytes_sent": 0,
            "bytes_received": 0,
            "msgs_sent": 0,
            "msgs_received": 0,
            "malformed": 0,
            "records_received": 0,
            "records_duplicate": 0,
            "records_stale": 0,
            "records_invalid": 0,
            "records_accepted": 0,
            "ae_exchanges": 0,
            "ignored_peer": 0,
            "internal_errors": 0,
            "records_refused": 0,
            "eager_pulls": 0,
            "records_undecodable": 0,
            "records_deferred": 0,
            "records_over_quota": 0,
            "records_over_version": 0,
            "soft_expired": 0,
            "bytes_sent_membership": 0,
            "bytes_sent_gossip": 0,
            "bytes_sent_ae": 0,
            "bytes_sent_records": 0,
            "ae_records_sent": 0,  # records in our anti-entropy replies
            "bytes_sent_ae_records": 0,
        }
        self._faults_logged: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        # Membership updates and records queue apart: records are the clan's
        # state and get a larger retransmit budget (see RECORD_RETRANSMIT_FACTOR).
        self._bq = BroadcastQueue(config.retransmit_mult, self._num_nodes)
        self._rq = BroadcastQueue(
            config.retransmit_mult * RECORD_RETRANSMIT_FACTOR, self._num_nodes
        )
        # Records over BIG_RECORD bytes (a topology view of many machines)
        # get memberlist's plain budget: their bytes, not their count, are
        # the cost, and anti-entropy brings them to whoever the push missed.
        self._rq_big = BroadcastQueue(config.retransmit_mult, self._num_nodes)
        # Members we marked dead or left: we keep trying to reach them, so
        # partitions heal (Serf's reconnect) and a restarted member that
        # remembers nobody is found again (see REJOIN_FANOUT).
        base = config.push_pull_interval if config.push_pull_interval > 0 else RECONNECT_INTERVAL
        self._rejoin = RejoinSchedule(base, rng)
        self._membership = Membership(
            config,
            self.node_id,
            addr,
            rng,
            now,
            encode_node_meta(name),
            broadcast=self._queue_membership,
            incarnation=incarnation,
            regossip_push_pull_replies=regossip_push_pull_replies,
        )
        self._ae = ae.AntiEntropy(store, self.origin)
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._pending: dict[int, tuple[tuple[SignedRecord, ...], _Continuation]] = {}
        self._scores: OrderedDict[str, _PeerScore] = OrderedDict()
        self._last_seen: dict[str, float] = {}
        # Bodies we published in this run, so we can re-assert them when a
        # peer shows us an older run's record of ours with a higher version.
        self._own: dict[tuple[str, str], Any] = {}
        self._next_gossip_at = now + rng.random() * config.gossip_interval
        self._next_eager_pull_at = 0.0
        self._eager_rounds = 0
        self._next_ae_at = self._ae_interval_from(now, first=True)
        self._now = now

    # -- helpers --------------------------------------------------------------

    def _num_nodes(self) -> int:
        return max(1, self._membership.num_members())

    def _queue_membership(self, key: str, msg: Message) -> None:
        self._bq.queue(("m", key), encode_message(msg))

    def _ae_interval_from(self, now: float, *, first: bool = False) -> float:
        interval = self.config.push_pull_interval
        if interval <= 0:
            return math.inf
        scaled = push_pull_scale(interval, self._membership.num_members())
        return now + (self._rng.random() * scaled if first else scaled)

    def _send(
        self,
        out: list[NodeAction],
        node_id: str | None,
        addr: str,
        data: bytes,
        what: str = "membership",
    ) -> None:
        # `what`: membership (probes, acks, suspicion; with piggybacked
        # broadcasts), gossip (broadcast rounds) or ae (anti-entropy); the
        # record bytes inside the first two are also in bytes_sent_records.
        self.stats["bytes_sent"] += len(data)
        self.stats["msgs_sent"] += 1
        self.stats["bytes_sent_" + what] += len(data)
        out.append(SendTo(node_id, addr, data))

    def _send_message(self, out: list[NodeAction], send: Send) -> None:
        item = encode_message(send.message)
        items = [item]
        if not isinstance(send.message, PushPull):
            # Piggyback queued gossip on every small message, as memberlist does.
            room = self.config.packet_size - len(item) - _COMPOUND_OVERHEAD
            if room > 0:
                items.extend(self._take_broadcasts(room))
        self._send(out, send.to, send.addr, compound(items))

    def _handle_membership_actions(self, actions: Iterable[Any], out: list[NodeAction]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send_message(out, action)
                continue
            names = _EVENT_NAMES.get(type(action))
            if names is None:
                continue
            state, change = names
            if action.node != self.node_id:
                if state in ("dead", "left"):
                    self._rejoin.lost(action.node, action.addr, self._now)
                else:
                    self._rejoin.found(action.node)
            info = self._membership.member(action.node)
            name = decode_node_meta(info.meta) if info is not None else ""
            out.append(
                MemberChanged(action.node, name, action.addr, state, action.incarnation, change)
            )

    def _offence(
        self, out: list[NodeAction], from_node: str | None, from_addr: str, reason: str
    ) -> None:
        peer = from_node or from_addr
        scores = self._scores
        sc = scores.get(peer)
        if sc is None:
            sc = scores[peer] = _PeerScore(since=self._now)
            if len(scores) > MAX_SCORES:
                scores.popitem(last=False)
        else:
            sc.decay(self._now)
            if sc.score == 0:
                sc.since = self._now
            scores.move_to_end(peer)
        sc.score -= OFFENCE_COST
        sc.offences += 1
        sc.last_reason = reason
        out.append(PeerMisbehaved(from_node, from_addr, reason, sc.score))

    def _ignored(self, from_node: str | None, from_addr: str) -> bool:
        sc = self._scores.get(from_node or from_addr)
        if sc is None:
            return False
        sc.decay(self._now)
        return sc.score <= SCORE_FLOOR

    def _refuse(
        self,
        out: list[NodeAction],
        rec: SignedRecord,
        from_node: str | None,
        from_addr: str,
        counter: str,
        reason: str,
    ) -> None:
        """Count a record refused for its signed content.  The content is the
        origin's doing: only a sender that is the origin is scored down (a relay
        forwarding someone else's record is not)."""
        self.stats[counter] += 1
        if from_node is not None and from_node == node_id_of(rec.origin):
            self._offence(out, from_node, from_addr, reason)

    def _undecodable(
        self,
        out: list[NodeAction],
        rid: bytes | None,
        data: bytes,
        from_node: str | None,
        from_addr: str,
        exc: WireError,
    ) -> bytes | None:
        """A record that does not decode under RECORD_LIMITS.  When its origin's
        signature still covers the payload, the origin made it so (a record
        too big for our limits, say, from a peer with other limits): counted
        and logged once, only the origin scored down -- never the relay that
        forwarded it.  Else the bytes are the sender's doing.  Returns the
        origin when known."""
        origin = SignedRecord.signed_by(data)
        if origin is None:
            self.stats["records_invalid"] += 1
            self._offence(out, from_node, from_addr, f"invalid record: {exc.reason}")
            return None
        self.stats["records_undecodable"] += 1
        if rid is not None:
            self._remember(rid)
        key = (origin.hex(), "undecodable", exc.reason[:60])
        if key not in self._faults_logged:
            self._faults_logged[key] = None
            if len(self._faults_logged) > FAULT_LOG_KEYS:
                self._faults_logged.popitem(last=False)
            log.warning(
                "record of origin %s is over our limits or unreadable (%s); not taken",
                origin.hex()[:16],
                exc.reason,
            )
        if from_node is not None and from_node == node_id_of(origin):
            self._offence(out, from_node, from_addr, f"undecodable record: {exc.reason}")
        return origin

    def _unchecked(
        self,
        out: list[NodeAction],
        rec: SignedRecord,
        from_node: str | None,
        from_addr: str,
        exc: WireError,
    ) -> None:
        """A record of another clan or of an origin we do not admit (yet: an
        inventory that admits it may still be on its way to us).  Counted; a
        member relaying it is not scored down, any other sender is."""
        self.stats["records_invalid"] += 1
        if from_node is None or from_node == node_id_of(rec.origin):
            self._offence(out, from_node, from_addr, f"invalid record: {exc.reason}")

    def _accept_body(
        self,
        rec: SignedRecord,
        from_node: str | None,
        from_addr: str,
        out: list[NodeAction],
    ) -> str | None:
        """The checks of a verified record's content: the validate hook, then
        quotas.  None to accept, else the counter it was dropped under."""
        if self._validate is not None:
            try:
                self._validate(rec)
            except Exception as exc:  # noqa: BLE001 -- any refusal of the hook
                if getattr(exc, "transient", False) is True:
                    # Cannot decide yet: drop unscored; anti-entropy brings it back.
                    self.stats["records_deferred"] += 1
                    return "records_deferred"
                why = f"refused record {rec.kind!r}: {exc}"[:_MAX_REASON]
                self._refuse(out, rec, from_node, from_addr, "records_refused", why)
                return "records_refused"
        over_quota = getattr(self.store, "over_quota", None)
        reason = over_quota(rec) if over_quota is not None else None
        if reason is not None:
            self._refuse(out, rec, from_node, from_addr, "records_over_quota", reason)
            return "records_over_quota"
        return None

    def _remember(self, rid: bytes) -> None:
        seen = self._seen
        seen[rid] = None
        if len(seen) > SEEN_CACHE:
            seen.popitem(last=False)

    # -- inputs ---------------------------------------------------------------

    def join(self, now: float, seeds: Iterable[str]) -> list[NodeAction]:
        """Contact seed addresses: full member-state exchange plus record sync."""
        self._now = now
        out: list[NodeAction] = []
        seeds = [s for s in seeds if s != self.addr]
        self._handle_membership_actions(self._membership.join(now, [(None, s) for s in seeds]), out)
        for seed in seeds:
            self._send_ae_request(out, None, seed)
        return out

    def receive(
        self, now: float, from_addr: str, data: bytes, *, from_node: str | None = None
    ) -> list[NodeAction]:
        """Handle one datagram.  Never raises on bad input: it is counted and dropped."""
        self._now = now
        out: list[NodeAction] = []
        self.stats["bytes_received"] += len(data)
        self.stats["msgs_received"] += 1
        if self._ignored(from_node, from_addr):
            self.stats["ignored_peer"] += 1
            return out
        if from_node is not None:
            self._last_seen[from_node] = now
        try:
            # Every message inside is then checked by its strict schema, which
            # admits no deep nesting: the depth walk of unpack() would be waste.
            value = unpack_shallow(data, DATAGRAM_LIMITS)
            if type(value) is not list or len(value) != 2:
                raise WireError("datagram must be [version, messages]")
            version, items = value
            if type(version) is not int or not version >= MIN_PROTOCOL_VERSION:
                raise WireError(f"unsupported protocol version {version!r}")
            if type(items) is not list or len(items) > MAX_ITEMS:
                raise WireError("messages must be an array of bounded length")
        except WireError as exc:
            self.stats["malformed"] += 1
            self._offence(out, from_node, from_addr, f"malformed datagram: {exc.reason}")
            return out
        for item in items:
            mtype: Any = None
            try:
                if type(item) is not list or len(item) != 2:
                    raise WireError("message must be [type, body]")
                mtype, body = item
                self._dispatch(now, from_addr, from_node, mtype, body, out)
            except WireError as exc:
                self.stats["malformed"] += 1
                self._offence(out, from_node, from_addr, f"malformed message: {exc.reason}")
            except Exception as exc:  # noqa: BLE001 -- the fault boundary
                # A bug of ours, triggered by this peer's message: count it, log
                # it once, drop the rest of the datagram, keep the node running.
                self._internal_error(from_node, from_addr, mtype, exc)
                break
        return out

    def _internal_error(
        self, from_node: str | None, from_addr: str, mtype: Any, exc: Exception
    ) -> None:
        self.stats["internal_errors"] += 1
        mname = str(mtype) if type(mtype) is int else type(mtype).__name__
        key = (from_node or from_addr, type(exc).__name__, mname)
        logged = self._faults_logged
        if key in logged:
            return
        logged[key] = None
        if len(logged) > FAULT_LOG_KEYS:
            logged.popitem(last=False)
        log.error(
            "internal error handling message type %s from %s (%s); datagram rest dropped",
            mname,
            key[0],
            from_addr,
            exc_info=exc,
        )

    def _dispatch(
        self,
        now: float,
        from_addr: str,
        from_node: str | None,
        mtype: Any,
        body: Any,
        out: list[NodeAction],
    ) -> None:
        # Decode (every field checked) before anything touches state.
        msg = decode_message(mtype, body)
        if msg is None:
            # Unknown types from a newer peer are skipped, not punished.
            self.stats["unknown_type"] = self.stats.get("unknown_type", 0) + 1
            return
        if isinstance(msg, RecordMessage):
            self._on_record(now, from_addr, from_node, msg.data, out)
        elif isinstance(msg, AeRequest):
            self._reply_ae(out, from_node, from_addr, msg.digest, with_digest=True)
        elif isinstance(msg, AeReply):
            self.stats["ae_exchanges"] += 1
            delta = ae.WireDelta(msg.records, msg.claims)
            self._on_delta(now, from_addr, from_node, delta, out)
            if msg.digest is not None:
                self._reply_ae(out, from_node, from_addr, msg.digest, with_digest=False)
        else:
            m = self._membership
            if (
                isinstance(msg, Alive) and m.alive_is_stale(msg.node, msg.incarnation, msg.addr)
            ) or (
                isinstance(msg, Suspect)
                and m.suspect_is_stale(msg.node, msg.incarnation, msg.from_node)
            ):
                self.stats["stale"] = self.stats.get("stale", 0) + 1
                return
            if from_node is not None:
                self._last_seen[from_node] = now
            self._handle_membership_actions(
                self._membership.receive(now, from_addr, msg, from_node=from_node), out
            )

    # -- records --------------------------------------------------------------

    def _check_record(self, rec: SignedRecord) -> None:
        if rec.clan != self.clan:
            raise WireError("record belongs to another clan")
        if self._admit is not None and not self._admit(rec):
            raise WireError("record origin is not admitted")

    def _on_record(
        self,
        now: float,
        from_addr: str,
        from_node: str | None,
        data: bytes,
        out: list[NodeAction],
    ) -> None:
        self.stats["records_received"] += 1
        rid = hashlib.blake2b(data, digest_size=32).digest()
        if rid in self._seen:
            self.stats["records_duplicate"] += 1
            return
        try:
            rec = SignedRecord.decode(data, RECORD_LIMITS, verify=False)
        except WireError as exc:
            self._undecodable(out, rid, data, from_node, from_addr, exc)
            return
        try:
            self._check_record(rec)
        except WireError as exc:
            self._unchecked(out, rec, from_node, from_addr, exc)
            return
        held = self.store.get(rec.origin, rec.kind, rec.key)
        if held is not None and held.version >= rec.version:
            self._remember(rid)
            self.stats["records_stale"] += 1
            return
        try:
            rec.verify()
        except WireError as exc:
            # A bad signature is the sender's doing, whoever the origin claims to be.
            self.stats["records_invalid"] += 1
            self._offence(out, from_node, from_addr, f"invalid record: {exc.reason}")
            return
        if rec.version >= MAX_RECORD_VERSION:
            self._remember(rid)
            self._refuse(
                out, rec, from_node, from_addr, "records_over_version", "version at or over 2**53"
            )
            return
        dropped = self._accept_body(rec, from_node, from_addr, out)
        if dropped == "records_refused":
            # Refused for good: its copies cost a hash from now on.  (Deferred
            # and over-quota records may be taken later, so they are not remembered.)
            self._remember(rid)
        if dropped is not None:
            return
        self._remember(rid)
        self._persist(now, (rec,), _Continuation(from_addr=from_addr), out)

    def _persist(
        self,
        now: float,
        records: tuple[SignedRecord, ...],
        cont: _Continuation,
        out: list[NodeAction],
    ) -> None:
        is_durable = getattr(self.store, "is_durable", None)
        if getattr(self.store, "path", None) is None or (
            is_durable is not None and not any(is_durable(r.kind) for r in records)
        ):
            # An in-memory store, or soft records only (held in memory, never
            # fsynced): "durable" at once, no round trip through the shell.
            self._after_persist(now, records, self.store.put_many(records), cont, out)
            return
        self._pending[id(records)] = (records, cont)
        out.append(Persist(records))

    def persisted(
        self,
        now: float,
        records: tuple[SignedRecord, ...],
        results: list[bool] | None = None,
    ) -> list[NodeAction]:
        """The shell made `records` (from a Persist action) durable.

        `results` are `store.put_many`'s; None means the shell did not write
        them and the node must (used by drivers with an in-memory store).
        """
        self._now = now
        out: list[NodeAction] = []
        entry = self._pending.pop(id(records), None)
        cont = entry[1] if entry is not None and entry[0] is records else _Continuation()
        if results is None:
            results = self.store.put_many(records)
        self._after_persist(now, records, results, cont, out)
        return out

    def persist_failed(self, records: tuple[SignedRecord, ...]) -> None:
        """The shell could not write `records`: forget them so they can come again."""
        self._pending.pop(id(records), None)
        for rec in records:
            self._seen.pop(rec.record_id, None)

    def _after_persist(
        self,
        now: float,
        records: tuple[SignedRecord, ...],
        results: list[bool],
        cont: _Continuation,
        out: list[NodeAction],
    ) -> None:
        fresh = big = False
        held: list[SignedRecord] = []
        unheld: set[bytes] = set()  # origins with a record the store refused (quota)
        for rec, stored in zip(records, results, strict=True):
            if not stored:
                have = self.store.get(rec.origin, rec.kind, rec.key)
                if have is None or have.version < rec.version:
                    # Refused by the store itself (its quota, racing our check):
                    # counted, and forgotten so that it may come again.
                    self.stats["records_over_quota"] += 1
                    self._seen.pop(rec.record_id, None)
                    unheld.add(rec.origin)
                else:
                    held.append(rec)
                continue
            held.append(rec)
            self.stats["records_accepted"] += 1
            self._note_soft(now, rec)
            if rec.origin == self.origin:
                self._reassert_own(now, rec, out)
            elif cont.claims is None:
                self._ae.note_stored(rec)
            if cont.rebroadcast or rec.size > _PUSH_MAX:
                item = pack_plain([int(MsgType.RECORD), rec.encode()])
                if len(item) <= _PUSH_MAX:
                    queue = self._rq_big if len(item) > BIG_RECORD else self._rq
                    queue.queue(("r", rec.origin, rec.kind, rec.key), item)
                    fresh = True
                else:
                    # Too big for a gossip datagram: it would wait in the
                    # queue forever.  Spread it by pull instead, at once.
                    big = True
            out.append(RecordAccepted(rec))
        if cont.claims is not None:
            # Anti-entropy: account for the batch (the store already holds it,
            # so apply() only moves watermarks) with the sender's claims.  A
            # record the store refused is not held: its origin's claim must not
            # move our watermark past it.
            claims = {o: v for o, v in cont.claims.items() if o not in unheld}
            self._ae.apply(held, claims, verify=False)
            # Everything the peer sent is durable now: a sync completed.
            self.stats["ae_synced"] = self.stats.get("ae_synced", 0) + 1
        if fresh and self._eager:
            # Start spreading at once instead of waiting for the next tick.
            self._next_gossip_at = min(self._next_gossip_at, now)
        if big:
            # A record over the gossip budget (an inventory of a few hundred
            # machines and up): push-pull with `gossip_nodes` members now and
            # in the next EAGER_PULL_ROUNDS - 1 gossip rounds, so each fetches
            # it from us if it lacks it.  An epidemic that moves the record
            # about once per member, where pushing it would move it
            # `transmit_limit` times per member; after 3 rounds of fanout 3 a
            # member is missed with probability about e**-9 (anti-entropy
            # brings it later).
            self._eager_rounds = EAGER_PULL_ROUNDS
            if now >= self._next_eager_pull_at:
                self._eager_pull(now, cont.from_addr, out)

    def _note_soft(self, now: float, rec: SignedRecord) -> None:
        if self._soft_ttl is None or rec.origin == self.origin:
            return
        ttl = self._soft_ttl(rec.kind)
        if ttl is None:
            return
        until = now + ttl
        triple = (rec.origin, rec.kind, rec.key)
        self._soft_until[triple] = until
        heapq.heappush(self._soft_heap, (until, *triple))

    def _expire_soft(self, now: float) -> None:
        """Drop soft records whose origin did not refresh them within the TTL.

        The anti-entropy watermark of that origin stays where it is: a peer
        that still holds the same version does not send it back (it expired
        for a reason), and the origin's next version is above it."""
        heap = self._soft_heap
        while heap and heap[0][0] <= now:
            until, origin, kind, key = heapq.heappop(heap)
            if self._soft_until.get((origin, kind, key)) != until:
                continue  # refreshed since: a later entry holds its deadline
            del self._soft_until[(origin, kind, key)]
            if self.store.delete(origin, kind, key):
                self.stats["soft_expired"] += 1

    def _eager_pull(self, now: float, from_addr: str, out: list[NodeAction]) -> None:
        self._eager_rounds -= 1
        self._next_eager_pull_at = now + self.config.gossip_interval
        self.stats["eager_pulls"] += 1
        k = self.config.gossip_nodes
        # One more than needed: the member that sent it to us has it.
        peers = [p for p in self._membership.random_members(k + 1) if p[1] != from_addr]
        for node_id, addr in peers[:k]:
            self._send_ae_request(out, node_id, addr)

    def _reassert_own(self, now: float, rec: SignedRecord, out: list[NodeAction]) -> None:
        """A peer showed us our own record from an earlier run (we restarted
        with less state).  Keep it (our version counter moves past it) and
        publish what this run said for that key again, above it."""
        mine = self._own.get((rec.kind, rec.key))
        if mine is not None and mine != rec.body:
            _, actions = self.publish(now, rec.kind, rec.key, mine)
            out.extend(actions)

    def publish(
        self, now: float, kind: str, key: str, body: Any, *, push: bool = True
    ) -> tuple[SignedRecord, list[NodeAction]]:
        """Sign and spread a new record of ours (version = our highest + 1).

        `push=False` (a soft record republished unchanged, only to renew its
        TTL): no epidemic push; it spreads by anti-entropy alone, reaching
        each member about once instead of being pushed by every member
        `transmit_limit` times."""
        self._now = now
        top = self.store.max_version(self.origin)
        if top >= MAX_RECORD_VERSION - 1:
            # A store that holds one of ours at the bound (one that does not
            # quarantine such records itself): continue after the valid ones.
            top = max(
                (
                    r.version
                    for r in self.store.by_origin(self.origin)
                    if r.version < MAX_RECORD_VERSION - 1
                ),
                default=0,
            )
        version = top + 1
        pending_max = max(
            (
                r.version
                for recs, _ in self._pending.values()
                for r in recs
                if r.origin == self.origin and r.version < MAX_RECORD_VERSION - 1
            ),
            default=0,
        )
        version = max(version, pending_max + 1)
        if self._wall_clock is not None and not self._floored:
            floor = int(self._wall_clock() * 1000)
            version = max(version, min(floor, MAX_RECORD_VERSION - 1))
            self._floored = True
        rec = SignedRecord.create(self.identity, kind, key, version, body, clan=self.clan)
        self._own[(kind, key)] = rec.body
        self._remember(rec.record_id)
        out: list[NodeAction] = []
        self._persist(now, (rec,), _Continuation(rebroadcast=push), out)
        if not push:
            self.stats["published_unpushed"] = self.stats.get("published_unpushed", 0) + 1
        return rec, out

    # -- anti-entropy ------------------------------------------------------

    def _send_ae_request(self, out: list[NodeAction], node_id: str | None, addr: str) -> None:
        item = pack([int(MsgType.AE_REQUEST), ae.encode_digest(self._ae.digest())])
        self._send(out, node_id, addr, compound([item]), "ae")

    def _reply_ae(
        self,
        out: list[NodeAction],
        node_id: str | None,
        addr: str,
        peer_digest: dict[bytes, int],
        *,
        with_digest: bool,
    ) -> None:
        delta = self._ae.deltas_for(peer_digest, AE_BUDGET)
        if not delta.records and not with_digest:
            return
        if delta.records:
            self.stats["ae_records_sent"] += len(delta.records)
            self.stats["bytes_sent_ae_records"] += sum(r.size for r in delta.records)
        body = {
            "d": ae.encode_delta(delta),
            "g": ae.encode_digest(self._ae.digest()) if with_digest else None,
        }
        self._send(out, node_id, addr, compound([pack([int(MsgType.AE_REPLY), body])]), "ae")

    def _on_delta(
        self,
        now: float,
        from_addr: str,
        from_node: str | None,
        delta: ae.WireDelta,
        out: list[NodeAction],
    ) -> None:
        # A claim at or over the version bound can never be backed by records.
        claims = {o: v for o, v in delta.complete_through.items() if v < MAX_RECORD_VERSION}
        fresh: list[SignedRecord] = []
        valid: list[SignedRecord] = []
        taint_all = False
        for data in delta.records:
            try:
                rec = SignedRecord.decode(data, RECORD_LIMITS, verify=False)
            except WireError as exc:
                origin = self._undecodable(out, None, data, from_node, from_addr, exc)
                if origin is None:
                    taint_all = True
                else:
                    claims.pop(origin, None)
                continue
            try:
                self._check_record(rec)
            except WireError as exc:
                self._unchecked(out, rec, from_node, from_addr, exc)
                claims.pop(rec.origin, None)
                continue
            try:
                held = self.store.get(rec.origin, rec.kind, rec.key)
                if held is None or held.version < rec.version:
                    rec.verify()
                    if rec.version >= MAX_RECORD_VERSION:
                        reason = "version at or over 2**53"
                        self._refuse(out, rec, from_node, from_addr, "records_over_version", reason)
                        claims.pop(rec.origin, None)
                        continue
                    if self._accept_body(rec, from_node, from_addr, out) is not None:
                        claims.pop(rec.origin, None)
                        continue
                    fresh.append(rec)
                    self._remember(rec.record_id)
                valid.append(rec)
            except WireError as exc:  # a bad signature: the sender's doing
                self.stats["records_invalid"] += 1
                self._offence(out, from_node, from_addr, f"invalid record: {exc.reason}")
                claims.pop(rec.origin, None)
        if taint_all:
            claims = {}
        fresh_ids = {id(r) for r in fresh}
        # Records we already held still count for the watermarks.
        stale = tuple(r for r in valid if id(r) not in fresh_ids)
        if not fresh:
            if stale or claims:
                self._ae.apply(stale, claims, verify=False)
            self.stats["ae_synced"] = self.stats.get("ae_synced", 0) + 1
            return
        if stale:
            self._ae.apply(stale, {}, verify=False)
        # The claims wait until the fresh records are durable.
        self._persist(now, tuple(fresh), _Continuation(claims=claims, rebroadcast=False), out)

    # -- timers ----------------------------------------------------------------

    def tick(self, now: float) -> list[NodeAction]:
        """Fire every timer that is due."""
        self._now = now
        out: list[NodeAction] = []
        if self._soft_heap and self._soft_heap[0][0] <= now:
            self._expire_soft(now)
        self._handle_membership_actions(self._membership.tick(now), out)
        if now >= self._next_gossip_at:
            self._next_gossip_at = now + self.config.gossip_interval
            self._gossip(out)
        if self._eager_rounds > 0 and now >= self._next_eager_pull_at:
            self._eager_pull(now, "", out)
        if now >= self._rejoin.next_deadline():
            self._reconnect(now, out)
        if now >= self._next_ae_at:
            # (Moved on even after we left: a deadline left in the past would
            # make the driver tick us in a busy loop.)
            self._next_ae_at = self._ae_interval_from(now)
            peers = [] if self._membership.has_left else self._membership.random_members(1)
            if peers:
                node_id, addr = peers[0]
                self._send_ae_request(out, node_id, addr)
        return out

    def _reconnect(self, now: float, out: list[NodeAction]) -> None:
        """Try each lost member whose turn has come: a full state exchange, as a join.

        A partition long enough for both sides to declare each other dead
        would otherwise never heal (nothing probes dead members), and a member
        that restarted knowing nobody would stay alone (nothing dials a member
        that left)."""
        due = self._rejoin.due(now)
        if not due or self._membership.has_left:
            return
        odds = REJOIN_FANOUT / max(1, self._membership.alive_count() - 1)
        for node_id, addr in due:
            if odds < 1.0 and self._rng.random() >= odds:
                self.stats["rejoin_skipped"] = self.stats.get("rejoin_skipped", 0) + 1
                continue
            self.stats["reconnects"] = self.stats.get("reconnects", 0) + 1
            self._handle_membership_actions(self._membership.join(now, [(node_id, addr)]), out)
            self._send_ae_request(out, node_id, addr)

    def set_rejoin_scope(self, node_ids: Iterable[str] | None) -> None:
        """The members the inventory lists (None: no inventory): lost members
        are retried only while listed."""
        self._rejoin.scope(node_ids)

    def rejoin_pending(self) -> dict[str, tuple[str, int, float]]:
        """Lost members we keep trying: node id -> (addr, attempts, next at)."""
        return self._rejoin.pending()

    def _queued(self) -> bool:
        return bool(len(self._bq) or len(self._rq) or len(self._rq_big))

    def _take_broadcasts(self, room: int) -> list[bytes]:
        items = self._bq.get_broadcasts(2, room)
        if items:
            room -= sum(len(i) + 2 for i in items)
        for queue in (self._rq, self._rq_big):
            if room > 0 and len(queue):
                recs = queue.get_broadcasts(2, room)
                size = sum(len(i) for i in recs)
                self.stats["bytes_sent_records"] += size
                room -= size + 2 * len(recs)
                items.extend(recs)
        return items

    def _gossip(self, out: list[NodeAction]) -> None:
        if not self._queued() or self.config.gossip_nodes == 0:
            return
        # The retransmit budget is spent on alive members only: during a
        # partition, gossip to the unreachable half would use it up and leave
        # our own side short.  One more copy goes to a suspect or recently
        # dead member (uncounted) so it can refute, as memberlist's gossip does.
        targets = self._membership.random_members(self.config.gossip_nodes)
        data = b""
        for node_id, addr in targets:
            items = self._take_broadcasts(GOSSIP_BUDGET)
            if not items:
                break
            data = compound(items)
            self._send(out, node_id, addr, data, "gossip")
        if data:
            extra = self._membership.random_members(
                1, exclude={t[0] for t in targets}, alive_only=False
            )
            for node_id, addr in extra:
                info = self._membership.member(node_id)
                if info is not None and info.state is not MemberState.ALIVE:
                    self._send(out, node_id, addr, data, "gossip")

    def next_deadline(self) -> float:
        best = self._membership.next_deadline()
        t = self._next_gossip_at if self._queued() else math.inf
        t = min(t, self._rejoin.next_deadline())
        if self._eager_rounds > 0:
            t = min(t, self._next_eager_pull_at)
        if self._soft_heap:
            t = min(t, self._soft_heap[0][0])
        if best is not None:
            t = min(t, best)
        return min(t, self._next_ae_at)

    def leave(self, now: float) -> list[NodeAction]:
        out: list[NodeAction] = []
        self._handle_membership_actions(self._membership.leave(now), out)
        # Push the news out now rather than at the next tick.
        self._gossip(out)
        return out

    # -- queries ----------------------------------------------------------------

    @property
    def incarnation(self) -> int:
        return self._membership.incarnation

    @property
    def membership(self) -> Membership:
        return self._membership

    @property
    def antientropy(self) -> ae.AntiEntropy:
        return self._ae

    def member_state(self, node_id: str) -> str | None:
        info = self._membership.member(node_id)
        return None if info is None else _STATE_NAMES[info.state]

    def members(self) -> list[dict[str, Any]]:
        out = []
        for info in self._membership.members():
            out.append(
                {
                    "node_id": info.node,
                    "name": decode_node_meta(info.meta),
                    "addr": info.addr,
                    "state": _STATE_NAMES[info.state],
                    "incarnation": info.incarnation,
                    "state_change": info.state_change,
                    "rtt_ms": None if info.rtt is None else round(info.rtt * 1000, 3),
                    "last_seen": self._last_seen.get(info.node),
                    "self": info.node == self.node_id,
                }
            )
        return out

    def counters(self) -> dict[str, int]:
        """The node's stats (a copy): traffic, drops by reason, internal errors."""
        out = dict(self.stats)
        out.update(self._rejoin.stats)
        out["rejoin_pending"] = len(self._rejoin)
        return out

    def peer_scores(self) -> dict[str, int]:
        for sc in self._scores.values():
            sc.decay(self._now)
        return {k: v.score for k, v in self._scores.items()}
