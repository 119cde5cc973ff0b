"""The sans-IO VM lifecycle: start, crash -> backoff restart, adoption, changes, errors.

Time is a plain number passed in (the fake clock); no trio, no processes.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clanagent.vmhost.lifecycle import (
    CRASHED,
    FAILED,
    RUNNING,
    STARTING,
    STOPPED,
    STOPPING,
    TRANSITIONS,
    AdoptVm,
    Backoff,
    LifecycleMisuse,
    Reconciler,
    ReportError,
    RestartVm,
    StartVm,
    StopVm,
    VmExited,
    VmStarted,
    VmStartFailed,
    VmStopped,
)
from clanagent.vmhost.spec import VmSpec

A = VmSpec("a", "/k", initrd="/i")
B = VmSpec("b", "/k", initrd="/i")


def started(r: Reconciler, spec: VmSpec, now: float) -> None:
    assert r.poll(now) == [StartVm(spec)]
    r.handle(VmStarted(spec.name), now)


def test_transition_table_is_closed_and_reachable():
    states = {CRASHED, FAILED, RUNNING, STARTING, STOPPED, STOPPING}
    assert {s for s, _ in TRANSITIONS} <= states
    assert set(TRANSITIONS.values()) == states
    # a running VM can only go down through stop or exit
    assert {k for s, k in TRANSITIONS if s == RUNNING} == {"exited", "stop"}


def test_backoff_doubles_and_caps():
    b = Backoff(base=1, cap=60)
    assert [b.delay(n) for n in range(0, 9)] == [0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert b.delay(10_000) == 60


def test_start_then_running_then_nothing_to_do():
    r = Reconciler()
    r.set_desired({"a": A})
    assert r.poll(0) == [StartVm(A)]
    assert r.state("a") == STARTING
    assert r.poll(0) == []  # never a second start while one is in flight
    r.handle(VmStarted("a"), 1)
    assert r.state("a") == RUNNING
    assert r.poll(100) == []
    assert r.next_deadline() is None


def test_crash_restarts_with_exponential_backoff_and_resets_when_stable():
    r = Reconciler(Backoff(base=1, cap=60, stable_after=30))
    r.set_desired({"a": A})
    started(r, A, 0)
    now = 5.0
    delays = []
    for attempt in range(1, 9):
        r.handle(VmExited("a", "killed by signal 9"), now)
        assert r.state("a") == CRASHED and r.reason("a") == "killed by signal 9"
        due = r.next_deadline()
        delays.append(due - now)
        assert r.poll(due - 0.001) == []  # not before its time
        assert r.poll(due) == [RestartVm(A, attempt)]
        r.handle(VmStarted("a"), due)
        now = due + 1  # crashes again 1 s after each start
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    # it now stays up 30 s: the next crash is a fresh problem with a short delay
    r.handle(VmExited("a"), now + 30)
    assert r.crashes("a") == 1 and r.next_deadline() == now + 31


def test_start_failure_counts_as_a_crash():
    r = Reconciler()
    r.set_desired({"a": A})
    assert r.poll(0) == [StartVm(A)]
    r.handle(VmStartFailed("a", "qemu exited with 1: bad kernel"), 0)
    assert r.state("a") == CRASHED
    assert "bad kernel" in r.reason("a")
    assert r.poll(0.5) == []
    assert r.poll(1) == [RestartVm(A, 1)]


def test_adopted_vm_is_kept_not_started_again():
    r = Reconciler()
    r.observe("a", A.fingerprint(), now=0)
    r.set_desired({"a": A})
    assert r.poll(1) == [AdoptVm("a")]
    assert r.state("a") == RUNNING
    assert r.poll(2) == []


def test_adopted_vm_with_old_declaration_is_restarted():
    r = Reconciler(stop_timeout=7)
    r.observe("a", "stale-fingerprint", now=0)
    r.set_desired({"a": A})
    assert r.poll(1) == [StopVm("a", 7, "declaration changed")]
    r.handle(VmStopped("a"), 2)
    assert r.poll(2) == [StartVm(A)]


def test_adopted_vm_no_longer_placed_here_is_stopped_and_forgotten():
    r = Reconciler()
    r.observe("old", "f", now=0)
    r.set_desired({})
    assert r.poll(1) == [StopVm("old", 10.0, "no longer placed here")]
    r.handle(VmExited("old"), 2)  # an exit while stopping is the stop finishing
    assert r.state("old") == STOPPED and r.crashes("old") == 0
    assert r.poll(3) == [] and r.names() == []


def test_changed_declaration_stops_then_starts_new_spec():
    r = Reconciler()
    r.set_desired({"a": A})
    started(r, A, 0)
    bigger = VmSpec("a", "/k", initrd="/i", memory_mb=512)
    r.set_desired({"a": bigger})
    assert r.poll(1) == [StopVm("a", 10.0, "declaration changed")]
    assert r.poll(1) == []
    r.handle(VmStopped("a"), 2)
    assert r.poll(2) == [StartVm(bigger)]


def test_bad_declaration_reports_once_and_others_still_run():
    r = Reconciler()
    r.set_desired({"a": A, "b": B}, errors={"b": "vm b: kernel /nope does not exist"})
    actions = r.poll(0)
    assert actions == [StartVm(A), ReportError("b", "vm b: kernel /nope does not exist")]
    assert r.state("b") == FAILED and "does not exist" in r.reason("b")
    r.handle(VmStarted("a"), 0)
    assert r.poll(1) == []  # reported once, not on every poll
    r.set_desired({"a": A, "b": B}, errors={"b": "memory_mb 99999 exceeds"})
    assert r.poll(2) == [ReportError("b", "memory_mb 99999 exceeds")]
    r.set_desired({"a": A, "b": B})  # fixed
    assert r.poll(3) == [StartVm(B)]
    assert r.state("a") == RUNNING


def test_running_vm_whose_declaration_turns_bad_is_stopped_then_failed():
    r = Reconciler()
    r.set_desired({"a": A})
    started(r, A, 0)
    r.set_desired({"a": A}, errors={"a": "too much memory"})
    assert r.poll(1) == [StopVm("a", 10.0, "declaration invalid: too much memory")]
    r.handle(VmStopped("a"), 2)
    assert r.poll(2) == [ReportError("a", "too much memory")]
    assert r.state("a") == FAILED


def test_misuse_is_rejected():
    r = Reconciler()
    with pytest.raises(LifecycleMisuse):
        r.handle(VmStarted("ghost"), 0)
    r.set_desired({"a": A})
    with pytest.raises(LifecycleMisuse, match="started not allowed while stopped"):
        r.handle(VmStarted("a"), 0)
    started(r, A, 0)
    with pytest.raises(LifecycleMisuse):
        r.observe("a", "f", 1)


@given(st.lists(st.sampled_from(["exit", "start_ok", "start_fail", "tick"]), max_size=60))
def test_random_histories_never_double_start_and_respect_backoff(ops):
    r = Reconciler(Backoff(base=1, cap=8, stable_after=1000))
    r.set_desired({"a": A})
    now = 0.0
    in_flight = False
    last_crash = None
    for op in ops:
        now += 0.5
        for act in r.poll(now):
            assert isinstance(act, (StartVm, RestartVm))
            assert not in_flight
            if isinstance(act, RestartVm):
                assert now - last_crash >= Backoff(1, 8).delay(act.attempt)
            in_flight = True
        state = r.state("a")
        if op == "start_ok" and state == STARTING:
            r.handle(VmStarted("a"), now)
            in_flight = False
        elif op == "start_fail" and state == STARTING:
            r.handle(VmStartFailed("a", "x"), now)
            in_flight, last_crash = False, now
        elif op == "exit" and state in (RUNNING, STARTING):
            r.handle(VmExited("a"), now)
            in_flight, last_crash = False, now
