"""The fd reserve (clanagent/fd_reserve.py) and the listeners that respect it.

At the open-file limit the control server borrows the whole reserve to serve
root: the request needs descriptors of its own (a module import, a durable
write), and the gossip listener must not take them meanwhile.  The whole
agent at its limit is tested in tests/hostile/test_fd_limit.py.
"""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio

from clanagent.control import server as control_server
from clanagent.fd_reserve import FdReserve
from clanagent.gossip.errors import PeerDisconnected
from clanagent.gossip.peer import open_peer_session

from .test_control_server import call, start_server
from .test_gossip_listener_limits import ALICE, CLAN, always, listening, url_of


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fill_borrow_give_back():
    r = FdReserve(4)
    base = _open_fds()
    r.fill()
    assert r.held == 4 and _open_fds() == base + 4 and not r.lent
    assert r.borrow()
    assert r.lent and r.held == 0 and _open_fds() == base
    r.fill()  # no refill while lent
    assert r.held == 0
    assert r.borrow()  # a second borrower shares the loan
    r.give_back()
    assert r.lent and r.held == 0
    r.give_back()
    assert not r.lent and r.held == 4
    r.close()
    assert _open_fds() == base


def test_an_empty_reserve_lends_nothing():
    r = FdReserve(2)
    assert not r.borrow() and not r.lent
    with r.lending() as ok:
        assert not ok
    with pytest.raises(ValueError):
        FdReserve(0)


async def test_the_gossip_listener_does_not_accept_while_the_reserve_is_lent():
    r = FdReserve(2)
    r.fill()
    with trio.fail_after(20):
        async with listening(fd_reserve=r) as listener:
            assert r.borrow()
            # A peer dialing now waits in the backlog: the descriptors are root's.
            with pytest.raises(PeerDisconnected):
                async with open_peer_session(url_of(listener), ALICE, CLAN, always, timeout=1):
                    pass
            assert listener.counters()["sessions_accepted"] == 0
            r.give_back()
            async with open_peer_session(url_of(listener), ALICE, CLAN, always, timeout=3) as s:
                await s.send(b"hi")
                assert await s.receive() == b"echo:hi"
    r.close()


# -- the control server borrows it at the limit ------------------------------------


def _emfile_once(monkeypatch) -> list[int]:
    """The control socket's next accept fails with EMFILE, as at the fd limit."""
    real = socket.socket.accept
    failed: list[int] = []

    def accept(self):
        if not failed and self.family == socket.AF_UNIX:
            failed.append(1)
            raise OSError(errno.EMFILE, "Too many open files")
        return real(self)

    monkeypatch.setattr(socket.socket, "accept", accept)
    return failed


async def test_root_at_the_limit_is_served_on_the_lent_reserve(tmp_path, monkeypatch):
    r = FdReserve(4)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path, fd_reserve=r)
            assert r.held == 4
            failed = _emfile_once(monkeypatch)
            assert (await call(server.path, "status"))["node_id"] == "n1"
            assert failed and server.counters()["accept_errors"] == 1
            while r.lent:  # given back as the connection ends
                await trio.sleep(0.01)
            assert r.held == 4
            n.cancel_scope.cancel()


async def test_a_connection_left_open_holds_the_reserve_no_longer_than_the_limit(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(control_server, "LOAN_LIMIT", 0.5)
    r = FdReserve(4)
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            server, _ = await start_server(n, tmp_path, fd_reserve=r)
            _emfile_once(monkeypatch)
            silent = await trio.open_unix_socket(str(server.path))
            while not r.lent:
                await trio.sleep(0.01)
            t0 = trio.current_time()
            while r.lent:
                await trio.sleep(0.01)
            assert 0.4 < trio.current_time() - t0 < 2
            assert r.held == 4  # back, though the connection is still open
            assert (await call(server.path, "status"))["node_id"] == "n1"
            await silent.aclose()
            n.cancel_scope.cancel()


async def test_the_gossip_service_dials_nobody_while_the_reserve_is_lent(tmp_path, monkeypatch):
    from clanagent import fd_reserve
    from clanagent.gossip import service
    from clanagent.gossip.node import SendTo

    from .test_gossip_service import make_cfg, start_agent

    async def hang(*args, **kwargs):
        await trio.sleep_forever()

    r = FdReserve(2)
    r.fill()
    monkeypatch.setattr(service, "PROCESS_FDS", r)
    monkeypatch.setattr(service, "connect", hang)
    assert fd_reserve.PROCESS is not r
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            a1, _ = await start_agent(n, make_cfg(tmp_path, 1, []))
            svc = a1.gossip
            with r.lending():
                svc._send(SendTo(None, "192.0.2.1:7000", b"ping"))
                assert svc.counters()["dials_refused"] == 1
                assert svc.counters()["dials_in_progress"] == 0
            svc._send(SendTo(None, "192.0.2.1:7000", b"ping"))
            assert svc.counters()["dials_in_progress"] == 1
            n.cancel_scope.cancel()
    r.close()
