"""NAT traversal in network namespaces, with nftables NAT routers.

First the harness itself (`_nat_netns.py`) is held to what the NAT recipe
measured, with plain UDP sockets: an endpoint-independent NAT keeps one
mapping for every destination, `masquerade random` makes a new one per
destination, unsolicited inbound does not get through, and two sockets
behind two endpoint-independent NATs reach each other once both have sent
(a hole punch, by hand).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from ._nat_netns import Clan, NatNet
from ._netns import netns_missing_reason

REASON = netns_missing_reason() or (None if shutil.which("nft") else "needs nft (nftables)")
pytestmark = [
    pytest.mark.root,
    pytest.mark.integration,
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]

# A UDP socket in a namespace: bind, send to each target, report what arrives
# (source address and payload) within the timeout, as one JSON line.
UDP = r"""
import json, socket, sys, time
port, targets, wait = int(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
s.settimeout(0.05)
got, end, next_send = [], time.monotonic() + wait, 0.0
while time.monotonic() < end:
    if targets and time.monotonic() >= next_send:
        for host, p, payload in targets:
            s.sendto(payload.encode(), (host, p))
        next_send = time.monotonic() + 0.2
    try:
        data, src = s.recvfrom(2048)
    except socket.timeout:
        continue
    got.append([src[0], src[1], data.decode()])
    if data.startswith(b"echo?"):
        s.sendto(b"reply " + data, src)
print(json.dumps(got))
"""


def udp(net: NatNet, i: int, port: int, targets: list, wait: float) -> subprocess.Popen:
    return subprocess.Popen(
        ["ip", "netns", "exec", net.hosts[i], sys.executable, "-c", UDP, str(port),
         json.dumps(targets), str(wait)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def result(p: subprocess.Popen) -> list:
    out, _ = p.communicate(timeout=30)
    return json.loads(out)


@pytest.fixture
def net_factory():
    made: list[NatNet] = []

    def make(mode_a: str, mode_b: str) -> NatNet:
        net = NatNet(mode_a, mode_b, prefix=f"cn{len(made)}{time.monotonic_ns() % 1000}")
        made.append(net)
        net.setup()
        return net

    yield make
    for net in made:
        net.teardown()


def test_the_harness_nats_behave_as_measured(net_factory):
    net = net_factory("eim", "symmetric")
    pub = net.public_ip
    # the public machine listens on two ports; each site sends to both
    server = udp(net, 2, 9999, [], 2.0)
    server2 = udp(net, 2, 9998, [], 2.0)
    time.sleep(0.3)
    a = udp(net, 0, 4444, [[pub, 9999, "a"], [pub, 9998, "a"]], 1.0)
    b = udp(net, 1, 4444, [[pub, 9999, "b"], [pub, 9998, "b"]], 1.0)
    result(a), result(b)
    seen = {(h, p, d) for h, p, d in result(server) + result(server2)}
    a_ports = {p for h, p, d in seen if d == "a"}
    b_ports = {p for h, p, d in seen if d == "b"}
    assert {h for h, p, d in seen if d == "a"} == {net.sites[0].wan_ip}
    # endpoint-independent: one mapping, the source port kept
    assert a_ports == {4444}
    # symmetric: one mapping per destination
    assert len(b_ports) == 2, b_ports


def test_unsolicited_inbound_is_dropped_and_punching_by_hand_gets_through(net_factory):
    net = net_factory("firewall", "eim")
    wa, wb = net.sites[0].wan_ip, net.sites[1].wan_ip
    # the public machine sends to a's router unasked: nothing arrives
    a = udp(net, 0, 5555, [], 1.5)
    time.sleep(0.3)
    pub = udp(net, 2, 6000, [[wa, 5555, "unasked"]], 0.8)
    assert result(a) == [] and result(pub) == []
    # both sites send to each other's mapping at once: both receive
    a = udp(net, 0, 5555, [[wb, 5555, "from a"]], 2.0)
    b = udp(net, 1, 5555, [[wa, 5555, "from b"]], 2.0)
    got_a, got_b = result(a), result(b)
    assert [wb, 5555, "from b"] in got_a
    assert [wa, 5555, "from a"] in got_b


# ---------------------------------------------------------------- real agents


def _punched(clan: Clan, mode: str, tmp_path) -> None:
    from ._netns import wait_until

    net = clan.net
    wa, wb = net.sites[0].wan_ip, net.sites[1].wan_ip
    overlay = {n: clan.path("p", n)["overlay6"] for n in ("a", "b")}

    # both reach the public member, which sees their NAT mappings (a and b
    # start together: a may not have the inventory yet)
    p6: list[str] = []

    def a_knows_p() -> bool:
        try:
            p6.append(clan.path("a", "p")["overlay6"])
        except AssertionError:
            return False
        return True

    wait_until(a_knows_p, 30, "a's inventory")
    for i, n in enumerate(("a", "b")):
        wait_until(lambda i=i: net.ping(i, p6[0]), 60, f"{n} -> p")

    def refl(n: str, wan: str) -> bool:
        return any(a.startswith(wan + ":") for a in clan.path(n, "p")["nat_self"]["reflexive"])

    wait_until(lambda: refl("a", wa) and refl("b", wb), 60, "a and b to learn their mappings")
    # p has no path of its own to a (a's addresses are private), yet WireGuard
    # talks to a at its mapping: `clanctl path` on p shows that path
    wait_until(lambda: (clan.path("p", "a")["chosen"] or {}).get("learnt"), 30, "p's learnt path")
    shown = clan.path("p", "a")
    assert shown["chosen"]["kind"] == "reflexive", shown
    assert shown["chosen"]["address"].startswith(wa + ":"), shown
    assert shown["reason"].startswith("learnt from the peer's packets"), shown
    t_refl = time.monotonic() - clan.started
    # then they punch: a direct path, with nobody between them
    took = wait_until(
        lambda: net.ping(0, overlay["b"]) and net.ping(1, overlay["a"]),
        90,
        "a <-> b over WireGuard",
    )
    t_ping = time.monotonic() - clan.started
    # and the window is judged: WireGuard hears b at its mapping, twice in a row
    wait_until(lambda: clan.path("a", "b")["nat"]["punch"].startswith("punched"), 20, "punched")
    path = clan.path("a", "b")
    assert path["chosen"]["kind"] == "reflexive", path
    assert path["chosen"]["address"] == f"{wb}:51820", path
    assert path["nat"]["punch"].startswith("punched"), path["nat"]
    # the stock wg tool: a's peer b is at b's router, with b's WireGuard port
    eps = net.wg_show(0, clan.ifaces["a"])
    assert f"{wb}:51820" in eps, eps
    assert f"{wa}:51820" in net.wg_show(1, clan.ifaces["b"])
    # nothing relayed: p is cut off and the two still talk
    net.cut_public(False)
    try:
        wait_until(lambda: net.ping(0, overlay["b"]), 10, "a -> b with p gone")
    finally:
        net.cut_public(True)
    print(f"{mode}: reflexive learnt {t_refl:.1f} s, first a<->b ping {t_ping:.1f} s "
          f"after start ({took:.1f} s after the mappings)")  # fmt: skip


@pytest.mark.parametrize(
    "mode, p_tags",
    [("eim", "server"), ("firewall", "server"), ("eim", "server,relay")],
    ids=["eim", "firewall", "relay-then-direct"],
)
def test_two_sites_behind_nats_punch_a_direct_path(net_factory, tmp_path, mode, p_tags):
    # with a relay on offer, a and b may talk through it first; the punched
    # path takes over (reflexive ranks above relay) as soon as it works
    net = net_factory(mode, mode)
    clan = Clan(net, tmp_path, p_tags=p_tags)
    try:
        _punched(clan, mode, tmp_path)
    except BaseException:
        print(clan.logs())
        raise


def test_a_symmetric_nat_is_crossed_through_a_relaying_member(net_factory, tmp_path):
    from ._netns import wait_until

    net = net_factory("eim", "symmetric")
    clan = Clan(net, tmp_path, p_tags="server,relay")
    try:
        overlay = {n: clan.path("p", n)["overlay6"] for n in ("a", "b")}

        def relayed() -> bool:
            # (a punch round may hold the path for its 12 s window: it fails here;
            # a may not have the inventory yet)
            try:
                chosen = clan.path("a", "b")["chosen"]
            except AssertionError:
                return False
            return bool(chosen and chosen["kind"] == "relay") and net.ping(0, overlay["b"])

        took = wait_until(lambda: relayed() and net.ping(1, overlay["a"]), 120, "a <-> b relayed")
        t_ping = time.monotonic() - clan.started
        path = clan.path("a", "b")
        if path["chosen"]["kind"] != "relay":  # a punch round began since: it fails
            wait_until(relayed, 30, "the relay path back")
            path = clan.path("a", "b")
        assert path["chosen"]["kind"] == "relay" and path["chosen"]["via"] == "p", path
        assert path["chosen"]["address"].startswith(net.public_ip + ":"), path
        row = next(r for r in path["paths"] if r["chosen"])
        assert "relay via p" in row["reason"], row
        # the stock wg tool: a sends to b through p's relay port
        assert path["chosen"]["address"] in net.wg_show(0, clan.ifaces["a"])
        # a full-MTU packet (1420 bytes inside: WireGuard pads it to no multiple
        # of 16) goes through the relay too, as every TCP stream's segments do
        big = net.run(0, "ping", "-c1", "-W2", "-s", "1372", "-M", "do", overlay["b"])
        assert big.returncode == 0, big.stdout
        from ._netns import clanctl

        text = clanctl(clan.socks["a"], "path", "b")
        assert "chosen     relay via p" in text and "relay      p: relay via p" in text, text
        print(f"symmetric: first relayed a<->b ping {t_ping:.1f} s after start ({took:.1f} s)")
        # the relay sees b's socket behind two ports: b learns its NAT maps per
        # destination and stops offering a mapping, so no punch round takes
        # the path off the relay any more
        wait_until(lambda: clan.path("b", "p")["nat_self"]["mapping_varies"], 60, "b's NAT kind")
        time.sleep(13)  # a punch window already under way ends
        for _ in range(15):
            assert clan.path("a", "b")["chosen"]["kind"] == "relay"
            time.sleep(1)
        # the relay goes away: the path falls back (no Tor here: no path)
        net.cut_public(False)
        wait_until(lambda: clan.path("a", "b")["chosen"] is None, 30, "the relay path to go")
        assert not net.ping(0, overlay["b"])
    except BaseException:
        print(clan.logs())
        raise
