"""One gossip node: membership, record dissemination and anti-entropy, sans-IO.

Owns: composing the membership protocol (`membership`), the record pipeline
(`pipeline`: every record between the wire and the store) and anti-entropy
(`antientropy`) into one participant; piggybacking queued broadcasts on
every small message, the gossip, eager-pull, rejoin and anti-entropy timers,
and peer scoring (decaying, bounded table).  The datagram and its messages
are `messages`'s; their names are re-exported here.  The trio shell
(`service.py`) and the simulator (`tests/sim/`) drive the same object:
bytes and `now` in, actions out.

Must never: read a clock, sleep, open a socket, import trio, forward or store
a record the pipeline has not verified, let a message touch state before it
is decoded and checked field by field (`messages.decode_message`), or let a
peer's bytes raise anything out of `receive` (bad input is counted, scored
and dropped; a fault of ours is counted, logged once and drops the rest of
that datagram).
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import limits as sizes
from ..wire import SignedRecord, WireError, pack, pack_plain, unpack_shallow
from . import antientropy as ae
from .broadcast_queue import BroadcastQueue, retransmit_limit
from .config import GossipConfig, next_push_pull, push_pull_scale
from .events import (
    AeReply,
    AeRequest,
    Alive,
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberState,
    MemberSuspect,
    MemberUpdated,
    Message,
    PushPull,
    RecordMessage,
    Send,
    Suspect,
)
from .membership import Membership
from .messages import (
    DATAGRAM_LIMITS,
    MAX_DATAGRAM,
    MAX_ITEMS,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    MemberChanged,
    MsgType,
    NodeAction,
    PeerMisbehaved,
    Persist,
    RecordAccepted,
    SendTo,
    compound,
    decode_message,
    decode_node_meta,
    encode_message,
    encode_node_meta,
)
from .pipeline import FAULT_LOG_KEYS, SEEN_CACHE, RecordPipeline
from .rejoin import RETRY_TIMEOUT, RejoinSchedule

__all__ = [
    "GossipNode",
    "NodeStats",
    # re-exported from .messages, where they live
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
    "decode_message",
    "decode_node_meta",
    "encode_message",
    "encode_node_meta",
    # re-exported from .pipeline
    "SEEN_CACHE",
    "FAULT_LOG_KEYS",
]

log = logging.getLogger("clanagent.gossip.node")

# Byte budgets: gossip datagrams and anti-entropy replies.
GOSSIP_BUDGET = sizes.GOSSIP_BUDGET
AE_BUDGET = sizes.AE_BUDGET  # leaves room for our digest in the same reply
# Push-pull rounds a node starts on taking a record too big to gossip.
EAGER_PULL_ROUNDS = 3
# Records are sent this many times more often than membership updates.
RECORD_RETRANSMIT_FACTOR = 2
# Records bigger than this (encoded, in bytes) are pushed with a smaller
# budget: memberlist's plain one when soft, DURABLE_MISS's when durable (see
# GossipNode._rq_big).
BIG_RECORD = 1024
# A big durable record (an inventory edit) is pushed often enough that a
# member misses a version with this chance at most, clan-wide (an epidemic
# where every member sends a record t times to random members misses a given
# member with chance about e**-t); anti-entropy brings it to one that did.
DURABLE_MISS = 1e-3


def durable_push_limit(retransmit_mult: int, n: int) -> int:
    """Transmits of a big durable record in a clan of `n`: memberlist's plain
    `retransmit_limit`, raised to `ln(n / DURABLE_MISS)` where that is more
    (clans of 10 to 99, where memberlist's budget is 8 and about 1 edit in
    50 at N=90 missed a member for up to 87 s)."""
    aimed = math.ceil(math.log(max(1, n) / DURABLE_MISS))
    return max(retransmit_limit(retransmit_mult, n), aimed)


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

_COMPOUND_OVERHEAD = 16
# The largest record item a gossip round can carry (get_broadcasts' 2-byte overhead).
_PUSH_MAX = GOSSIP_BUDGET - 2


def _record_item_size(size: int) -> int:
    """Bytes of the RECORD item `[9, bin]` around an envelope of `size` bytes,
    without encoding it: msgpack's fixarray and fixint take one byte each,
    the bin header 2, 3 or 5."""
    return 2 + (2 if size < 0x100 else 3 if size < 0x10000 else 5) + size


def _too_big_to_push(rec: SignedRecord) -> bool:
    """Can the record's RECORD item not fit a gossip round?  Such a record
    spreads by anti-entropy only."""
    return _record_item_size(rec.size) > _PUSH_MAX


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
        # Records over BIG_RECORD bytes cost their bytes on every push, and
        # anti-entropy brings them to whoever the push missed.  Soft ones (a
        # topology view of many machines, republished on their own) get
        # memberlist's plain budget; durable ones (an inventory edit: what
        # the clan waits for) enough to miss nobody with odds DURABLE_MISS.
        self._rq_big = BroadcastQueue(config.retransmit_mult, self._num_nodes)
        self._rq_durable = BroadcastQueue(
            config.retransmit_mult,
            self._num_nodes,
            limit=lambda n: durable_push_limit(config.retransmit_mult, n),
        )
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
        self._ae = ae.AntiEntropy(store, self.origin, priority=self._delta_priority)
        self._records = RecordPipeline(
            identity,
            clan=clan,
            store=store,
            antientropy=self._ae,
            stats=self.stats,
            offence=self._offence,
            spread=self._spread,
            admit=admit,
            validate=validate,
            wall_clock=wall_clock,
            soft_ttl=soft_ttl,
        )
        self._soft_ttl = soft_ttl
        self._scores: OrderedDict[str, _PeerScore] = OrderedDict()
        self._last_seen: dict[str, float] = {}
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
        n = self._membership.num_members()
        if first:
            return now + self._rng.random() * push_pull_scale(interval, n)
        return now + next_push_pull(interval, n, self._rng.random())

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
            self._records.on_record(now, from_addr, from_node, msg.data, out)
        elif isinstance(msg, AeRequest):
            self._reply_ae(out, from_node, from_addr, msg.digest, with_digest=True)
        elif isinstance(msg, AeReply):
            self.stats["ae_exchanges"] += 1
            delta = ae.WireDelta(msg.records, msg.claims)
            self._records.on_delta(now, from_addr, from_node, delta, out)
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

    # -- records (the pipeline takes them; spreading them is ours) -----------

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
        self._records.persisted(now, records, results, out)
        return out

    def persist_failed(self, records: tuple[SignedRecord, ...]) -> None:
        """The shell could not write `records`: forget them so they can come again."""
        self._records.persist_failed(records)

    def _eager_pull(self, now: float, from_addr: str, out: list[NodeAction]) -> None:
        self._eager_rounds -= 1
        self._next_eager_pull_at = now + self.config.gossip_interval
        self.stats["eager_pulls"] += 1
        k = self.config.gossip_nodes
        # One more than needed: the member that sent it to us has it.
        peers = [p for p in self._membership.random_members(k + 1) if p[1] != from_addr]
        for node_id, addr in peers[:k]:
            self._send_ae_request(out, node_id, addr)

    def _spread(
        self,
        now: float,
        records: Sequence[SignedRecord],
        rebroadcast: bool,
        from_addr: str,
        out: list[NodeAction],
    ) -> None:
        """Push records the pipeline just stored: queued for gossip when they
        came by gossip or from us (`rebroadcast`) or are too big to have come
        by anti-entropy from everyone, else left to anti-entropy."""
        fresh = big = False
        for rec in records:
            if _too_big_to_push(rec):
                # Too big for a gossip datagram: it would wait in the
                # queue forever.  Spread it by pull instead, at once.
                big = True
                continue
            if not rebroadcast:
                continue
            item = pack_plain([int(MsgType.RECORD), rec.encode()])
            if len(item) <= BIG_RECORD:
                queue = self._rq
            elif self._is_soft(rec.kind):
                queue = self._rq_big
            else:
                queue = self._rq_durable
            queue.queue(("r", rec.origin, rec.kind, rec.key), item)
            fresh = True
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
                self._eager_pull(now, from_addr, out)

    def _delta_priority(self, rec: SignedRecord) -> int:
        """Where a record's origin goes in an anti-entropy delta: records too
        big to push first (a delta is their only way), then durable ones,
        then soft ones (refreshed on their own)."""
        if _too_big_to_push(rec):
            return 0
        return 2 if self._is_soft(rec.kind) else 1

    def _is_soft(self, kind: str) -> bool:
        """A kind held in memory with a TTL and republished by its owner."""
        return self._soft_ttl is not None and self._soft_ttl(kind) is not None

    def publish(
        self, now: float, kind: str, key: str, body: Any, *, push: bool = True
    ) -> tuple[SignedRecord, list[NodeAction]]:
        """Sign and spread a new record of ours (version = our highest + 1).

        `push=False` (a soft record republished unchanged, only to renew its
        TTL): no epidemic push; it spreads by anti-entropy alone, reaching
        each member about once instead of being pushed by every member
        `transmit_limit` times."""
        self._now = now
        out: list[NodeAction] = []
        rec = self._records.publish(now, kind, key, body, out, push=push)
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

    # -- timers ----------------------------------------------------------------

    def tick(self, now: float) -> list[NodeAction]:
        """Fire every timer that is due."""
        self._now = now
        out: list[NodeAction] = []
        if now >= self._records.soft_deadline():
            self._records.expire_soft(now)
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
        return bool(len(self._bq) or len(self._rq) or len(self._rq_big) or len(self._rq_durable))

    def _take_broadcasts(self, room: int) -> list[bytes]:
        items = self._bq.get_broadcasts(2, room)
        if items:
            room -= sum(len(i) + 2 for i in items)
        for queue in (self._rq, self._rq_durable, self._rq_big):
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
        # Targets are drawn from alive and suspect members alike (memberlist
        # does so too): under heavy loss a member that many of us suspect for
        # a while would otherwise hear a rumor a third as often as the rest
        # and could miss it (at 50 % loss in 1000 nodes, one did, for a whole
        # minute).  The retransmit budget is spent on alive members only: a
        # suspect gets this tick's last counted packet, uncounted, so during a
        # partition the unreachable half cannot use up our own side's budget.
        # One more copy goes to a suspect or recently dead member (uncounted)
        # so it can refute, as memberlist's gossip does.
        targets = self._membership.gossip_targets(self.config.gossip_nodes)
        data = b""
        for node_id, addr, alive in targets:
            if not alive:
                continue
            items = self._take_broadcasts(GOSSIP_BUDGET)
            if not items:
                break
            data = compound(items)
            self._send(out, node_id, addr, data, "gossip")
        if data:
            for node_id, addr, alive in targets:
                if not alive:
                    self._send(out, node_id, addr, data, "gossip")
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
        t = min(t, self._records.soft_deadline())
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

    def queue_depths(self) -> dict[str, int]:
        """Broadcasts waiting to be gossiped: membership updates, records
        small enough to push often, and big ones."""
        return {
            "membership": len(self._bq),
            "records": len(self._rq),
            "records_big": len(self._rq_big) + len(self._rq_durable),
        }

    def member_state(self, node_id: str) -> str | None:
        info = self._membership.member(node_id)
        return None if info is None else _STATE_NAMES[info.state]

    def members(self) -> list[dict[str, Any]]:
        return [self._row(info) for info in self._membership.members()]

    def member_row(self, node_id: str) -> dict[str, Any] | None:
        """One member as `members()` lists it (None when we hold nothing)."""
        info = self._membership.member(node_id)
        return None if info is None else self._row(info)

    def _row(self, info: Any) -> dict[str, Any]:
        return {
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
