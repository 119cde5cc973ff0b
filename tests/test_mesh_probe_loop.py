"""The mesh service's probe round on its ports: a fake clock, a fake backend
whose counters stand for WireGuard's, a socket that records what was sent.
A path in use whose probes go unanswered is failed -- unless WireGuard
received from the peer over it meanwhile."""

from __future__ import annotations

import socket

from clanagent.mesh import candidates as cands
from clanagent.mesh.probe import ProbeTracker
from clanagent.mesh.wireguard import PeerStatus
from tests.test_mesh_service_ports import World, _running


class FakeSocket:
    family = socket.AF_INET

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    async def sendto(self, data: bytes, addr) -> None:
        self.sent.append(addr[:2])


async def _setup():
    w = World()
    svc = _running(w)
    svc.on_record(
        w.record(
            "alpha", cands.ENDPOINTS_KIND, "", cands.endpoints_body(["10.0.0.1:7946"], [], 51820)
        )
    )
    await svc.reconcile_once()
    svc._probe_sock = FakeSocket()
    svc.tracker = ProbeTracker()
    key = w.idents["alpha"].public_key
    assert svc.selector.current(key).address == "10.0.0.1:7946"
    svc.backend.status[w.wg("alpha")] = PeerStatus(None, rx_bytes=1000)
    return w, svc, key


async def _rounds_until(w, svc, pred, limit: float = 10.0) -> float:
    """Probe rounds, sleeping as the service's loop does, until `pred()`."""
    t0 = w.clock.t
    while not pred() and w.clock.t - t0 < limit:
        await svc._probe_round(svc.selector)
        if pred():
            break
        nd = svc.tracker.next_deadline()
        w.clock.t += 1.0 if nd is None else min(1.0, max(0.005, nd - w.clock.t))
    return w.clock.t - t0


async def test_an_unanswered_path_in_use_is_failed_in_under_3_seconds():
    w, svc, key = await _setup()
    took = await _rounds_until(w, svc, lambda: svc.stats["paths_failed"] > 0)
    # No RTT known yet (1 s timeouts): the slowest case, still under 3 s.
    assert took < 3.0
    assert svc.stats["paths_suspected"] == 1 and svc.stats["failures_vetoed"] == 0
    assert svc.selector.current(key).address != "10.0.0.1:7946"
    assert svc._wakeup.is_set()  # the reconcile moves WireGuard to the new path
    probes = [a for a in svc._probe_sock.sent if a[0] == "10.0.0.1"]
    # one a second, then ten a second while suspect (1.6 s here: 1 s timeouts)
    assert 9 <= len(probes) <= 18


async def test_wireguard_traffic_over_the_path_vetoes_the_failure():
    w, svc, key = await _setup()
    await _rounds_until(w, svc, lambda: svc.stats["paths_suspected"] > 0)
    # The probes go unanswered, but WireGuard hears the peer over that host.
    svc.backend.status[w.wg("alpha")] = PeerStatus(None, rx_bytes=5000)
    await _rounds_until(w, svc, lambda: svc.stats["failures_vetoed"] > 0)
    assert svc.stats["paths_failed"] == 0
    assert svc.selector.current(key).address == "10.0.0.1:7946"
    # Silence from then on (counters unchanged): the next suspicion fails it.
    await _rounds_until(w, svc, lambda: svc.stats["paths_failed"] > 0)
    assert svc.stats["paths_failed"] == 1 and svc.stats["failures_vetoed"] == 1
    assert svc.selector.current(key).address != "10.0.0.1:7946"
