"""mDNS discovery: TXT encoding/decoding and the MdnsPeers filter (unit, with
hypothesis for the decoder), clean degradation, and -- as root -- two network
namespaces on one veth where each side finds the other and ignores a third
node of another clan."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from clanagent.mesh import mdns
from clanagent.mesh.mdns import (
    SERVICE_TYPE,
    Announcement,
    MdnsDiscovery,
    MdnsPeers,
    clan_tag,
    decode_txt,
    encode_txt,
    format_address,
    multicast_interfaces,
)
from clanagent.mesh.paths import Candidate

CLAN = b"clan-id-0123456789abcdef"
OTHER = b"another-clan-id"
ME = bytes([1]) * 32
PEER = bytes([0xAB]) * 32  # hex with letters: case matters
PEER2 = bytes([0xCD]) * 32
NAME = "peer1." + SERVICE_TYPE


def txt(clan=CLAN, key=PEER, wg=None):
    """TXT as zeroconf hands it over: bytes keys and values."""
    return {k.encode(): v.encode() for k, v in encode_txt(clan, key, wg_port=wg).items()}


# ---- TXT ----


def test_clan_tag_is_a_personalised_hash_not_the_id():
    tag = clan_tag(CLAN)
    assert tag == hashlib.blake2b(CLAN, digest_size=8, person=b"clan-mdns").hexdigest()
    assert len(tag) == 16 and tag != clan_tag(OTHER)
    assert CLAN.hex() not in tag
    # Not the plain hash either: another use of BLAKE2b must not give the same tag.
    assert tag != hashlib.blake2b(CLAN, digest_size=8).hexdigest()


def test_txt_carries_only_tag_key_version_port():
    t = encode_txt(CLAN, PEER, wg_port=51820)
    assert t == {"v": "1", "c": clan_tag(CLAN), "n": PEER.hex(), "w": "51820"}
    assert all(CLAN.decode() not in v for v in t.values())
    assert "w" not in encode_txt(CLAN, PEER)


@given(st.binary(min_size=1, max_size=64), st.binary(min_size=32, max_size=32))
def test_txt_roundtrip(clan, key):
    props = {k.encode(): v.encode() for k, v in encode_txt(clan, key, wg_port=7).items()}
    assert decode_txt(props) == Announcement(clan_tag(clan), key, 7)
    # zeroconf may give str keys too
    assert decode_txt(encode_txt(clan, key)) == Announcement(clan_tag(clan), key, None)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p.pop(b"n"),
        lambda p: p.pop(b"c"),
        lambda p: p.pop(b"v"),
        lambda p: p.__setitem__(b"v", b"2"),  # a future format
        lambda p: p.__setitem__(b"n", b"ab" * 31),  # short key
        lambda p: p.__setitem__(b"n", b"zz" * 32),  # not hex
        lambda p: p.__setitem__(b"n", PEER.hex().upper().encode()),  # not canonical
        lambda p: p.__setitem__(b"c", b"0" * 15),
        lambda p: p.__setitem__(b"n", None),  # a key without a value
        lambda p: p.__setitem__(b"n", "é".encode() * 32),
        lambda p: p.__setitem__(b"w", b"0"),
        lambda p: p.__setitem__(b"w", b"65536"),
        lambda p: p.__setitem__(b"w", b"+80"),
        lambda p: p.__setitem__(b"w", b"080"),
    ],
)
def test_malformed_txt_decodes_to_none(mutate):
    props = txt()
    mutate(props)
    assert decode_txt(props) is None


def test_non_mapping_txt_is_none():
    assert decode_txt(None) is None
    assert decode_txt([(b"v", b"1")]) is None


_txt_atoms = st.one_of(st.none(), st.binary(max_size=70), st.text(max_size=70), st.integers())


@given(st.dictionaries(_txt_atoms, _txt_atoms, max_size=6))
def test_txt_decoder_never_raises(props):
    ann = decode_txt(props)
    assert ann is None or len(ann.node_key) == 32


@given(st.dictionaries(st.sampled_from([b"v", b"c", b"n", b"w", "v", "n"]), _txt_atoms))
def test_txt_decoder_never_raises_on_our_field_names(props):
    decode_txt(props)


@pytest.mark.parametrize(
    "ip,port,out",
    [
        ("10.0.0.1", 4242, "10.0.0.1:4242"),
        ("2001:db8::1", 1, "[2001:db8::1]:1"),
        ("127.0.0.1", 1, None),
        ("::1", 1, None),
        ("fe80::1", 1, None),
        ("169.254.1.1", 1, None),
        ("0.0.0.0", 1, None),
        ("224.0.0.251", 1, None),
        ("not-an-ip", 1, None),
        ("10.0.0.1", 0, None),
        ("10.0.0.1", 70000, None),
    ],
)
def test_format_address(ip, port, out):
    assert format_address(ip, port) == out


# ---- the MdnsPeers table ----


def lan(key, addr, wg=None):
    return Candidate(key, "lan", addr, "mdns", wg)


def test_a_clan_peer_becomes_a_candidate():
    t = MdnsPeers(CLAN, ME)
    ch = t.resolved(NAME, txt(wg=51820), ["10.0.0.2", "fe80::2", "2001:db8::2"], 4242)
    want = (lan(PEER, "10.0.0.2:4242", 51820), lan(PEER, "[2001:db8::2]:4242", 51820))
    assert ch == [(PEER, want)]
    assert t.candidates() == {PEER: want}


def test_other_clan_own_and_malformed_are_ignored_and_counted():
    t = MdnsPeers(CLAN, ME)
    assert t.resolved("a." + SERVICE_TYPE, txt(clan=OTHER), ["10.0.0.3"], 1) == []
    assert t.resolved("b." + SERVICE_TYPE, txt(key=ME), ["10.0.0.1"], 1) == []
    assert t.resolved("c." + SERVICE_TYPE, {b"v": b"1"}, ["10.0.0.4"], 1) == []
    assert t.resolved("d." + SERVICE_TYPE, None, ["10.0.0.4"], 1) == []
    assert t.ignored == {"other_clan": 1, "own": 1, "malformed": 2}
    assert t.candidates() == {}


def test_unchanged_answer_is_no_change_and_a_new_address_is():
    t = MdnsPeers(CLAN, ME)
    t.resolved(NAME, txt(), ["10.0.0.2"], 4242)
    assert t.resolved(NAME, txt(), ["10.0.0.2"], 4242) == []
    assert t.resolved(NAME, txt(), ["10.0.0.9"], 4242) == [(PEER, (lan(PEER, "10.0.0.9:4242"),))]


def test_goodbye_removes_and_unknown_goodbye_is_nothing():
    t = MdnsPeers(CLAN, ME)
    t.resolved(NAME, txt(), ["10.0.0.2"], 4242)
    assert t.gone(NAME) == [(PEER, ())]
    assert t.candidates() == {}
    assert t.gone(NAME) == []


def test_two_instances_of_one_node_are_united():
    t = MdnsPeers(CLAN, ME)
    t.resolved("x." + SERVICE_TYPE, txt(), ["10.0.0.2"], 4242)
    ch = t.resolved("y." + SERVICE_TYPE, txt(), ["10.0.1.2"], 4242)
    assert ch == [(PEER, (lan(PEER, "10.0.0.2:4242"), lan(PEER, "10.0.1.2:4242")))]
    assert t.gone("x." + SERVICE_TYPE) == [(PEER, (lan(PEER, "10.0.1.2:4242"),))]


def test_an_instance_that_changes_its_key_moves_its_addresses():
    t = MdnsPeers(CLAN, ME)
    t.resolved(NAME, txt(key=PEER), ["10.0.0.2"], 4242)
    ch = t.resolved(NAME, txt(key=PEER2), ["10.0.0.2"], 4242)
    assert sorted(ch) == sorted([(PEER, ()), (PEER2, (lan(PEER2, "10.0.0.2:4242"),))])


def test_an_instance_that_turns_malformed_or_foreign_is_removed():
    t = MdnsPeers(CLAN, ME)
    t.resolved(NAME, txt(), ["10.0.0.2"], 4242)
    assert t.resolved(NAME, {b"v": b"9"}, ["10.0.0.2"], 4242) == [(PEER, ())]
    t.resolved(NAME, txt(), ["10.0.0.2"], 4242)
    assert t.resolved(NAME, txt(clan=OTHER), ["10.0.0.2"], 4242) == [(PEER, ())]


def test_address_flood_is_capped():
    t = MdnsPeers(CLAN, ME)
    ips = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(1000)]
    [(_, cands)] = t.resolved(NAME, txt(), ips, 4242)
    assert len(cands) == mdns.MAX_ADDRESSES


# ---- degrade cleanly ----


async def test_no_multicast_interface_is_a_reason(monkeypatch):
    monkeypatch.setattr(mdns, "multicast_interfaces", lambda: [])
    d = MdnsDiscovery(CLAN, ME, 4242)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
    assert not d.available and "multicast" in d.reason


async def test_zeroconf_failing_is_a_reason(monkeypatch):
    import zeroconf

    def boom(*a, **kw):
        raise OSError(99, "Cannot assign requested address")

    monkeypatch.setattr(mdns, "multicast_interfaces", lambda: ["eth0"])
    monkeypatch.setattr(zeroconf, "Zeroconf", boom)
    d = MdnsDiscovery(CLAN, ME, 4242, interfaces=["192.0.2.1"])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
    assert not d.available
    assert "zeroconf failed to start" in d.reason and "Cannot assign" in d.reason


async def test_bad_interface_address_is_a_reason(monkeypatch):
    monkeypatch.setattr(mdns, "multicast_interfaces", lambda: ["eth0"])
    d = MdnsDiscovery(CLAN, ME, 4242, interfaces=["not-an-ip"])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
    assert not d.available and "cannot list our addresses" in d.reason


class _FakeZeroconf:
    """Stands in for zeroconf.Zeroconf: answers get_service_info from `answers`."""

    answers: dict = {}
    instances: list = []

    def __init__(self, interfaces=None):
        self.interfaces = interfaces
        self.registered = []
        self.closed = False
        _FakeZeroconf.instances.append(self)

    def register_service(self, info, allow_name_change=False):
        self.registered.append((info, allow_name_change))

    def get_service_info(self, type_, name, timeout=3000):
        return self.answers.get(name)

    def close(self):
        self.closed = True


class _FakeBrowser:
    """Stands in for zeroconf.ServiceBrowser: fires `script` from its own thread,
    with keyword arguments, the way zeroconf calls handlers."""

    script: list = []

    def __init__(self, zc, type_, handlers):
        import threading

        def fire():
            for name, state in self.script:
                handlers[0](zeroconf=zc, service_type=type_, name=name, state_change=state)

        self.cancelled = False
        threading.Thread(target=fire, daemon=True).start()

    def cancel(self):
        self.cancelled = True


def _info(props, addrs, port):
    return SimpleNamespace(properties=props, port=port, parsed_addresses=lambda: list(addrs))


async def test_browser_callbacks_reach_trio_through_the_bridge(monkeypatch):
    import zeroconf

    states = zeroconf.ServiceStateChange
    peer_name, other_name, own_name = (f"{n}.{SERVICE_TYPE}" for n in ("p", "o", "me"))
    _FakeZeroconf.answers = {
        peer_name: _info(txt(wg=51820), ["10.0.0.2"], 4242),
        other_name: _info(txt(clan=OTHER, key=PEER2), ["10.0.0.3"], 4242),
        own_name: _info(txt(key=ME), ["10.0.0.1"], 4242),
    }
    _FakeZeroconf.instances = []
    _FakeBrowser.script = [
        (own_name, states.Added),
        (other_name, states.Added),
        (peer_name, states.Added),
        (peer_name, states.Updated),  # same answer: no second update
        (peer_name, states.Removed),
    ]
    monkeypatch.setattr(mdns, "multicast_interfaces", lambda: ["eth0"])
    monkeypatch.setattr(zeroconf, "Zeroconf", _FakeZeroconf)
    monkeypatch.setattr(zeroconf, "ServiceBrowser", _FakeBrowser)
    seen = []
    d = MdnsDiscovery(
        CLAN,
        ME,
        4000,
        interfaces=["10.0.0.1"],
        wg_port=51821,
        on_update=lambda k, c: seen.append((k, c)),
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(d.run)
            assert d.available and "eth0" in d.reason
            while len(seen) < 2:
                await trio.sleep(0.01)
            await trio.sleep(0.1)  # nothing more may arrive
            nursery.cancel_scope.cancel()
    assert seen == [(PEER, (lan(PEER, "10.0.0.2:4242", 51820),)), (PEER, ())]
    assert d.peers.ignored == {"other_clan": 1, "own": 1, "malformed": 0}
    [zc] = _FakeZeroconf.instances
    assert zc.interfaces == ["10.0.0.1"] and zc.closed  # closed: goodbye sent
    [(info, rename_ok)] = zc.registered
    assert rename_ok
    assert info.port == 4000 and info.parsed_addresses() == ["10.0.0.1"]
    assert decode_txt(info.properties) == Announcement(clan_tag(CLAN), ME, 51821)
    assert not d.available and d.reason == "stopped"


def test_multicast_interfaces_excludes_loopback():
    names = multicast_interfaces()
    assert "lo" not in names
    assert all(isinstance(n, str) and n for n in names)


# ---- two namespaces on one link (root) ----

HELPER = Path(__file__).with_name("_mdns_node.py")
ROOT = Path(__file__).resolve().parents[1]


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")
@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2 (ip) for the test netns")
def test_two_namespaces_find_each_other_and_ignore_another_clan():
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"mdA{tag}", f"mdB{tag}"
    va, vb = f"mva{tag}", f"mvb{tag}"
    ka, kb, kc = bytes([0xA]) * 32, bytes([0xB]) * 32, bytes([0xC]) * 32
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def node(ns, clan, key, port, seconds, *ifaces):
        cmd = ["ip", "netns", "exec", ns, sys.executable, str(HELPER)]
        cmd += [clan.hex(), key.hex(), str(port), str(seconds), *ifaces]
        return subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )

    procs = []
    try:
        _ip("netns", "add", ns_a)
        _ip("netns", "add", ns_b)
        _ip("link", "add", va, "type", "veth", "peer", "name", vb)
        _ip("link", "set", va, "netns", ns_a)
        _ip("link", "set", vb, "netns", ns_b)
        _ip("-n", ns_a, "addr", "add", "10.97.0.1/24", "dev", va)
        _ip("-n", ns_b, "addr", "add", "10.97.0.2/24", "dev", vb)
        for ns, dev in ((ns_a, va), (ns_b, vb)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")

        # B browses longest; A leaves early (goodbye); C is of another clan,
        # on A's namespace and address, and runs as long as B.
        b = node(ns_b, CLAN, kb, 4002, 6)
        time.sleep(0.5)
        t_a = time.time()
        a = node(ns_a, CLAN, ka, 4001, 3)  # default interfaces: all of its netns
        c = node(ns_a, OTHER, kc, 4003, 5, "10.97.0.1")
        procs = [a, b, c]
        outs = {}
        for name, p in zip("abc", procs, strict=True):
            out, err = p.communicate(timeout=30)
            assert p.returncode == 0, f"{name}: {err}"
            outs[name] = _events(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    for name in "abc":
        ready = outs[name][0]
        assert ready["event"] == "ready" and ready["available"], ready
    a_ev, b_ev, c_ev = outs["a"], outs["b"], outs["c"]

    def updates(evs, key):
        return [e for e in evs if e["event"] == "update" and e["node_key"] == key.hex()]

    # Each finds the other, with the announced port and WireGuard port ...
    b_sees_a = updates(b_ev, ka)
    assert b_sees_a and b_sees_a[0]["addresses"] == ["10.97.0.1:4001"]
    assert b_sees_a[0]["wg_ports"] == [51820]
    assert b_sees_a[0]["t"] - t_a < 5, "B found A too late"
    a_sees_b = updates(a_ev, kb)
    assert a_sees_b and a_sees_b[0]["addresses"] == ["10.97.0.2:4002"]
    # ... B drops A on its goodbye, long before A's record TTL would expire ...
    assert b_sees_a[-1]["addresses"] == []
    # ... and nobody reports the other clan's node, nor itself.
    for evs in (a_ev, b_ev):
        assert not updates(evs, kc)
    assert not updates(b_ev, kb) and not updates(a_ev, ka)
    assert [e for e in c_ev if e["event"] == "update"] == []
    # The other clan's answers did arrive and were dropped (not just never sent).
    assert b_ev[-1]["event"] == "done" and b_ev[-1]["ignored"]["other_clan"] >= 1
    assert b_ev[-1]["ignored"]["own"] >= 1
    assert c_ev[-1]["ignored"]["other_clan"] >= 2  # A and B
    print("mdns: B found A after", round(b_sees_a[0]["t"] - t_a, 2), "s")
