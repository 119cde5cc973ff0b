"""SWIM membership with Lifeguard, as a sans-IO state machine.

Owns: who is in the clan and in which state (alive, suspect, dead, left)
with which incarnation; the randomized round-robin probe cycle (ping, then
indirect pings through `indirect_checks` peers, then suspicion); the
Lifeguard refinements (nacks from the helpers of indirect probes, local
health awareness that stretches our probe interval, suspicion timers that
shrink as independent peers confirm); refutation with incarnation numbers;
graceful leave; full-state push/pull on join and on a timer; and an RTT per
member measured from probe round trips.  The transition rules are those of
memberlist `state.go` (`aliveNode`, `suspectNode`, `deadNode`, `refute`,
`probeNode`, `resetNodes`, `mergeState`); see the table below.

Must never: read a clock, sleep, touch a socket, import trio, or draw
randomness from anywhere but the injected `random.Random`.  Time comes in as
`now` (float seconds) on every call; what to send comes out as `Send`
actions; membership updates to gossip go to the injected `broadcast(key,
message)` sink, never straight onto the network (the composer piggybacks
them on pings, acks and gossip ticks and retransmits them as memberlist's
`queue.go` does).

The transitions (what an Alive, Suspect or Dead about member X does to our
view of X) are the table `TRANSITIONS` below: data, in one place, walked by
the three state-message handlers and tested pair by pair.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from clanagent.gossip.awareness import Awareness
from clanagent.gossip.config import GossipConfig, next_push_pull
from clanagent.gossip.errors import LocalProtocolError
from clanagent.gossip.events import (
    MAX_ADDR_LEN,
    MAX_INCARNATION,
    MAX_META_LEN,
    MAX_NODE_ID_LEN,
    MAX_SEQ,
    Ack,
    Action,
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
    NodeStateEntry,
    Ping,
    PushPull,
    Send,
    Suspect,
)
from clanagent.gossip.suspicion import Suspicion

__all__ = [
    "Membership",
    "MemberInfo",
    "MemberState",
    "BroadcastSink",
    "MAX_RELAYS",
    "MAX_WITNESS_PROBES",
    "View",
    "StateMsg",
    "Guard",
    "Outcome",
    "Rule",
    "TRANSITIONS",
]

BroadcastSink = Callable[[str, Message], None]

# Indirect probes we run for others at once; more are dropped, so a flood of
# IndirectPing requests cannot grow our memory without bound.
MAX_RELAYS = 1024
# Witness probes (of members others suspect) we run at once; a flood of
# suspicions about many members cannot make us probe more than this.
MAX_WITNESS_PROBES = 16

_ALIVE = MemberState.ALIVE
_SUSPECT = MemberState.SUSPECT
_DEAD = MemberState.DEAD
_LEFT = MemberState.LEFT


class View(enum.Enum):
    """What we hold about the member X a state message is about."""

    UNKNOWN = "unknown"  # nothing
    ALIVE = "alive"
    SUSPECT = "suspect"  # alive, under a suspicion timer
    DEAD = "dead"
    LEFT = "left"
    SELF = "self"  # X is us, and we are in the clan
    SELF_LEFT = "self-left"  # X is us, and we left


class StateMsg(enum.Enum):
    """The state messages about a member X."""

    ALIVE = "alive"  # Alive about X
    SUSPECT = "suspect"  # Suspect about X
    DEAD = "dead"  # Dead about X, from another member
    LEAVE = "leave"  # Dead about X, from X itself


class Guard(enum.Enum):
    """Conditions a rule may require ("inc" is the message's incarnation,
    "ours" the one we hold for X; likewise addr and meta)."""

    OLDER = "inc < ours"
    NOT_NEWER = "inc <= ours"
    SAME = "inc, addr and meta as ours"
    ELSEWHERE = "addr is not ours"
    # X itself told us, over its authenticated session, at a newer
    # incarnation, from another address: a restart on a new address.
    MOVED = "moved: from X itself, newer, addr not ours"
    # X is dead for longer than dead_node_reclaim_time (when that is set).
    RECLAIMABLE = "dead past dead_node_reclaim_time"


class Outcome(enum.Enum):
    """What a rule does."""

    IGNORE = "ignore"
    REFUTE = "refute"  # out-bid it: our incarnation = max(ours, inc) + 1
    JOIN = "join"  # take the picture, alive; MemberJoined
    REVIVE = "revive"  # take the picture, alive; MemberAlive (+ MemberUpdated)
    UPDATE = "update"  # take the picture; MemberUpdated if addr or meta changed
    SUSPECT = "suspect"  # suspect, start the timer; MemberSuspect
    CONFIRM = "confirm"  # count a confirmation of the timer (re-gossip if new)
    DIE = "die"  # dead; MemberDead
    LEAVE = "leave"  # left; MemberLeft


@dataclass(frozen=True, slots=True)
class Rule:
    """When every guard in `when` holds, do `then` (and count `count`)."""

    when: tuple[Guard, ...]
    then: Outcome
    count: str | None = None


_V, _M, _G, _O = View, StateMsg, Guard, Outcome
_IGNORED = (Rule((), _O.IGNORE),)
_REFUTED = (Rule((_G.OLDER,), _O.IGNORE), Rule((), _O.REFUTE))

# ---------------------------------------------------------------------------
# THE TRANSITION TABLE.  What a state message about member X does to our view
# of X, for every (view, message) pair, and nowhere else: the rules of a pair
# are tried in order and the first whose guards all hold wins; the last rule
# of every pair has no guard.  The rules are memberlist `state.go`'s
# (`aliveNode`, `suspectNode`, `deadNode`, `refute`), plus address moves by
# the member itself.  `_on_alive`, `_on_suspect` and `_on_dead` only carry
# out the outcome of the rule found here.
# ---------------------------------------------------------------------------
TRANSITIONS: dict[tuple[View, StateMsg], tuple[Rule, ...]] = {
    (_V.UNKNOWN, _M.ALIVE): (Rule((), _O.JOIN),),
    (_V.UNKNOWN, _M.SUSPECT): _IGNORED,
    (_V.UNKNOWN, _M.DEAD): _IGNORED,
    (_V.UNKNOWN, _M.LEAVE): _IGNORED,
    (_V.ALIVE, _M.ALIVE): (
        Rule((_G.MOVED,), _O.UPDATE, "address_moved"),
        Rule((_G.ELSEWHERE,), _O.IGNORE, "address_conflict"),
        Rule((_G.NOT_NEWER,), _O.IGNORE),
        Rule((), _O.UPDATE),
    ),
    (_V.ALIVE, _M.SUSPECT): (Rule((_G.OLDER,), _O.IGNORE), Rule((), _O.SUSPECT)),
    (_V.ALIVE, _M.DEAD): (Rule((_G.OLDER,), _O.IGNORE), Rule((), _O.DIE)),
    (_V.ALIVE, _M.LEAVE): (Rule((_G.OLDER,), _O.IGNORE), Rule((), _O.LEAVE)),
    (_V.SUSPECT, _M.ALIVE): (
        Rule((_G.MOVED,), _O.REVIVE, "address_moved"),
        Rule((_G.ELSEWHERE,), _O.IGNORE, "address_conflict"),
        Rule((_G.NOT_NEWER,), _O.IGNORE),
        Rule((), _O.REVIVE),
    ),
    (_V.SUSPECT, _M.SUSPECT): (Rule((_G.OLDER,), _O.IGNORE), Rule((), _O.CONFIRM)),
    (_V.SUSPECT, _M.DEAD): (Rule((_G.OLDER,), _O.IGNORE), Rule((), _O.DIE)),
    (_V.SUSPECT, _M.LEAVE): (Rule((_G.OLDER,), _O.IGNORE), Rule((), _O.LEAVE)),
    (_V.DEAD, _M.ALIVE): (
        Rule((_G.ELSEWHERE, _G.RECLAIMABLE), _O.JOIN),
        Rule((_G.MOVED,), _O.JOIN, "address_moved"),
        Rule((_G.ELSEWHERE,), _O.IGNORE, "address_conflict"),
        Rule((_G.NOT_NEWER,), _O.IGNORE),
        Rule((), _O.JOIN),
    ),
    (_V.DEAD, _M.SUSPECT): _IGNORED,
    (_V.DEAD, _M.DEAD): _IGNORED,
    (_V.DEAD, _M.LEAVE): _IGNORED,
    (_V.LEFT, _M.ALIVE): (
        Rule((_G.ELSEWHERE,), _O.JOIN),  # a member that left may come back anywhere
        Rule((_G.NOT_NEWER,), _O.IGNORE),
        Rule((), _O.JOIN),
    ),
    (_V.LEFT, _M.SUSPECT): _IGNORED,
    (_V.LEFT, _M.DEAD): _IGNORED,
    (_V.LEFT, _M.LEAVE): _IGNORED,
    (_V.SELF, _M.ALIVE): (
        Rule((_G.OLDER,), _O.IGNORE),
        Rule((_G.SAME,), _O.IGNORE),
        Rule((), _O.REFUTE),  # a newer or other picture of us, e.g. from before a restart
    ),
    (_V.SELF, _M.SUSPECT): _REFUTED,
    (_V.SELF, _M.DEAD): _REFUTED,
    (_V.SELF, _M.LEAVE): _REFUTED,  # we did not leave: someone replays or forges it
    (_V.SELF_LEFT, _M.ALIVE): _IGNORED,  # a stale Alive must not undo our leave
    (_V.SELF_LEFT, _M.SUSPECT): _IGNORED,
    (_V.SELF_LEFT, _M.DEAD): _IGNORED,
    (_V.SELF_LEFT, _M.LEAVE): _IGNORED,
}
# The table compiled for `Membership._transition`: each rule with its guards as a bit mask.
_OLDER, _NOT_NEWER, _SAME, _ELSEWHERE, _MOVED, _RECLAIMABLE = (1 << i for i in range(len(Guard)))
_GUARD_BIT = {
    Guard.OLDER: _OLDER,
    Guard.NOT_NEWER: _NOT_NEWER,
    Guard.SAME: _SAME,
    Guard.ELSEWHERE: _ELSEWHERE,
    Guard.MOVED: _MOVED,
    Guard.RECLAIMABLE: _RECLAIMABLE,
}
_COMPILED = {
    pair: tuple((sum(_GUARD_BIT[g] for g in rule.when), rule) for rule in rules)
    for pair, rules in TRANSITIONS.items()
}
_VIEW_OF_STATE = {
    MemberState.ALIVE: View.ALIVE,
    MemberState.SUSPECT: View.SUSPECT,
    MemberState.DEAD: View.DEAD,
    MemberState.LEFT: View.LEFT,
}

# Kinds of entries in the timer heap.
_T_SUSPICION = 0
_T_RELAY_NACK = 1
_T_RELAY_EXPIRE = 2
_T_SUSPICION_CHECK = 3
_T_WITNESS_INDIRECT = 4
_T_WITNESS_END = 5


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A snapshot of one member, for `clanctl peers` and the composer."""

    node: str
    addr: str
    state: MemberState
    incarnation: int
    state_change: float
    meta: bytes
    rtt: float | None


@dataclass(slots=True, eq=False)
class _Node:
    # eq=False: members are compared by identity, which is both what we mean
    # and much cheaper in the hot random-selection loop.
    id: str
    addr: str
    meta: bytes
    incarnation: int
    state: MemberState
    state_change: float
    rtt: float | None = None


@dataclass(slots=True, eq=False)
class _Probe:
    seq: int
    node: _Node
    incarnation: int
    sent_at: float
    timeout_at: float  # end of the direct phase
    end_at: float  # end of the whole probe (awareness-scaled probe interval)
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True, eq=False)
class _Relay:
    requester: str
    requester_addr: str
    requester_seq: int
    want_nack: bool


class Membership:
    """One node's view of the clan.

    Feed it `receive` (decoded messages) and `tick`, act on the actions they
    return (`Send` and member events), and ask `next_deadline()` after every
    call: a `receive` can move a deadline earlier (a confirmed suspicion).

    `broadcast(key, message)` receives every Alive/Suspect/Dead to gossip;
    `key` is the node id the message is about, and a newer message for a key
    replaces the queued older one.  Without a sink the messages collect in
    `take_broadcasts()`.  `incarnation` is where a (re)started node begins;
    it rises past whatever the clan remembers as soon as it hears of it.
    `regossip_push_pull_replies=False` keeps what a push/pull reply taught
    us out of the gossip queue (see `_on_push_pull`).
    """

    def __init__(
        self,
        config: GossipConfig,
        self_id: str,
        self_addr: str,
        rng: random.Random,
        now: float,
        meta: bytes | None = None,
        *,
        broadcast: BroadcastSink | None = None,
        incarnation: int = 1,
        regossip_push_pull_replies: bool = True,
    ) -> None:
        meta = b"" if meta is None else meta
        if not isinstance(self_id, str) or not 0 < len(self_id) <= MAX_NODE_ID_LEN:
            raise ValueError("self_id must be a non-empty str of bounded length")
        if not isinstance(self_addr, str) or not 0 < len(self_addr) <= MAX_ADDR_LEN:
            raise ValueError("self_addr must be a non-empty str of bounded length")
        if not isinstance(meta, bytes) or len(meta) > MAX_META_LEN:
            raise ValueError(f"meta must be bytes of at most {MAX_META_LEN}")
        if not 0 <= incarnation < MAX_INCARNATION:
            raise ValueError("incarnation out of range")
        self.config = config
        self.self_id = self_id
        self.self_addr = self_addr
        self._rng = rng
        self._now = now
        self._meta = meta
        self._pending: dict[str, Message] = {}
        self._broadcast: BroadcastSink = broadcast if broadcast is not None else self._queue
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._nodes: dict[str, _Node] = {}
        self._probe_list: list[_Node] = []
        self._probe_index = 0
        self._seq = 0
        self._incarnation = incarnation
        self._left = False
        self._alive = 0
        self._regossip_replies = regossip_push_pull_replies
        self._from_node: str | None = None  # authenticated sender of the message in hand
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        # Our probes of members someone else suspects, by sequence number.
        self._witness: dict[int, _Probe] = {}
        self._suspicions: dict[str, Suspicion] = {}
        # (when, tie-breaker, kind, key, Suspicion or _Relay); see tick().
        self._timers: list[tuple[float, int, int, Any, Any]] = []
        self._counter = itertools.count()
        # Random stagger, as memberlist's triggerFunc, so a clan started at
        # once does not probe in lock step.
        self._next_probe_at = now + rng.random() * config.probe_interval
        if config.push_pull_interval > 0:
            self._next_push_pull_at = now + rng.random() * config.push_pull_interval
        else:
            self._next_push_pull_at = math.inf
        # Counters of things we ignored, for `clanctl status` and tests.
        self.stats: dict[str, int] = {
            "misdirected_ping": 0,
            "address_conflict": 0,
            "unknown_ack": 0,
            "relay_overflow": 0,
            "unrefutable": 0,
            "refutes": 0,
            "address_moved": 0,
            "witness_probes": 0,
            "witness_confirmed": 0,
            "witness_overflow": 0,
            "suspicion_checks": 0,
            "final_checks": 0,
            "refute_direct": 0,
        }
        self._handlers: dict[type, Callable[[Message, str, float, list[Action]], None]] = {
            Ping: self._on_ping,
            IndirectPing: self._on_indirect_ping,
            Ack: self._on_ack,
            Nack: self._on_nack,
            Alive: self._on_alive_msg,
            Suspect: self._on_suspect_msg,
            Dead: self._on_dead_msg,
            PushPull: self._on_push_pull,
        }
        me = _Node(self_id, self_addr, meta, incarnation, _ALIVE, now)
        self._insert(me)
        self._alive = 1
        # Announce ourselves, as memberlist's setAlive does.
        self._broadcast(self_id, Alive(incarnation, self_id, self_addr, meta))

    # ------------------------------------------------------------------
    # inputs

    def join(self, now: float, seeds: Iterable[tuple[str | None, str]]) -> list[Action]:
        """Start a full-state exchange with each seed `(node id or None, addr)`."""
        self._now = now
        out: list[Action] = []
        state = None
        for node_id, addr in seeds:
            if addr == self.self_addr or node_id == self.self_id:
                continue
            if state is None:
                state = self._push_pull_message(reply=False)
            out.append(Send(node_id, addr, state))
        return out

    def receive(
        self, now: float, from_addr: str, message: Message, *, from_node: str | None = None
    ) -> list[Action]:
        """Handle one decoded message that arrived from `from_addr`.

        `from_node`: the sender's node id when the transport authenticated it
        (a peer session), else None.  A member may move its own address (it
        restarted on another port) only by telling us itself; and a push/pull
        reply goes back to an authenticated sender by id, not to the address
        its connection came from (an ephemeral port nobody listens on)."""
        self._now = now
        handler = self._handlers.get(type(message))
        if handler is None:
            raise LocalProtocolError(f"not a membership message: {type(message).__name__}")
        out: list[Action] = []
        self._from_node = from_node
        try:
            handler(message, from_addr, now, out)
        finally:
            self._from_node = None
        return out

    def tick(self, now: float) -> list[Action]:
        """Fire every timer whose deadline is at or before `now`."""
        self._now = now
        out: list[Action] = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, key, obj = heapq.heappop(timers)
            # Entries are never removed early; one that no longer matches the
            # live object (refuted, confirmed to an earlier deadline, relay
            # answered) is simply dropped here.
            if kind == _T_SUSPICION:
                if self._suspicions.get(key) is obj and obj.deadline <= now:
                    self._suspicion_expired(key, now, out)
            elif kind == _T_SUSPICION_CHECK:
                if self._suspicions.get(key) is obj:
                    self._suspicion_check(key, obj, now, out)
            elif kind >= _T_WITNESS_INDIRECT:
                if self._witness.get(key) is obj:
                    if kind == _T_WITNESS_INDIRECT:
                        self._start_indirect(obj, out)
                    else:
                        self._witness_failed(obj, now, out)
            elif self._relays.get(key) is obj:
                if kind == _T_RELAY_NACK:
                    if obj.want_nack:
                        out.append(Send(obj.requester, obj.requester_addr, Nack(obj.requester_seq)))
                else:
                    del self._relays[key]
        probe = self._probe
        if probe is not None:
            if not probe.indirect and now >= probe.timeout_at:
                self._start_indirect(probe, out)
            if now >= probe.end_at:
                self._probe_failed(probe, now, out)
        if self._left:
            return out
        if self._probe is None and now >= self._next_probe_at:
            self._next_probe_at = now + self.config.probe_interval
            self._probe_next(now, out)
        if now >= self._next_push_pull_at:
            self._next_push_pull_at = now + next_push_pull(
                self.config.push_pull_interval, len(self._probe_list), self._rng.random()
            )
            peers = self._k_random(1, self._not_alive_peer)
            if peers:
                peer = peers[0]
                out.append(Send(peer.id, peer.addr, self._push_pull_message(reply=False)))
        return out

    def leave(self, now: float) -> list[Action]:
        """Leave gracefully: gossip our own death and stop probing.

        The composer should keep gossiping for a moment (memberlist waits for
        the leave broadcast to go out) before it shuts the node down.
        """
        self._now = now
        out: list[Action] = []
        if self._left:
            return out
        self._left = True
        self._probe = None
        self._witness.clear()
        me = self._nodes[self.self_id]
        self._broadcast(self.self_id, Dead(me.incarnation, self.self_id, self.self_id))
        self._set_state(me, _LEFT, now)
        return out

    def next_deadline(self) -> float | None:
        """The earliest time `tick` has something to do, or None."""
        timers = self._timers
        while timers and not self._timer_live(timers[0]):
            heapq.heappop(timers)
        best = timers[0][0] if timers else math.inf
        probe = self._probe
        if probe is not None:
            best = min(best, probe.end_at if probe.indirect else probe.timeout_at)
        elif not self._left:
            best = min(best, self._next_probe_at)
        if not self._left:
            best = min(best, self._next_push_pull_at)
        return None if best == math.inf else best

    # ------------------------------------------------------------------
    # queries

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def has_left(self) -> bool:
        return self._left

    def members(self) -> list[MemberInfo]:
        """Every member we know, ourselves included."""
        return [self._info(n) for n in self._nodes.values()]

    def alive_is_stale(self, node_id: object, incarnation: object, addr: object) -> bool:
        """True when an Alive about `node_id` at `incarnation` would be ignored.

        A cheap pre-check on the raw wire values (TRANSITIONS' NOT_NEWER rule
        of a member we hold, at the address we hold: another address may be a
        reclaim or a move), so the duplicate copies an epidemic delivers cost
        a dict lookup instead of building a message."""
        if type(incarnation) is not int or not isinstance(node_id, str):
            return False
        node = self._nodes.get(node_id)
        return (
            node is not None
            and node_id != self.self_id
            and incarnation <= node.incarnation
            and addr == node.addr
        )

    def suspect_is_stale(self, node_id: object, incarnation: object, from_node: object) -> bool:
        """True when a Suspect would change nothing (TRANSITIONS' Suspect rules):
        unknown member, older incarnation, a confirmation we already counted or
        no longer need, or a member that is neither alive nor suspected."""
        if type(incarnation) is not int or type(node_id) is not str or type(from_node) is not str:
            return False
        if node_id == self.self_id:
            return False  # about us: we may owe the accuser an answer
        node = self._nodes.get(node_id)
        if node is None or incarnation < node.incarnation:
            return True
        timer = self._suspicions.get(node_id)
        if timer is not None:
            return timer.n >= timer.wanted or timer.has_confirmed(from_node)
        return node.state is not _ALIVE

    def member(self, node_id: str) -> MemberInfo | None:
        node = self._nodes.get(node_id)
        return None if node is None else self._info(node)

    def alive_count(self) -> int:
        """Alive members, ourselves included (suspects are not counted)."""
        return self._alive

    def num_members(self) -> int:
        """Members in any state that we still track (memberlist estNumNodes)."""
        return len(self._probe_list)

    def health_score(self) -> int:
        """Lifeguard awareness score: 0 healthy, up to awareness_max_multiplier - 1."""
        return self._awareness.score

    def random_members(
        self, k: int, exclude: Iterable[str] = (), alive_only: bool = True
    ) -> list[tuple[str, str]]:
        """Up to `k` distinct random members other than us, as (node id, addr).

        With `alive_only=False` the choice also includes suspects and members
        dead for less than `gossip_to_the_dead_time` (so they can refute), as
        memberlist's gossip does.  Costs O(k) random draws, not O(n).
        """
        excluded = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
        me = self.self_id
        if alive_only:

            def skip(n: _Node) -> bool:
                return n.state is not _ALIVE or n.id == me or n.id in excluded

        else:
            horizon = self._now - self.config.gossip_to_the_dead_time

            def skip(n: _Node) -> bool:
                if n.id == me or n.id in excluded:
                    return True
                if n.state is _ALIVE or n.state is _SUSPECT:
                    return False
                return n.state_change < horizon

        return [(n.id, n.addr) for n in self._k_random(k, skip)]

    def gossip_targets(self, k: int) -> list[tuple[str, str, bool]]:
        """Up to `k` distinct random members other than us that are alive or
        suspect, as (node id, addr, alive).  Suspects are drawn like alive
        members, as memberlist's gossip draws them: under heavy loss a member
        many of us suspect would otherwise hear a rumor far less often than
        the rest (the caller decides what a copy to a suspect costs)."""
        me = self.self_id

        def skip(n: _Node) -> bool:
            return (n.state is not _ALIVE and n.state is not _SUSPECT) or n.id == me

        return [(n.id, n.addr, n.state is _ALIVE) for n in self._k_random(k, skip)]

    def take_broadcasts(self) -> list[Message]:
        """Drain the default broadcast queue (used when no sink was injected)."""
        msgs = list(self._pending.values())
        self._pending.clear()
        return msgs

    def local_state(self) -> tuple[NodeStateEntry, ...]:
        """Our full view, as sent in a push/pull."""
        return tuple(
            NodeStateEntry(n.id, n.addr, n.incarnation, n.state, n.meta)
            for n in self._nodes.values()
        )

    # ------------------------------------------------------------------
    # probing

    def _probe_next(self, now: float, out: list[Action]) -> None:
        checked = 0
        while checked < len(self._probe_list):
            if self._probe_index >= len(self._probe_list):
                self._reset_nodes(now)
                self._probe_index = 0
                checked += 1
                continue
            node = self._probe_list[self._probe_index]
            self._probe_index += 1
            if node.id == self.self_id or node.state is _DEAD or node.state is _LEFT:
                checked += 1
                continue
            self._probe_node(node, now, out)
            return

    def _reset_nodes(self, now: float) -> None:
        """End of a round: forget members dead for long enough, reshuffle."""
        horizon = now - self.config.gossip_to_the_dead_time
        keep = []
        for node in self._probe_list:
            if (node.state is _DEAD or node.state is _LEFT) and node.state_change < horizon:
                del self._nodes[node.id]
            else:
                keep.append(node)
        self._rng.shuffle(keep)
        self._probe_list = keep

    def _probe_node(self, node: _Node, now: float, out: list[Action]) -> None:
        cfg = self.config
        seq = self._next_seq()
        # Lifeguard: while we think we are slow, give everyone longer before
        # concluding they failed.  The direct timeout is not scaled (waiting
        # longer would not help a lost datagram; the indirect phase does).
        interval = self._awareness.scale_timeout(cfg.probe_interval)
        self._probe = _Probe(
            seq, node, node.incarnation, now, now + cfg.probe_timeout, now + interval
        )
        out.append(Send(node.id, node.addr, Ping(seq, node.id, self.self_id, self.self_addr)))
        if node.state is not _ALIVE:
            # Tell a suspect directly, so it can refute at once.
            out.append(Send(node.id, node.addr, Suspect(node.incarnation, node.id, self.self_id)))

    def _start_indirect(self, probe: _Probe, out: list[Action]) -> None:
        probe.indirect = True
        target = probe.node
        me = self.self_id

        def skip(n: _Node) -> bool:
            return n.state is not _ALIVE or n is target or n.id == me

        msg = IndirectPing(probe.seq, target.id, target.addr, me, self.self_addr, True)
        for peer in self._k_random(self.config.indirect_checks, skip):
            probe.expected_nacks += 1
            out.append(Send(peer.id, peer.addr, msg))

    def _probe_failed(self, probe: _Probe, now: float, out: list[Action]) -> None:
        self._probe = None
        # Lifeguard: a helper that did not even nack points at our own
        # connectivity; with no helpers, any failure counts against us.
        if probe.expected_nacks > 0:
            delta = max(0, probe.expected_nacks - probe.nacks)
        else:
            delta = 1
        self._awareness.apply_delta(delta)
        node = probe.node
        if self._nodes.get(node.id) is node:
            self._on_suspect(Suspect(probe.incarnation, node.id, self.self_id), now, out)

    def _on_ping(self, msg: Ping, from_addr: str, now: float, out: list[Action]) -> None:
        if msg.target != self.self_id:
            # Someone reused an address; answering would vouch for the wrong node.
            self.stats["misdirected_ping"] += 1
            return
        addr = msg.source_addr if msg.source_addr is not None else from_addr
        out.append(Send(msg.source, addr, Ack(msg.seq)))

    def _on_indirect_ping(
        self, msg: IndirectPing, from_addr: str, now: float, out: list[Action]
    ) -> None:
        if len(self._relays) >= MAX_RELAYS:
            self.stats["relay_overflow"] += 1
            return
        seq = self._next_seq()
        relay = _Relay(msg.requester, msg.requester_addr, msg.seq, msg.nack)
        self._relays[seq] = relay
        self._push_timer(now + self.config.probe_timeout, _T_RELAY_NACK, seq, relay)
        self._push_timer(now + self.config.probe_interval, _T_RELAY_EXPIRE, seq, relay)
        out.append(
            Send(msg.target, msg.target_addr, Ping(seq, msg.target, self.self_id, self.self_addr))
        )

    def _on_ack(self, msg: Ack, from_addr: str, now: float, out: list[Action]) -> None:
        probe = self._probe
        if probe is not None and probe.seq == msg.seq:
            self._probe = None
            node = probe.node
            if from_addr == node.addr:
                # Only a direct answer measures the path to this member.
                node.rtt = now - probe.sent_at
            self._awareness.apply_delta(-1)
            return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            out.append(Send(relay.requester, relay.requester_addr, Ack(relay.requester_seq)))
            return
        witness = self._witness.pop(msg.seq, None)
        if witness is not None:
            # It answered us: no confirmation from here (only the member
            # itself can clear the suspicion, and we told it about it).
            node = witness.node
            if from_addr == node.addr:
                node.rtt = now - witness.sent_at
            timer = self._suspicions.get(node.id)
            if timer is not None and timer.checked:
                # Our final check reached it: give its refutation a probe
                # interval, then check again rather than declare it dead.
                timer.checked = False
                timer.postpone(now + self.config.probe_interval)
                self._push_timer(timer.deadline, _T_SUSPICION, node.id, timer)
            return
        self.stats["unknown_ack"] += 1

    def _on_nack(self, msg: Nack, from_addr: str, now: float, out: list[Action]) -> None:
        probe = self._probe
        if probe is not None and probe.seq == msg.seq and probe.nacks < probe.expected_nacks:
            probe.nacks += 1

    # ------------------------------------------------------------------
    # state messages

    def _on_alive_msg(self, msg: Alive, from_addr: str, now: float, out: list[Action]) -> None:
        self._on_alive(msg, now, out)

    def _on_suspect_msg(self, msg: Suspect, from_addr: str, now: float, out: list[Action]) -> None:
        self._on_suspect(msg, now, out)
        if msg.node == self.self_id and not self._left:
            # The accuser itself told us (not a gossiped copy): answer it
            # directly too, so a member that missed our refutation learns it
            # from us, whatever incarnation it suspected.
            accuser = self._nodes.get(msg.from_node)
            direct = (
                self._from_node == msg.from_node
                if self._from_node is not None
                else accuser is not None and accuser.addr == from_addr
            )
            if direct and msg.from_node != self.self_id:
                me = self._nodes[self.self_id]
                self.stats["refute_direct"] += 1
                out.append(
                    Send(msg.from_node, from_addr, Alive(me.incarnation, me.id, me.addr, me.meta))
                )

    def _on_dead_msg(self, msg: Dead, from_addr: str, now: float, out: list[Action]) -> None:
        self._on_dead(msg, now, out)

    def _transition(
        self,
        msg: StateMsg,
        node_id: str,
        inc: int,
        now: float,
        addr: str | None = None,
        meta: bytes | None = None,
    ) -> tuple[Outcome, _Node | None]:
        """Our view of `node_id`, and the outcome of the first rule of
        TRANSITIONS[view, msg] whose guards all hold (its counter counted)."""
        node = self._nodes.get(node_id)
        if node_id == self.self_id:
            view = View.SELF_LEFT if self._left else View.SELF
        elif node is None:
            view = View.UNKNOWN
        else:
            view = _VIEW_OF_STATE[node.state]
        rules = _COMPILED[(view, msg)]
        held = 0
        if len(rules) > 1 and node is not None:
            # Every guard at once: cheaper than a call per guard of each rule.
            ours = node.incarnation
            if inc < ours:
                held |= _OLDER
            if inc <= ours:
                held |= _NOT_NEWER
            if addr != node.addr:
                held |= _ELSEWHERE
                if inc > ours and self._from_node == node_id:
                    held |= _MOVED
            elif inc == ours and meta == node.meta:
                held |= _SAME
            reclaim = self.config.dead_node_reclaim_time
            if reclaim > 0 and now - node.state_change > reclaim:
                held |= _RECLAIMABLE
        for mask, rule in rules:
            if held & mask == mask:
                if rule.count is not None:
                    self.stats[rule.count] += 1
                return rule.then, node
        raise AssertionError(f"no rule for {view}, {msg}")  # every last rule has no guard

    def _on_alive(self, a: Alive, now: float, out: list[Action], regossip: bool = True) -> None:
        then, node = self._transition(StateMsg.ALIVE, a.node, a.incarnation, now, a.addr, a.meta)
        if then is Outcome.IGNORE:
            return
        if then is Outcome.REFUTE:
            self._refute(node, a.incarnation)  # type: ignore[arg-type]
            return
        # JOIN, REVIVE or UPDATE: take the message's picture of X.
        if node is None:
            changed = False
            node = _Node(a.node, a.addr, a.meta, a.incarnation, _DEAD, now)
            self._insert(node)
        else:
            self._suspicions.pop(a.node, None)
            changed = node.meta != a.meta or node.addr != a.addr
            node.incarnation = a.incarnation
            node.meta = a.meta
            node.addr = a.addr
        if regossip:
            self._broadcast(a.node, a)
        if node.state is not _ALIVE:
            self._set_state(node, _ALIVE, now)
        if then is Outcome.JOIN:
            out.append(MemberJoined(a.node, a.addr, a.incarnation, a.meta))
            return
        if then is Outcome.REVIVE:
            out.append(MemberAlive(a.node, a.addr, a.incarnation))
        if changed:
            out.append(MemberUpdated(a.node, a.addr, a.incarnation, a.meta))

    def _on_suspect(self, s: Suspect, now: float, out: list[Action]) -> None:
        then, node = self._transition(StateMsg.SUSPECT, s.node, s.incarnation, now)
        if then is Outcome.IGNORE or node is None:  # (no node: the rule was IGNORE)
            return
        if then is Outcome.REFUTE:
            self._refute(node, s.incarnation)
            return
        if then is Outcome.CONFIRM:
            # Already suspect: count an independent confirmation, and pass it
            # on only if it was news, so confirmations keep flowing.
            timer = self._suspicions[s.node]
            if timer.confirm(s.from_node, now):
                self._push_timer(timer.deadline, _T_SUSPICION, s.node, timer)
                self._broadcast(s.node, s)
            return
        # Outcome.SUSPECT
        self._broadcast(s.node, s)
        node.incarnation = s.incarnation
        self._set_state(node, _SUSPECT, now)
        cfg = self.config
        # Aim to hit the nominal timeout two probe intervals short of what
        # the multiplier gives; with too few members to confirm, expect none.
        n = len(self._probe_list)
        k = cfg.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        low = cfg.suspicion_timeout(n)
        high = cfg.suspicion_max_timeout_mult * low
        # The quorum needs that many members besides us, the suspect and the
        # one who raised it.
        quorum = cfg.suspicion_quorum if n - 3 >= cfg.suspicion_quorum else 0
        timer = Suspicion(
            s.from_node,
            k,
            low,
            high,
            now,
            quorum=quorum,
            quorum_timeout=cfg.suspicion_quorum_timeout,
        )
        self._suspicions[s.node] = timer
        self._push_timer(timer.deadline, _T_SUSPICION, s.node, timer)
        if now + low < timer.deadline:
            self._push_timer(now + low, _T_SUSPICION_CHECK, s.node, timer)
        out.append(MemberSuspect(node.id, node.addr, node.incarnation))
        if s.from_node != self.self_id and quorum:
            self._maybe_witness(node, now, out)

    def _maybe_witness(self, node: _Node, now: float, out: list[Action]) -> None:
        """Probe a member someone else suspects, with a chance chosen so that
        about `suspicion_witnesses` members do: a failure is our independent
        confirmation; the Suspect we send it lets a live member refute."""
        cfg = self.config
        others = len(self._probe_list) - 2  # not us, not the suspect
        if cfg.suspicion_witnesses <= 0 or others <= 0 or self._left:
            return
        if others > cfg.suspicion_witnesses and (
            self._rng.random() * others >= cfg.suspicion_witnesses
        ):
            return
        probe = self._probe
        if probe is not None and probe.node is node:
            return  # our own round is probing it already
        self._start_witness(node, now, out)

    def _start_witness(self, node: _Node, now: float, out: list[Action]) -> _Probe | None:
        """Probe `node` outside our round and tell it it is suspected."""
        cfg = self.config
        if len(self._witness) >= MAX_WITNESS_PROBES:
            self.stats["witness_overflow"] += 1
            return None
        seq = self._next_seq()
        end = now + self._awareness.scale_timeout(cfg.probe_interval)
        witness = _Probe(seq, node, node.incarnation, now, now + cfg.probe_timeout, end)
        self._witness[seq] = witness
        self.stats["witness_probes"] += 1
        self._push_timer(witness.timeout_at, _T_WITNESS_INDIRECT, seq, witness)
        self._push_timer(end, _T_WITNESS_END, seq, witness)
        out.append(Send(node.id, node.addr, Ping(seq, node.id, self.self_id, self.self_addr)))
        out.append(Send(node.id, node.addr, Suspect(node.incarnation, node.id, self.self_id)))
        return witness

    def _witness_failed(self, probe: _Probe, now: float, out: list[Action]) -> None:
        del self._witness[probe.seq]
        node = probe.node
        if (
            self._nodes.get(node.id) is node
            and node.state is _SUSPECT
            and node.incarnation == probe.incarnation
        ):
            self.stats["witness_confirmed"] += 1
            self._on_suspect(Suspect(probe.incarnation, node.id, self.self_id), now, out)

    def _suspicion_check(
        self, node_id: str, timer: Suspicion, now: float, out: list[Action]
    ) -> None:
        """Lifeguard's nominal timeout passed and too few confirmed: a live
        member refutes within a second, so perhaps its refutation missed us.
        Probe it and tell it; it answers us directly.  (Silence only adds our
        confirmation; the timer still decides.)"""
        node = self._nodes.get(node_id)
        if node is None or node.state is not _SUSPECT or self._left:
            return
        if self._start_witness(node, now, out) is not None:
            self.stats["suspicion_checks"] += 1

    def _suspicion_expired(self, node_id: str, now: float, out: list[Action]) -> None:
        node = self._nodes.get(node_id)
        if node is None or node.state is not _SUSPECT:
            self._suspicions.pop(node_id, None)
            return
        timer = self._suspicions[node_id]
        if not timer.confirmed_enough and not timer.checked and not self._left:
            # Too few others confirmed: perhaps the member refuted long ago and
            # the refutation missed us (an epidemic can miss a member, more so
            # under loss).  Before declaring it dead, probe it ourselves and
            # tell it; a live member refutes to us directly.
            timer.checked = True
            probe = self._start_witness(node, now, out)
            if probe is not None:
                self.stats["final_checks"] += 1
                timer.postpone(probe.end_at)
                self._push_timer(timer.deadline, _T_SUSPICION, node_id, timer)
                return
        self._on_dead(Dead(node.incarnation, node_id, self.self_id), now, out)

    def _on_dead(self, d: Dead, now: float, out: list[Action]) -> None:
        msg = StateMsg.LEAVE if d.node == d.from_node else StateMsg.DEAD
        then, node = self._transition(msg, d.node, d.incarnation, now)
        if then is Outcome.IGNORE or node is None:  # (no node: the rule was IGNORE)
            return
        if then is Outcome.REFUTE:
            self._refute(node, d.incarnation)
            return
        # Outcome.DIE or Outcome.LEAVE (X is not us: our own leave is `leave`)
        self._suspicions.pop(d.node, None)
        self._broadcast(d.node, d)
        node.incarnation = d.incarnation
        left = then is Outcome.LEAVE
        self._set_state(node, _LEFT if left else _DEAD, now)
        out.append((MemberLeft if left else MemberDead)(node.id, node.addr, node.incarnation))

    def _refute(self, me: _Node, accused: int) -> None:
        if accused >= MAX_INCARNATION:
            # Cannot out-bid it; a peer sending this is broken or hostile.
            self.stats["unrefutable"] += 1
            return
        inc = self._incarnation + 1
        if accused >= inc:
            inc = accused + 1
        self._incarnation = inc
        me.incarnation = inc
        self.stats["refutes"] += 1
        # Lifeguard: being accused hints that we are the slow one.
        self._awareness.apply_delta(1)
        self._broadcast(me.id, Alive(inc, me.id, me.addr, me.meta))

    # ------------------------------------------------------------------
    # push/pull

    def _push_pull_message(self, reply: bool) -> PushPull:
        return PushPull(reply, self.local_state())

    def _on_push_pull(self, msg: PushPull, from_addr: str, now: float, out: list[Action]) -> None:
        if not msg.reply:
            out.append(Send(self._from_node, from_addr, self._push_pull_message(reply=True)))
        me = self.self_id
        # memberlist re-gossips everything new it merges.  A joiner merging
        # the seed's reply would then queue the whole clan for gossip, which
        # everyone but itself already knows; the flag lets a large clan skip
        # that (the seed still gossips the joiner, learned from the request).
        regossip = self._regossip_replies or not msg.reply
        for r in msg.states:
            if r.state is _ALIVE:
                alive = Alive(r.incarnation, r.node, r.addr, r.meta)
                self._on_alive(alive, now, out, regossip)
            elif r.state is _LEFT:
                self._on_dead(Dead(r.incarnation, r.node, r.node), now, out)
            else:
                # A remote "dead" is only a suspicion here: we give the member
                # our own timer to refute, as memberlist's mergeState does.
                self._on_suspect(Suspect(r.incarnation, r.node, me), now, out)

    # ------------------------------------------------------------------
    # helpers

    def _queue(self, key: str, message: Message) -> None:
        self._pending[key] = message

    def _insert(self, node: _Node) -> None:
        """Add a member at a random place in the probe order (as memberlist):
        appending would make new members wait a whole round to be probed."""
        self._nodes[node.id] = node
        lst = self._probe_list
        n = len(lst)
        lst.append(node)
        if n:
            j = self._rng.randrange(n)
            lst[j], lst[n] = lst[n], lst[j]

    def _set_state(self, node: _Node, state: MemberState, now: float) -> None:
        if node.state is _ALIVE:
            self._alive -= 1
        if state is _ALIVE:
            self._alive += 1
        node.state = state
        node.state_change = now

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & MAX_SEQ
        return self._seq

    def _push_timer(self, when: float, kind: int, key: Any, obj: Any) -> None:
        heapq.heappush(self._timers, (when, next(self._counter), kind, key, obj))

    def _timer_live(self, entry: tuple[float, int, int, Any, Any]) -> bool:
        when, _, kind, key, obj = entry
        if kind == _T_SUSPICION:
            return self._suspicions.get(key) is obj and obj.deadline == when
        if kind == _T_SUSPICION_CHECK:
            return self._suspicions.get(key) is obj and not obj.confirmed_enough
        if kind >= _T_WITNESS_INDIRECT:
            return self._witness.get(key) is obj
        return self._relays.get(key) is obj

    def _not_alive_peer(self, n: _Node) -> bool:
        return n.state is not _ALIVE or n.id == self.self_id

    def _k_random(self, k: int, skip: Callable[[_Node], bool]) -> list[_Node]:
        """Up to `k` distinct members not skipped.

        Random draws first (memberlist kRandomNodes: O(k) when most members
        qualify, as in a healthy clan); when 3n draws were not enough (few
        qualify, or k is close to their number) a scan from a random offset
        finishes the job, so we never return fewer than exist.
        """
        lst = self._probe_list
        n = len(lst)
        picked: list[_Node] = []
        if k <= 0 or n == 0:
            return picked
        rand = self._rng.random
        for _ in range(3 * n):
            node = lst[int(rand() * n)]
            if node in picked or skip(node):
                continue
            picked.append(node)
            if len(picked) >= k:
                return picked
        start = int(rand() * n)
        chosen = set(map(id, picked))
        for i in range(n):
            node = lst[(start + i) % n]
            if id(node) in chosen or skip(node):
                continue
            picked.append(node)
            if len(picked) >= k:
                break
        return picked

    def _info(self, n: _Node) -> MemberInfo:
        return MemberInfo(n.id, n.addr, n.state, n.incarnation, n.state_change, n.meta, n.rtt)
