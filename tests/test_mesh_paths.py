"""Path selection on a fake clock (plain floats): fallback, backoff, recovery, policy."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.mesh.paths import (
    PATH_KINDS,
    Candidate,
    PathConfig,
    PathError,
    PathSelector,
)

K = b"\x01" * 32
K2 = b"\x02" * 32
ALL = ["lan", "public", "tor"]


def cand(
    kind: str, addr: str, source: str = "gossip", port: int | None = None, key: bytes = K
) -> Candidate:
    return Candidate(key, kind, addr, source, port)  # type: ignore[arg-type]


LAN = cand("lan", "192.168.1.5:7946")
LAN2 = cand("lan", "192.168.1.6:7946")
PUB = cand("public", "203.0.113.5:7946", "inventory")
TOR = cand("tor", "abcdefghijklmnop.onion:7946", "tor")


def selector(allow_public: bool = True, seed: int = 0, **cfg: float) -> PathSelector:
    return PathSelector(allow_public, random.Random(seed), PathConfig(**cfg))


def by_addr(sel: PathSelector, now: float, key: bytes = K) -> dict[str, object]:
    return {r.candidate.address: r for r in sel.rank(key, now)}


# ---- fallback ------------------------------------------------------------


def test_a_failing_path_falls_back_to_the_next_one() -> None:
    sel = selector()
    sel.set_candidates(K, [TOR, PUB, LAN], ALL, True, now=0.0)
    assert sel.choose(K, 0.0) == LAN
    sel.report_failure(K, LAN, now=1.0)
    assert sel.current(K) == PUB  # re-chosen at once, no choose() needed
    assert sel.choose(K, 1.0) == PUB
    sel.report_failure(K, PUB, now=1.5)
    assert sel.choose(K, 1.5) == TOR
    sel.report_failure(K, TOR, now=1.6)
    # Everything backing off: nothing usable.
    assert sel.choose(K, 1.6) is None
    ranked = by_addr(sel, 1.6)
    assert not any(r.usable for r in ranked.values())
    lan = ranked[LAN.address]
    assert lan.next_try_at is not None and 1.8 <= lan.next_try_at <= 2.0
    assert lan.reason.startswith("backing off after 1 failure, retry in 0.")


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, PUB], ALL, True, now=0.0)
    now, delays = 0.0, []
    for _ in range(10):
        sel.report_failure(K, LAN, now)
        nxt = by_addr(sel, now)[LAN.address].next_try_at
        delays.append(nxt - now)
        now = nxt
    for i, d in enumerate(delays):
        nominal = min(60.0, 2.0**i)
        assert nominal * 0.8 <= d <= nominal, (i, d)
    assert delays[-1] <= 60.0
    assert by_addr(sel, now)[LAN.address].reason.startswith("retry due after 10 failures")


def test_a_success_ends_the_backoff() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, PUB], ALL, True, now=0.0)
    sel.report_failure(K, LAN, 0.0)
    sel.report_failure(K, LAN, 0.0)
    assert not by_addr(sel, 0.5)[LAN.address].usable
    sel.report_success(K, LAN, 0.001, now=0.5)
    row = by_addr(sel, 0.5)[LAN.address]
    assert row.usable and row.next_try_at is None
    assert sel.choose(K, 0.5) == LAN


# ---- recovery --------------------------------------------------------------


def test_a_better_path_is_reprobed_after_backoff_and_chosen_again() -> None:
    sel = selector(probe_timeout=5.0)
    sel.set_candidates(K, [LAN, PUB], ALL, True, now=0.0)
    sel.report_failure(K, LAN, 0.0)
    assert sel.choose(K, 0.0) == PUB
    retry_at = by_addr(sel, 0.0)[LAN.address].next_try_at
    assert sel.next_deadline() == retry_at
    assert sel.probes_due(retry_at - 0.01) == []
    # Backoff over: LAN is offered for a probe, but not used before it answers.
    assert sel.probes_due(retry_at) == [(K, LAN)]
    assert sel.choose(K, retry_at) == PUB
    assert sel.probes_due(retry_at + 1) == []  # not offered twice
    assert sel.next_deadline() == retry_at + 5.0
    # The probe got lost: offered again after probe_timeout.
    assert sel.probes_due(retry_at + 5.0) == [(K, LAN)]
    sel.report_success(K, LAN, 0.002, retry_at + 5.5)
    assert sel.current(K) == LAN
    assert sel.choose(K, retry_at + 5.5) == LAN
    assert sel.probes_due(retry_at + 100) == []
    assert sel.next_deadline() is None


def test_probes_only_cover_paths_better_than_the_current_one() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, PUB, TOR], ALL, True, now=0.0)
    assert sel.choose(K, 0.0) == LAN
    sel.report_failure(K, TOR, 0.0)  # worse than current: no reason to probe it
    assert sel.probes_due(100.0) == []
    assert sel.next_deadline() is None
    sel.report_failure(K, LAN, 100.0)
    sel.report_failure(K, PUB, 100.0)
    # Only failed paths: the one whose backoff expired is used (better than nothing).
    assert sel.choose(K, 100.0) == TOR
    # Both better ones are probed once their backoff expires ...
    assert sorted(c.kind for _, c in sel.probes_due(200.0)) == ["lan", "public"]
    # ... and we do not churn between failed paths meanwhile.
    assert sel.choose(K, 200.0) == TOR
    sel.report_success(K, PUB, 0.01, 201.0)
    assert sel.current(K) == PUB


def test_with_no_current_path_every_expired_backoff_is_due() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, PUB, TOR], ALL, True, now=0.0)
    for c in (LAN, PUB, TOR):
        sel.report_failure(K, c, 0.0)
    assert sel.choose(K, 0.5) is None
    assert 0.8 <= sel.next_deadline() <= 1.0
    assert sorted(c.kind for _, c in sel.probes_due(1.0)) == ["lan", "public", "tor"]
    assert sel.choose(K, 1.0) == LAN  # the best of the retry-due paths


def test_flapping_backs_off_longer_each_time_and_does_not_thrash() -> None:
    """LAN comes back for a moment after each probe, then fails again."""
    sel = selector(seed=3)
    sel.set_candidates(K, [LAN, PUB], ALL, True, now=0.0)
    now = 0.0
    sel.report_failure(K, LAN, now)
    gaps = []
    while now < 600.0:
        nxt = sel.next_deadline()
        assert nxt is not None and nxt > now
        # Between deadlines the choice never moves back to LAN on its own.
        assert sel.choose(K, (now + nxt) / 2) == PUB
        now = nxt
        for _, c in sel.probes_due(now):
            assert c == LAN
            sel.report_success(K, LAN, 0.001, now)
            assert sel.current(K) == LAN  # recovered: moved back
            sel.report_failure(K, LAN, now + 0.1)  # ... and it breaks again
        retry = by_addr(sel, now)[LAN.address].next_try_at
        gaps.append(retry - now)
    # Each flap lengthens the backoff even though every flap began with a success.
    assert all(b > a for a, b in zip(gaps[:6], gaps[1:7], strict=True)), gaps
    assert max(gaps) >= 30.0
    # 600 s of a flapping link: a few round trips, not one per second.
    # (With a plain reset on success it would be 1 s apart: ~500 flaps.)
    assert len(gaps) <= 20, gaps


def test_rtt_noise_does_not_flip_the_choice() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, LAN2], ["lan"], True, now=0.0)
    first = sel.choose(K, 0.0)
    other = LAN2 if first == LAN else LAN
    rng = random.Random(9)
    for i in range(500):
        t = float(i)
        sel.report_success(K, first, 0.010 * rng.uniform(0.85, 1.15), t)
        sel.report_success(K, other, 0.010 * rng.uniform(0.85, 1.15), t)
        assert sel.choose(K, t) == first


# ---- policy ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("self_ok", "peer_ok", "reason"),
    [
        (False, True, "public paths are forbidden for this machine (no-public)"),
        (True, False, "public paths are forbidden for the peer (no-public)"),
        (False, False, "public paths are forbidden for this machine and the peer (no-public)"),
    ],
)
def test_no_public_on_either_side(self_ok: bool, peer_ok: bool, reason: str) -> None:
    sel = selector(allow_public=self_ok)
    sel.set_candidates(K, [PUB, TOR], ["public", "tor"], peer_ok, now=0.0)
    assert sel.choose(K, 0.0) == TOR
    sel.report_success(K, PUB, 0.0001, 0.0)  # even a great measured path
    sel.report_failure(K, TOR, 0.0)
    assert sel.choose(K, 0.0) is None  # ... is never used
    for t in (1.0, 10.0, 1000.0):
        assert all(c.kind != "public" for _, c in sel.probes_due(t))
        assert sel.choose(K, t) in (TOR, None)
    pub = by_addr(sel, 0.0)[PUB.address]
    assert pub.excluded and not pub.usable and pub.reason == reason
    rows = {r["kind"]: r for r in sel.explain(K, 0.0)["paths"]}
    assert rows["public"]["reason"] == reason and not rows["public"]["chosen"]


def test_public_is_used_when_both_sides_allow_it() -> None:
    sel = selector(allow_public=True)
    sel.set_candidates(K, [PUB, TOR], ["public", "tor"], True, now=0.0)
    assert sel.choose(K, 0.0) == PUB


def test_preference_order_of_the_peer_tag_is_respected() -> None:
    sel = selector()
    # The inventory says: tor first, then lan; public is not listed for this peer.
    sel.set_candidates(K, [LAN, PUB, TOR], ["tor", "lan"], True, now=0.0)
    sel.report_success(K, LAN, 0.0002, 0.0)
    sel.report_success(K, TOR, 0.900, 0.0)
    assert sel.choose(K, 0.0) == TOR  # the preference beats a 4500x better RTT
    ranked = sel.rank(K, 0.0)
    assert [r.candidate.kind for r in ranked] == ["tor", "lan", "public"]
    assert ranked[0].reason == "preferred: tor, rtt 900.0 ms"
    assert ranked[1].reason == "fallback: lan, rtt 0.2 ms"
    assert ranked[2].excluded and ranked[2].reason == "public not in this peer's preference"
    # A preference change applies at once and keeps what we measured.
    sel.set_candidates(K, [LAN, PUB, TOR], ["lan", "tor"], True, now=1.0)
    assert sel.choose(K, 1.0) == LAN
    assert by_addr(sel, 1.0)[LAN.address].reason == "preferred: lan, rtt 0.2 ms"


def test_an_empty_preference_uses_nothing() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, PUB, TOR], [], True, now=0.0)
    assert sel.choose(K, 0.0) is None
    assert all(r.excluded for r in sel.rank(K, 0.0))


def test_more_preferred_kind_wins_back_as_soon_as_it_is_healthy() -> None:
    sel = selector()
    sel.set_candidates(K, [PUB], ALL, True, now=0.0)
    sel.report_success(K, PUB, 0.001, 0.0)
    assert sel.choose(K, 0.0) == PUB
    # A LAN path appears (slower!): lan is preferred, so it wins.
    sel.set_candidates(K, [PUB, LAN], ALL, True, now=1.0)
    sel.report_success(K, LAN, 0.050, 1.0)
    assert sel.choose(K, 1.0) == LAN


# ---- RTT and hysteresis ------------------------------------------------------


def test_rtt_orders_paths_within_a_kind() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, LAN2, PUB], ALL, True, now=0.0)
    sel.report_success(K, LAN, 0.005, 0.0)
    sel.report_success(K, LAN2, 0.001, 0.0)
    sel.report_success(K, PUB, 0.0001, 0.0)
    assert [r.candidate for r in sel.rank(K, 0.0)] == [LAN2, LAN, PUB]


def test_unmeasured_paths_rank_after_measured_ones_of_their_kind() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, LAN2], ["lan"], True, now=0.0)
    sel.report_success(K, LAN2, 0.5, 0.0)
    assert [r.candidate for r in sel.rank(K, 0.0)] == [LAN2, LAN]
    assert sel.rank(K, 0.0)[1].reason == "preferred: lan, rtt not measured yet"


def test_hysteresis_needs_30_percent_better_rtt_to_switch() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, LAN2], ["lan"], True, now=0.0)
    assert sel.choose(K, 0.0) == LAN  # equal: address breaks the tie
    sel.report_success(K, LAN, 0.010, 0.0)
    sel.report_success(K, LAN2, 0.008, 0.0)  # 20% better: stay
    assert sel.choose(K, 0.0) == LAN
    assert sel.rank(K, 0.0)[0].candidate == LAN2  # ... though it ranks first
    assert "30% faster" in sel.explain(K, 0.0)["reason"]
    sel.report_success(K, LAN2, 0.002, 1.0)  # EWMA 6.2 ms: 38% better: move
    assert sel.choose(K, 1.0) == LAN2
    sel.report_success(K, LAN, 0.005, 2.0)  # LAN now 8.5 ms: no reason to go back
    assert sel.choose(K, 2.0) == LAN2


def test_rtt_is_an_ewma() -> None:
    sel = selector(rtt_alpha=0.5)
    sel.set_candidates(K, [LAN], ["lan"], True, now=0.0)
    sel.report_success(K, LAN, 0.010, 0.0)
    sel.report_success(K, LAN, 0.020, 0.0)
    assert sel.rank(K, 0.0)[0].score[1] == pytest.approx(0.015)
    assert sel.rtt(K, LAN) == pytest.approx(0.015)  # the probes' timeout hint
    assert sel.rtt(K, LAN2) is None  # not a candidate
    assert sel.rtt(K2, LAN) is None  # not a known peer


def test_recent_failures_break_rtt_ties() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, LAN2], ["lan"], True, now=0.0)
    sel.report_failure(K, LAN, 0.0)
    sel.report_success(K, LAN, 0.003, 5.0)
    sel.report_success(K, LAN2, 0.003, 5.0)
    ranked = sel.rank(K, 5.0)
    assert [r.candidate for r in ranked] == [LAN2, LAN]
    assert "recent failures" in ranked[1].reason
    # The failure fades: after many half-lives the address decides again.
    assert [r.candidate for r in sel.rank(K, 5.0 + 300.0 * 60)] == [LAN, LAN2]


# ---- candidates ------------------------------------------------------------


def test_candidates_from_several_sources_are_deduplicated() -> None:
    sel = selector()
    mdns = cand("lan", "192.168.1.5:7946", "mdns")
    gossip = cand("lan", "192.168.1.5:7946", "gossip", port=51820)
    same_addr_other_kind = cand("public", "192.168.1.5:7946", "config")
    sel.set_candidates(K, [mdns, gossip, mdns, same_addr_other_kind], ALL, True, now=0.0)
    ranked = sel.rank(K, 0.0)
    assert [(r.candidate.kind, r.candidate.address) for r in ranked] == [
        ("lan", "192.168.1.5:7946"),
        ("public", "192.168.1.5:7946"),
    ]
    lan = ranked[0].candidate
    assert lan.source == "mdns" and lan.port_wg == 51820  # first seen, port filled in
    row = sel.explain(K, 0.0)["paths"][0]
    assert row["sources"] == ["mdns", "gossip"] and row["port_wg"] == 51820
    # Reports name the path by (kind, address), whichever source the caller holds.
    sel.report_failure(K, gossip, 1.0)
    assert sel.choose(K, 1.0).kind == "public"


def test_state_survives_a_refresh_and_dropped_paths_are_forgotten() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, PUB], ALL, True, now=0.0)
    sel.report_failure(K, LAN, 0.0)
    sel.report_failure(K, LAN, 1.0)
    sel.set_candidates(K, [PUB, LAN], ALL, True, now=1.5)  # the 30 s refresh
    row = by_addr(sel, 1.5)[LAN.address]
    assert not row.usable and "2 failures" in row.reason
    assert sel.choose(K, 1.5) == PUB
    # PUB disappears: the current choice moves (nothing else usable -> None).
    sel.set_candidates(K, [LAN], ALL, True, now=1.6)
    assert sel.current(K) is None
    # LAN disappears and comes back: a fresh start.
    sel.set_candidates(K, [], ALL, True, now=1.7)
    sel.set_candidates(K, [LAN], ALL, True, now=1.8)
    assert sel.choose(K, 1.8) == LAN


def test_stale_reports_are_ignored() -> None:
    sel = selector()
    sel.report_success(K, LAN, 0.001, 0.0)  # unknown peer
    sel.report_failure(K, LAN, 0.0)
    sel.set_candidates(K, [PUB], ALL, True, now=0.0)
    sel.report_failure(K, LAN, 1.0)  # unknown path
    sel.report_failure(K2, cand("lan", "x:1", key=K2), 1.0)
    sel.report_failure(K2, PUB, 1.0)  # candidate of another peer
    assert sel.choose(K, 1.0) == PUB
    assert sel.probes_due(100.0) == []


def test_forget_drops_the_peer() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN], ALL, True, now=0.0)
    sel.report_failure(K, LAN, 0.0)
    sel.forget(K)
    assert sel.choose(K, 0.0) is None and sel.rank(K, 0.0) == []
    assert sel.next_deadline() is None
    assert sel.explain(K, 0.0)["known"] is False


@pytest.mark.parametrize(
    "make",
    [
        lambda: Candidate(b"short", "lan", "a:1", "mdns"),
        lambda: Candidate(K, "carrier-pigeon", "a:1", "mdns"),  # type: ignore[arg-type]
        lambda: Candidate(K, "lan", "", "mdns"),
        lambda: Candidate(K, "lan", "a:1", "mdns", 0),
        lambda: Candidate(K, "lan", "a:1", "mdns", 70000),
    ],
)
def test_bad_candidates_are_refused(make) -> None:
    with pytest.raises(PathError):
        make()


def test_misuse_raises_path_error() -> None:
    sel = selector()
    with pytest.raises(PathError, match="another machine"):
        sel.set_candidates(K2, [LAN], ALL, True, now=0.0)
    with pytest.raises(PathError, match="unknown path kind"):
        sel.set_candidates(K, [LAN], ["lan", "carrier-pigeon"], True, now=0.0)  # type: ignore[list-item]
    sel.set_candidates(K, [LAN], ALL, True, now=0.0)
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(PathError):
            sel.report_success(K, LAN, bad, 0.0)
    with pytest.raises(PathError):
        PathConfig(backoff_base=2.0, backoff_cap=1.0)


# ---- explain, determinism ----------------------------------------------------


def test_explain_shows_the_choice_and_every_alternative() -> None:
    sel = selector(allow_public=False)
    sel.set_candidates(K, [LAN, LAN2, PUB, TOR], ALL, True, now=0.0)
    sel.report_success(K, LAN2, 0.0004, 0.0)
    sel.report_failure(K, LAN, 0.0)
    sel.choose(K, 0.0)
    out = sel.explain(K, 0.5)
    assert out["known"] and out["peer"] == K.hex()
    assert out["chosen"] == {"kind": "lan", "address": LAN2.address}
    assert out["preference"] == ALL and out["self_allows_public"] is False
    rows = {r["address"]: r for r in out["paths"]}
    assert rows[LAN2.address]["reason"] == "preferred: lan, rtt 0.4 ms"
    assert rows[LAN2.address]["chosen"] and rows[LAN2.address]["rtt_ms"] == 0.4
    assert rows[LAN.address]["reason"].startswith("backing off after 1 failure, retry in ")
    assert 0.3 <= rows[LAN.address]["retry_in"] <= 0.5
    assert rows[TOR.address]["reason"] == "fallback: tor, rtt not measured yet"
    assert rows[PUB.address]["reason"] == "public paths are forbidden for this machine (no-public)"
    assert sum(r["chosen"] for r in out["paths"]) == 1
    # Only plain types: ready for the control socket.
    from clanagent.wire import pack

    pack(out)


def test_explain_does_not_change_the_current_choice() -> None:
    sel = selector()
    sel.set_candidates(K, [LAN, PUB], ALL, True, now=0.0)
    sel.report_failure(K, PUB, 0.0)
    sel.report_failure(K, LAN, 0.0)
    assert sel.current(K) is None
    sel.explain(K, 1000.0)
    assert sel.current(K) is None


def _script(seed: int) -> list[float]:
    sel = selector(seed=seed)
    sel.set_candidates(K, [LAN, PUB], ALL, True, now=0.0)
    out = []
    for i in range(20):
        sel.report_failure(K, LAN, float(i))
        out.append(by_addr(sel, float(i))[LAN.address].next_try_at)
    return out


def test_deterministic_under_a_seeded_rng() -> None:
    assert _script(42) == _script(42)
    assert _script(42) != _script(43)


# ---- property: any sequence is safe ------------------------------------------------

POOL = [
    cand("lan", "10.0.0.1:1", "mdns"),
    cand("lan", "10.0.0.1:1", "gossip", 51820),
    cand("lan", "10.0.0.2:1"),
    cand("public", "198.51.100.1:1", "inventory"),
    cand("public", "198.51.100.2:1", "gossip"),
    cand("tor", "x.onion:1", "tor"),
    cand("lan", "10.0.0.9:1", key=K2),
    cand("public", "198.51.100.9:1", key=K2),
    cand("tor", "y.onion:1", "tor", key=K2),
]
PEERS = [K, K2]

op_st = st.one_of(
    st.tuples(
        st.just("set"),
        st.sampled_from(PEERS),
        st.lists(st.sampled_from(range(len(POOL))), max_size=8),
        st.lists(st.sampled_from(PATH_KINDS), max_size=4),
        st.booleans(),
    ),
    st.tuples(
        st.just("ok"), st.sampled_from(PEERS), st.sampled_from(range(len(POOL))), st.floats(0, 2)
    ),
    st.tuples(st.just("fail"), st.sampled_from(PEERS), st.sampled_from(range(len(POOL)))),
    st.tuples(st.just("choose"), st.sampled_from(PEERS)),
    st.tuples(st.just("probe")),
    st.tuples(st.just("forget"), st.sampled_from(PEERS)),
)


@settings(max_examples=300, deadline=None)
@given(
    self_public=st.booleans(),
    seed=st.integers(0, 1000),
    steps=st.lists(st.tuples(op_st, st.floats(-1.0, 120.0)), max_size=60),
)
def test_any_sequence_never_chooses_a_forbidden_or_unusable_path(
    self_public: bool, seed: int, steps: list
) -> None:
    sel = PathSelector(self_public, random.Random(seed))
    policy: dict[bytes, tuple[set[tuple[str, str]], list[str], bool]] = {}
    now = 0.0
    for op, dt in steps:
        now += dt  # may even step back a little: must not matter
        kind = op[0]
        if kind == "set":
            _, key, idxs, pref, peer_public = op
            cands = [POOL[i] for i in idxs if POOL[i].node_key == key]
            sel.set_candidates(key, cands, pref, peer_public, now)
            policy[key] = ({c.path_id for c in cands}, list(pref), peer_public)
        elif kind == "ok":
            sel.report_success(op[1], POOL[op[2]], op[3], now)
        elif kind == "fail":
            sel.report_failure(op[1], POOL[op[2]], now)
        elif kind == "forget":
            sel.forget(op[1])
            policy.pop(op[1], None)
        elif kind == "probe":
            for key, c in sel.probes_due(now):
                ids, pref, peer_public = policy[key]
                assert c.path_id in ids and c.kind in pref
                assert c.kind != "public" or (self_public and peer_public)
                probe = next(r for r in sel.rank(key, now) if r.candidate.path_id == c.path_id)
                assert probe.usable and not probe.excluded
        for key in PEERS:
            chosen = sel.choose(key, now) if kind == "choose" else sel.current(key)
            ranked = {r.candidate.path_id: r for r in sel.rank(key, now)}
            if chosen is None:
                if kind == "choose":  # None only when nothing at all is usable
                    assert not any(r.usable for r in ranked.values())
                continue
            ids, pref, peer_public = policy[key]
            assert chosen.node_key == key
            assert chosen.path_id in ids and chosen.kind in pref
            assert chosen.kind != "public" or (self_public and peer_public)
            if kind == "choose":
                assert ranked[chosen.path_id].usable and not ranked[chosen.path_id].excluded
        d = sel.next_deadline()
        assert d is None or not math.isnan(d)
        for key in PEERS:
            sel.explain(key, now)
