"""Lifeguard suspicion timer and local health awareness (pure, no I/O)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clanagent.gossip.awareness import Awareness
from clanagent.gossip.suspicion import Suspicion, remaining_suspicion_time

# (n, k, elapsed, min, max, expected remaining), the points memberlist's own
# suspicion_test.go checks; 4.81 s comes from floor(1000 * raw) milliseconds.
MEMBERLIST_POINTS = [
    (0, 3, 0.0, 2.0, 30.0, 30.0),
    (1, 3, 2.0, 2.0, 30.0, 14.0),
    (2, 3, 3.0, 2.0, 30.0, 4.81),
    (3, 3, 4.0, 2.0, 30.0, -2.0),
    (4, 3, 5.0, 2.0, 30.0, -3.0),
    (5, 3, 10.0, 2.0, 30.0, -8.0),
]


@pytest.mark.parametrize(("n", "k", "elapsed", "lo", "hi", "expected"), MEMBERLIST_POINTS)
def test_remaining_time_matches_memberlist(n, k, elapsed, lo, hi, expected):
    assert remaining_suspicion_time(n, k, elapsed, lo, hi) == pytest.approx(expected, abs=1e-9)


def test_remaining_time_is_floored_to_milliseconds():
    # raw = 30 - log(3)/log(4) * 28 = 7.8104...; memberlist truncates to 7.810 s
    got = remaining_suspicion_time(2, 3, 0.0, 2.0, 30.0)
    assert got == pytest.approx(7.810, abs=1e-9)
    assert got < 30 - math.log(3) / math.log(4) * 28


@given(
    k=st.integers(1, 10),
    lo=st.floats(0.001, 100.0),
    extra=st.floats(0.0, 1000.0),
)
def test_timeout_decreases_with_confirmations_and_stays_in_bounds(k, lo, extra):
    hi = lo + extra
    values = [remaining_suspicion_time(n, k, 0.0, lo, hi) for n in range(k + 1)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert all(lo - 1e-9 <= v <= hi + 1e-9 for v in values)
    assert values[-1] == pytest.approx(lo, abs=1e-3)


def test_new_timer_starts_at_max():
    s = Suspicion("a", 3, 2.0, 30.0, now=100.0)
    assert s.deadline == 130.0
    assert s.n == 0


def test_confirmations_shrink_deadline_like_memberlist():
    s = Suspicion("a", 3, 2.0, 30.0, now=100.0)
    assert s.confirm("b", now=101.0) is True
    assert s.deadline == pytest.approx(116.0)  # 16 s total after one confirmation
    assert s.confirm("c", now=102.0) is True
    assert s.deadline == pytest.approx(107.810)
    assert s.confirm("d", now=103.0) is True
    assert s.deadline == pytest.approx(102.0)  # min reached; already in the past
    assert s.n == 3


def test_only_new_independent_confirmers_count():
    s = Suspicion("a", 3, 2.0, 30.0, now=0.0)
    assert s.confirm("a", now=1.0) is False  # the originator
    assert s.deadline == 30.0
    assert s.confirm("b", now=1.0) is True
    first = s.deadline
    assert s.confirm("b", now=2.0) is False  # a repeat
    assert s.deadline == first
    assert s.n == 1


def test_confirmations_beyond_k_are_refused():
    s = Suspicion("a", 2, 1.0, 10.0, now=0.0)
    assert s.confirm("b", 0.0)
    assert s.confirm("c", 0.0)
    assert s.deadline == pytest.approx(1.0)
    assert s.confirm("d", 0.0) is False
    assert s.n == 2


def test_k_zero_means_min_timeout_and_no_confirmations():
    # memberlist newSuspicion: "If there aren't any confirmations to be made
    # then take the min time from the start."
    s = Suspicion("a", 0, 4.0, 24.0, now=5.0)
    assert s.deadline == 9.0
    assert s.confirm("b", 6.0) is False
    assert s.deadline == 9.0


def test_suspicion_rejects_bad_bounds():
    with pytest.raises(ValueError):
        Suspicion("a", -1, 1.0, 2.0, 0.0)
    with pytest.raises(ValueError):
        Suspicion("a", 1, 3.0, 2.0, 0.0)


# -- awareness ------------------------------------------------------------------


def test_awareness_clamps_and_scales_like_memberlist():
    a = Awareness(8)
    steps = [
        (0, 0, 1.0),
        (-1, 0, 1.0),
        (-10000, 0, 1.0),
        (1, 1, 2.0),
        (-1, 0, 1.0),
        (10000, 7, 8.0),
        (-1, 6, 7.0),
        (-1, 5, 6.0),
        (-1, 4, 5.0),
        (-1, 3, 4.0),
        (-1, 2, 3.0),
        (-1, 1, 2.0),
        (-1, 0, 1.0),
        (-1, 0, 1.0),
    ]
    for delta, score, factor in steps:
        assert a.apply_delta(delta) == score
        assert a.score == score
        assert a.scale_timeout(1.0) == factor


def test_awareness_of_one_never_scales():
    a = Awareness(1)
    a.apply_delta(5)
    assert a.score == 0
    assert a.scale_timeout(0.5) == 0.5


def test_awareness_rejects_bad_max():
    with pytest.raises(ValueError):
        Awareness(0)


def test_a_quorum_ends_the_timer_quorum_timeout_after_it_began():
    s = Suspicion("a", 2, 12.0, 72.0, now=100.0, quorum=3, quorum_timeout=2.0)
    assert s.wanted == 3
    s.confirm("b", now=100.5)
    s.confirm("c", now=100.6)
    assert s.deadline == pytest.approx(112.0)  # Lifeguard's minimum (k = 2 reached)
    assert s.confirm("d", now=101.0) is True  # counted past k: the quorum wants it
    assert s.deadline == pytest.approx(102.0)
    assert s.confirm("e", now=101.1) is False  # nothing more to learn
    assert s.n == 3


def test_a_late_quorum_fires_at_once_and_never_later_than_lifeguard():
    s = Suspicion("a", 2, 4.0, 24.0, now=0.0, quorum=3, quorum_timeout=2.0)
    for who, t in (("b", 1.0), ("c", 2.0)):
        s.confirm(who, now=t)
    assert s.deadline == pytest.approx(4.0)
    s.confirm("d", now=3.0)
    assert s.deadline == pytest.approx(2.0)  # already past: fire now
    # a quorum timeout longer than Lifeguard's never delays it
    s = Suspicion("a", 2, 4.0, 24.0, now=0.0, quorum=3, quorum_timeout=30.0)
    for who in "bcd":
        s.confirm(who, now=1.0)
    assert s.deadline == pytest.approx(4.0)


def test_the_originator_and_repeats_do_not_make_a_quorum():
    s = Suspicion("a", 2, 4.0, 24.0, now=0.0, quorum=2, quorum_timeout=1.0)
    assert s.has_confirmed("a")
    assert s.confirm("a", now=0.1) is False
    assert s.confirm("b", now=0.2) is True
    assert s.confirm("b", now=0.3) is False
    assert s.n == 1
    assert s.deadline > 1.0


def test_quorum_rejects_negative_settings():
    with pytest.raises(ValueError):
        Suspicion("a", 1, 1.0, 2.0, 0.0, quorum=-1)
    with pytest.raises(ValueError):
        Suspicion("a", 1, 1.0, 2.0, 0.0, quorum=1, quorum_timeout=-1.0)
