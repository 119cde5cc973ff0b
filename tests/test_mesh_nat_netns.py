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

from ._nat_netns import NatNet
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
