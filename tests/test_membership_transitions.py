"""The membership transition table (`gossip.membership.TRANSITIONS`), tested
as the handshake's is: its shape, what it allows, and that a real `Membership`
does what the table says for every (view, message) pair and every message
variant (older, same, newer incarnation; our address or another; our meta or
another; from the member itself or not; soon or long after a death)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest

from clanagent.gossip.config import GossipConfig
from clanagent.gossip.events import (
    Alive,
    Dead,
    MemberAlive,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberState,
    MemberSuspect,
    MemberUpdated,
    Send,
    Suspect,
)
from clanagent.gossip.membership import (
    TRANSITIONS,
    Guard,
    Membership,
    Outcome,
    StateMsg,
    View,
)

PAIRS = list(itertools.product(View, StateMsg))

# -- the table's shape -------------------------------------------------------


def test_every_view_and_message_pair_has_rules() -> None:
    assert set(TRANSITIONS) == set(PAIRS)


@pytest.mark.parametrize(("view", "msg"), PAIRS, ids=lambda x: x.value)
def test_every_pair_ends_with_one_unguarded_rule(view: View, msg: StateMsg) -> None:
    rules = TRANSITIONS[(view, msg)]
    assert rules and rules[-1].when == ()
    # An unguarded rule before the end would hide the rules after it.
    assert all(rule.when for rule in rules[:-1])


def test_what_the_table_allows() -> None:
    def outcomes(view: View | None = None, msg: StateMsg | None = None) -> set[Outcome]:
        return {
            rule.then
            for (v, m), rules in TRANSITIONS.items()
            for rule in rules
            if view in (None, v) and msg in (None, m)
        }

    # Only a message about us is refuted, and nothing about us changes after we left.
    assert {
        v for (v, _m), rules in TRANSITIONS.items() for r in rules if r.then is Outcome.REFUTE
    } == {View.SELF}
    assert outcomes(View.SELF) == {Outcome.IGNORE, Outcome.REFUTE}
    assert outcomes(View.SELF_LEFT) == {Outcome.IGNORE}
    # Only an Alive brings a member (back) in; the dead and the left hear nothing else.
    for msg in (StateMsg.SUSPECT, StateMsg.DEAD, StateMsg.LEAVE):
        for view in (View.UNKNOWN, View.DEAD, View.LEFT):
            assert outcomes(view, msg) == {Outcome.IGNORE}
    assert outcomes(msg=StateMsg.ALIVE) - {Outcome.IGNORE, Outcome.REFUTE} == {
        Outcome.JOIN,
        Outcome.REVIVE,
        Outcome.UPDATE,
    }
    # Only an alive member is suspected; a suspect one collects confirmations.
    assert {v for v, m in PAIRS if Outcome.SUSPECT in outcomes(v, m)} == {View.ALIVE}
    assert {v for v, m in PAIRS if Outcome.CONFIRM in outcomes(v, m)} == {View.SUSPECT}
    # A Dead is a death, a Dead from the member itself a leave.
    assert outcomes(msg=StateMsg.DEAD) == {Outcome.IGNORE, Outcome.DIE, Outcome.REFUTE}
    assert outcomes(msg=StateMsg.LEAVE) == {Outcome.IGNORE, Outcome.LEAVE, Outcome.REFUTE}
    # An older incarnation never changes a member we hold.
    for (view, msg), rules in TRANSITIONS.items():
        if view is not View.UNKNOWN and msg is not StateMsg.ALIVE:
            assert rules[0].when == () or rules[0].when == (Guard.OLDER,), (view, msg)


# -- a real Membership walks the table -----------------------------------------

OURS = 5  # X's incarnation in our view (and ours, when X is us)
RECLAIM = 10.0
T_STATE = 1.0  # when X entered its state
SOON, LATE = 2.0, 50.0


@dataclass(frozen=True)
class Variant:
    inc: int
    elsewhere: bool  # another address than the one we hold
    other_meta: bool
    from_x: bool  # X itself sent it, over its authenticated session
    late: bool  # long after X's state changed (past the reclaim time)

    @property
    def now(self) -> float:
        return LATE if self.late else SOON


ALIVE_VARIANTS = [
    Variant(inc, elsewhere, other_meta, from_x, late)
    for inc in (OURS - 1, OURS, OURS + 1)
    for elsewhere in (False, True)
    for other_meta in (False, True)
    for from_x in (False, True)
    for late in (False, True)
]
OTHER_VARIANTS = [
    Variant(inc, False, False, False, late)
    for inc in (OURS - 1, OURS, OURS + 1)
    for late in (False, True)
]


def guards_holding(v: Variant) -> set[Guard]:
    """Which guards hold, worked out from the variant (not by the code under test)."""
    held = set()
    if v.inc < OURS:
        held.add(Guard.OLDER)
    if v.inc <= OURS:
        held.add(Guard.NOT_NEWER)
    if v.inc == OURS and not v.elsewhere and not v.other_meta:
        held.add(Guard.SAME)
    if v.elsewhere:
        held.add(Guard.ELSEWHERE)
        if v.from_x and v.inc > OURS:
            held.add(Guard.MOVED)
    if v.late:
        held.add(Guard.RECLAIMABLE)
    return held


def expected_rule(view: View, msg: StateMsg, v: Variant):
    held = guards_holding(v)
    return next(r for r in TRANSITIONS[(view, msg)] if set(r.when) <= held)


def membership_in(view: View) -> tuple[Membership, str]:
    """A Membership whose view of the member "x" (or of itself) is `view`,
    with incarnation OURS, address x:1 and meta b"m"; and that member's id."""
    # (No witness probes: they are a side effect of a new suspicion, tested
    # in test_membership.py, not a transition.)
    cfg = GossipConfig(
        push_pull_interval=0.0, dead_node_reclaim_time=RECLAIM, suspicion_witnesses=0
    )
    if view in (View.SELF, View.SELF_LEFT):
        m = Membership(cfg, "x", "x:1", random.Random(1), 0.0, b"m", incarnation=OURS)
    else:
        m = Membership(cfg, "me", "me:1", random.Random(1), 0.0)
    # Enough members that a suspicion wants confirmations (so CONFIRM shows).
    for i in range(4):
        m.receive(0.0, f"p{i}:1", Alive(1, f"p{i}", f"p{i}:1"))
    if view not in (View.UNKNOWN, View.SELF, View.SELF_LEFT):
        m.receive(0.0, "p0:1", Alive(OURS, "x", "x:1", b"m"))
    if view is View.SUSPECT:
        m.receive(T_STATE, "p0:1", Suspect(OURS, "x", "p0"))
    elif view is View.DEAD:
        m.receive(T_STATE, "p0:1", Dead(OURS, "x", "p0"))
    elif view is View.LEFT:
        m.receive(T_STATE, "p0:1", Dead(OURS, "x", "x"))
    elif view is View.SELF_LEFT:
        m.leave(T_STATE)
    m.take_broadcasts()
    return m, "x"


def message(msg: StateMsg, v: Variant):
    if msg is StateMsg.ALIVE:
        return Alive(v.inc, "x", "x:2" if v.elsewhere else "x:1", b"n" if v.other_meta else b"m")
    if msg is StateMsg.SUSPECT:
        return Suspect(v.inc, "x", "p3")  # a confirmer that has not spoken yet
    if msg is StateMsg.DEAD:
        return Dead(v.inc, "x", "p3")
    return Dead(v.inc, "x", "x")


def variants(msg: StateMsg) -> list[Variant]:
    return ALIVE_VARIANTS if msg is StateMsg.ALIVE else OTHER_VARIANTS


CASES = [(view, msg, v) for view, msg in PAIRS for v in variants(msg)]


@pytest.mark.parametrize(("view", "msg", "v"), CASES)
def test_membership_does_what_the_table_says(view: View, msg: StateMsg, v: Variant) -> None:
    m, x = membership_in(view)
    rule = expected_rule(view, msg, v)
    before = m.member(x)
    our_inc = m.incarnation
    stats = dict(m.stats)
    sent = message(msg, v)
    stale = isinstance(sent, Alive) and m.alive_is_stale(x, sent.incarnation, sent.addr)
    stale_suspect = isinstance(sent, Suspect) and m.suspect_is_stale(
        x, sent.incarnation, sent.from_node
    )
    out = m.receive(v.now, "x:1", sent, from_node="x" if v.from_x else "p3")
    after = m.member(x)
    gossiped = m.take_broadcasts()

    # Besides the transition: a Suspect about us that its accuser sent us
    # itself is answered directly with our (possibly new) incarnation.
    direct = [a for a in out if isinstance(a, Send)]
    out = [a for a in out if not isinstance(a, Send)]
    if view is View.SELF and msg is StateMsg.SUSPECT and not v.from_x:
        assert direct == [Send("p3", "x:1", Alive(m.incarnation, x, "x:1", b"m"))]
    else:
        assert direct == []

    # The rule's counter, and no other.
    changed_stats = {k for k in m.stats if m.stats[k] != stats.get(k)} - {
        "refutes",
        "refute_direct",
    }
    assert changed_stats == ({rule.count} if rule.count else set())
    # The node's cheap pre-checks skip only what the table ignores (or a
    # confirmation that is no news).
    if stale:
        assert rule.then is Outcome.IGNORE
    if stale_suspect:
        assert rule.then in (Outcome.IGNORE, Outcome.CONFIRM) and gossiped == []

    then = rule.then
    if then is Outcome.IGNORE:
        assert out == [] and gossiped == []
        assert after == before and m.incarnation == our_inc
    elif then is Outcome.REFUTE:
        assert out == []
        assert m.incarnation == max(our_inc, sent.incarnation) + 1
        assert gossiped == [Alive(m.incarnation, x, "x:1", b"m")]
        assert after.state is MemberState.ALIVE
    elif then in (Outcome.JOIN, Outcome.REVIVE, Outcome.UPDATE):
        assert gossiped == [sent]
        assert after.state is MemberState.ALIVE
        assert (after.incarnation, after.addr, after.meta) == (
            sent.incarnation,
            sent.addr,
            sent.meta,
        )
        changed = before is not None and (before.addr, before.meta) != (sent.addr, sent.meta)
        update = [MemberUpdated(x, sent.addr, sent.incarnation, sent.meta)] if changed else []
        if then is Outcome.JOIN:
            assert out == [MemberJoined(x, sent.addr, sent.incarnation, sent.meta)]
        elif then is Outcome.REVIVE:
            assert out == [MemberAlive(x, sent.addr, sent.incarnation), *update]
        else:
            assert out == update
    elif then is Outcome.SUSPECT:
        assert out == [MemberSuspect(x, "x:1", sent.incarnation)] and gossiped == [sent]
        assert after.state is MemberState.SUSPECT
    elif then is Outcome.CONFIRM:
        # A new confirmation: passed on, the member still suspect, nothing else.
        assert out == [] and gossiped == [sent]
        assert after == before
    else:
        left = then is Outcome.LEAVE
        cls = MemberLeft if left else MemberDead
        assert out == [cls(x, "x:1", sent.incarnation)] and gossiped == [sent]
        assert after.state is (MemberState.LEFT if left else MemberState.DEAD)


def test_every_outcome_of_the_table_is_reached_by_some_case() -> None:
    """The cases above reach every rule of every pair: none is dead text."""
    reached = {(view, msg, expected_rule(view, msg, v)) for view, msg, v in CASES}
    every = {(view, msg, rule) for (view, msg), rules in TRANSITIONS.items() for rule in rules}
    assert reached == every
