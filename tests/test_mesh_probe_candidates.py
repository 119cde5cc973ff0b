"""Path probes, the endpoints record and candidate collection, and ssh targets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.cli._mesh_cmds import CommandError, ssh_target
from clanagent.identity import Identity
from clanagent.mesh import candidates as cands
from clanagent.mesh import probe
from clanagent.wire import WireError, pack


@pytest.fixture(scope="module")
def ids():
    return [Identity.generate() for _ in range(3)]


def box_keys(ids):
    return {i.public_key: i.box_public for i in ids}


def test_probe_round_trip_and_authentication(ids):
    a, b, c = ids
    data = probe.encode(probe.PING, 7, 1.5, a.public_key, a.box_key, b.box_public)
    sender, kind, pid, sent = probe.decode(data, b.box_key, box_keys(ids))
    assert (sender, kind, pid, sent) == (a.public_key, probe.PING, 7, 1.5)
    with pytest.raises(WireError, match="authenticate"):  # not for c
        probe.decode(data, c.box_key, box_keys(ids))
    with pytest.raises(WireError, match="not a member"):
        probe.decode(data, b.box_key, {b.public_key: b.box_public})
    forged = bytearray(data)
    forged[-1] ^= 1
    with pytest.raises(WireError):
        probe.decode(bytes(forged), b.box_key, box_keys(ids))
    # a sender claiming to be c but sealed by a is refused
    spoof = data[: len(probe.MAGIC)] + c.public_key + data[len(probe.MAGIC) + 32 :]
    with pytest.raises(WireError):
        probe.decode(spoof, b.box_key, box_keys(ids))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_probe_garbage_is_a_wire_error(data):
    me = Identity.generate()
    try:
        probe.decode(probe.MAGIC + data, me.box_key, {})
    except WireError:
        pass


def test_tracker_matches_replies_to_the_right_peer():
    t = probe.ProbeTracker(max_outstanding=3)
    pid = t.sent(b"a" * 32, "10.0.0.1:7946", 100.0)
    assert t.answered(pid, b"b" * 32, 100.1) is None  # a pong from someone else
    got = t.answered(pid, b"a" * 32, 100.25)
    assert got is not None and got[0].address == "10.0.0.1:7946"
    assert got[1] == pytest.approx(0.25)
    assert t.answered(pid, b"a" * 32, 100.3) is None  # replayed pong
    old = t.sent(b"a" * 32, "x:1", 100.0)
    t.sent(b"a" * 32, "y:1", 101.0)
    # no RTT known for these paths: the longest timeout (1 s)
    assert [p.address for p, v in t.verdicts(101.5, lambda k, a: False)] == ["x:1"]
    assert t.answered(old, b"a" * 32, 103) is not None  # late, still counts
    for i in range(5):  # bounded
        t.sent(b"c" * 32, f"z:{i + 1}", 110.0 + i)
    assert len(t) == 3


def test_endpoints_body_round_trip_and_checks():
    body = cands.endpoints_body(
        ["10.0.0.2:7946", "10.0.0.2:7946"], ["198.51.100.1:7946"], 51820, b"sealed"
    )
    assert body["lan"] == ["10.0.0.2:7946"]
    assert cands.parse_endpoints_body(body) is body
    for bad in [
        None,
        {},
        {**body, "extra": 1},
        {**body, "lan": "x"},
        {**body, "lan": [1]},
        {**body, "wg_port": -1},
        {**body, "wg_port": True},
        {**body, "onion": "clear.onion"},
        {**body, "public": ["no-port"]},
        {**body, "lan": ["a:1"] * 40},
    ]:
        with pytest.raises(WireError):
            cands.parse_endpoints_body(bad)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["lan", "public", "wg_port", "onion", "x"]),
        st.none()
        | st.integers()
        | st.text(max_size=5)
        | st.binary(max_size=5)
        | st.lists(st.text(max_size=8), max_size=3),
    )
)
def test_endpoints_body_never_raises_anything_else(body):
    try:
        cands.parse_endpoints_body(body)
    except WireError:
        pass


def test_collect_candidates_from_every_source(ids):
    a, b, c = ids
    doc = {
        "machines": {
            "a": {"node_key": a.public_key, "endpoints": []},
            "b": {"node_key": b.public_key, "endpoints": []},
        }
    }
    records = {b.public_key: cands.endpoints_body(["10.0.0.2:7946"], ["198.51.100.2:7946"], 51820)}
    out = cands.collect(
        doc,
        self_key=a.public_key,
        records=records,
        opened_inventory={"b": ["203.0.113.9:7946"]},
        lan_seen={b.public_key: ["10.1.0.2:7946"], c.public_key: ["10.9.9.9:7946"]},
        onions={b.public_key: "x" * 56 + ".onion:7946"},
    )
    assert set(out) == {b.public_key}  # not ourselves, not a non-member (c)
    got = {(x.kind, x.address, x.source, x.port_wg) for x in out[b.public_key]}
    assert got == {
        ("lan", "10.1.0.2:7946", "mdns", 51820),
        ("lan", "10.0.0.2:7946", "gossip", 51820),
        ("public", "198.51.100.2:7946", "gossip", 51820),
        ("public", "203.0.113.9:7946", "inventory", 51820),
        ("tor", "x" * 56 + ".onion:7946", "tor", None),
    }


def test_ssh_targets():
    base = {
        "machine": "m2",
        "overlay6": "fd00::2",
        "wireguard": True,
        "handshake": True,
        "chosen": {"kind": "lan", "address": "10.0.0.2:7946"},
        "tor_socks": None,
    }
    assert ssh_target(base) == ("fd00::2", [])  # the tunnel is up: use the overlay
    assert ssh_target({**base, "handshake": False}) == ("10.0.0.2", [])
    onion = "y" * 56 + ".onion"
    host, opts = ssh_target(
        {
            **base,
            "wireguard": False,
            "chosen": {"kind": "tor", "address": f"{onion}:7946"},
            "tor_socks": "127.0.0.1:9050",
        }
    )
    assert host == onion and "tor-connect 127.0.0.1:9050 %h %p" in opts[1]
    with pytest.raises(CommandError, match="no tor"):
        ssh_target({**base, "wireguard": False, "chosen": {"kind": "tor", "address": "a.onion:1"}})
    with pytest.raises(CommandError, match="no usable path"):
        ssh_target({**base, "wireguard": False, "chosen": None})
    assert pack(base)  # the reply shape travels over the control socket


def _until_fail(t, cur, hint=None):
    """Probe the path in use (never answered) until it fails: (verdicts, when)."""

    def is_current(node_key, address):
        return address == cur[1]

    now, verdicts = 0.0, []
    while now < 10.0 and "fail" not in [v for p, v in verdicts if p.address == cur[1]]:
        for k, a in t.due(now, {cur}):
            t.sent(k, a, now, rtt_hint=hint)
        if now == 0.0:
            t.sent(cur[0], "alt:1", now)
        now = round(now + 0.01, 2)
        verdicts += t.verdicts(now, is_current)
    return verdicts, now


def test_miss_rule_path_in_use_needs_eight_misses_alternatives_one():
    key = b"k" * 32
    cur = (key, "cur:1")
    verdicts, now = _until_fail(probe.ProbeTracker(), cur)
    assert [(p.address, v) for p, v in verdicts if p.address == "alt:1"] == [("alt:1", "fail")]
    mine = [v for p, v in verdicts if p.address == "cur:1"]
    assert mine == ["suspect"] + ["miss"] * 6 + ["fail"]
    # No RTT known: every timeout is 1 s.  The probe of 0 s misses at 1 s; the
    # fast ones, sent from 1 s on 0.1 s apart, miss from 2 s: the 7th at 2.6 s.
    assert now == pytest.approx(2.6, abs=0.03)
    # A LAN RTT (here the shell's hint): 0.25 s timeouts, failed at 1.1 s.
    verdicts, now = _until_fail(probe.ProbeTracker(), cur, hint=0.0005)
    assert [v for p, v in verdicts if p.address == "cur:1"][-1] == "fail"
    assert now == pytest.approx(0.25 + 0.6 + 0.25, abs=0.03)

    def is_current(node_key, address):
        return address == "cur:1"

    # an answer resets the count
    t2 = probe.ProbeTracker(probe.ProbeConfig(misses_to_fail=2))
    assert t2.due(0.0, {cur}) == [cur]
    t2.sent(*cur, 0.0)
    assert [v for _, v in t2.verdicts(1.5, is_current)] == ["suspect"]
    pid = t2.sent(*cur, 2.5)
    assert t2.answered(pid, key, 2.6) is not None
    t2.sent(*cur, 3.0)
    assert [v for _, v in t2.verdicts(5.5, is_current)] == ["suspect"]  # one miss since
