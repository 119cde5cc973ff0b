"""The metrics HTTP listener under hostile clients (`[metrics] listen`).

Its caps (connections in all and per source, a deadline for the whole
exchange, a request-head limit) and its answers to requests that are wrong
in every field, against a real socket.  Throughout, a genuine scrape still
gets through and no fault is counted as an internal error.
"""

from __future__ import annotations

import socket
import time

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clanagent.metrics.http import MetricsListener

BODY = b"# TYPE x gauge\nx 1\n"


class Scrapes:
    def __init__(self) -> None:
        self.asked: list[bool] = []

    async def __call__(self, openmetrics: bool) -> tuple[bytes, str]:
        self.asked.append(openmetrics)
        return BODY, "text/plain; version=0.0.4; charset=utf-8"


async def start(nursery: trio.Nursery, **kw) -> tuple[MetricsListener, Scrapes]:
    scrapes = Scrapes()
    listener = MetricsListener("127.0.0.1", 0, scrapes, **kw)
    await nursery.start(listener.serve)
    return listener, scrapes


async def exchange(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    """Send `data` and EOF, read until the listener closes; the reply's bytes."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    out = b""
    with trio.fail_after(10):
        try:
            if data:
                await stream.send_all(data)
            await stream.send_eof()
            while chunk := await stream.receive_some(65536):
                out += chunk
        except trio.BrokenResourceError:
            pass  # reset: a refused connection, or a reply cut short (the caller sees which)
    await stream.aclose()
    return out


def get(path: str = "/metrics", host: str = "127.0.0.1:9946", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def status_of(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:80]
    return int(reply.split(b" ", 2)[1])


async def test_answers_scrapes_and_refuses_everything_else():
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            listener, scrapes = await start(n)
            port = listener.port
            reply = await exchange(port, get())
            assert status_of(reply) == 200 and reply.endswith(BODY)
            assert b"Content-Type: text/plain; version=0.0.4" in reply
            accept = "Accept: application/openmetrics-text; version=1.0.0\r\n"
            assert status_of(await exchange(port, get(extra=accept))) == 200
            assert scrapes.asked == [False, True]
            head = await exchange(port, get().replace(b"GET", b"HEAD", 1))
            assert status_of(head) == 200 and not head.endswith(BODY)
            assert f"Content-Length: {len(BODY)}".encode() in head
            assert status_of(await exchange(port, get("/"))) == 200
            assert status_of(await exchange(port, get("/metrics?x=1"))) == 200
            post = b"POST /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
            assert status_of(await exchange(port, post)) == 405
            assert status_of(await exchange(port, get("/../etc/passwd"))) == 404
            # a page on another name that resolves to us (DNS rebinding)
            assert status_of(await exchange(port, get(host="evil.example:9946"))) == 403
            assert status_of(await exchange(port, get(host="[::1]:9946"))) == 200
            assert status_of(await exchange(port, get(host="localhost"))) == 200
            assert status_of(await exchange(port, b"\x16\x03\x01\x00\xa5garbage\r\n\r\n")) == 400
            huge = get(extra="X-Pad: " + "a" * 20_000 + "\r\n")
            assert status_of(await exchange(port, huge)) == 431
            assert await exchange(port, b"") == b""  # connect and close: nothing owed
            c = listener.counters()
            assert c["scrapes"] == 6  # HEAD scrapes too
            assert c["forbidden_host"] == 1 and c["not_found"] == 1
            assert c["bad_requests"] == 3  # the POST, the garbage, the huge head
            assert c["errors"] == 0 and c["open"] == 0
            n.cancel_scope.cancel()


async def test_connection_caps_and_the_deadline_hold_and_a_scrape_still_gets_in():
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            listener, _ = await start(n, max_connections=4, max_per_source=2, deadline=1.0)
            port = listener.port

            def idle(source: str) -> socket.socket:
                s = socket.socket()
                s.bind((source, 0))
                s.connect(("127.0.0.1", port))
                s.send(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
                return s

            held = [idle("127.0.0.1"), idle("127.0.0.1")]
            await wait_for(lambda: listener.counters()["open"] == 2)
            # a third from the same source: closed at once, unanswered
            assert await exchange(port, get(), "127.0.0.1") == b""
            held += [idle("127.0.0.2"), idle("127.0.0.2")]
            await wait_for(lambda: listener.counters()["open"] == 4)
            assert await exchange(port, get(), "127.0.0.3") == b""  # all four slots taken
            c = listener.counters()
            assert (c["refused_source"], c["refused_busy"]) == (1, 1)
            # the deadline frees every slot; a genuine scrape then gets in
            await wait_for(lambda: listener.counters()["open"] == 0, timeout=5)
            assert listener.counters()["timeouts"] == 4
            assert status_of(await exchange(port, get(), "127.0.0.3")) == 200
            for s in held:
                s.close()
            n.cancel_scope.cancel()


async def test_a_slow_client_is_cut_off_at_the_deadline():
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            listener, _ = await start(n, deadline=1.0)
            stream = await trio.open_tcp_stream("127.0.0.1", listener.port)
            started = trio.current_time()
            closed = False
            for byte in get():  # one byte every 0.2 s: 13 s for the whole request
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    closed = True
                    break
                with trio.move_on_after(0.2):
                    if await stream.receive_some(100) == b"":
                        closed = True
                        break
            assert closed
            assert trio.current_time() - started < 2.5
            assert listener.counters()["timeouts"] == 1
            n.cancel_scope.cancel()


async def wait_for(pred, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


# Requests of the right shape, wrong in every field.
_token = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=12)
_value = st.binary(max_size=64).filter(lambda b: b"\r" not in b and b"\n" not in b)
_request = st.builds(
    lambda method, target, version, headers, body: (
        method
        + b" "
        + target
        + b" "
        + version
        + b"\r\n"
        + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        + b"\r\n"
        + body
    ),
    st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b"CONNECT", b"", b"G\x00T"]),
    st.one_of(
        st.sampled_from([b"/metrics", b"/", b"*", b"http://x/metrics", b"/metrics#x"]),
        st.binary(max_size=40).filter(lambda b: b" " not in b and b"\r" not in b),
    ),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""]),
    st.lists(
        st.tuples(
            st.one_of(
                st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Accept"]),
                _token.map(str.encode),
            ),
            _value,
        ),
        max_size=6,
    ),
    st.binary(max_size=64),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(_request, min_size=1, max_size=5))
def test_requests_wrong_in_every_field_get_an_answer_or_a_close(requests):
    async def run() -> None:
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                listener, _ = await start(n, deadline=2.0)
                for raw in requests:
                    reply = await exchange(listener.port, raw)
                    if reply:
                        assert status_of(reply) in (200, 400, 403, 404, 405, 431, 501, 505)
                # still serving, and nothing counted as a fault of ours
                assert status_of(await exchange(listener.port, get())) == 200
                assert listener.counters()["errors"] == 0
                n.cancel_scope.cancel()

    trio.run(run)


# -- a real clan's agent (tests/hostile/conftest.py), its /metrics flooded ------------

IDLE_FLOOD = 300  # idle connections to m1's metrics port, from several sources
FLOOD_SOURCES = [f"127.0.0.{i}" for i in range(2, 8)]


def _scrape(addr: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0)) as s:
        s.sendall(f"GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.slow
def test_a_flooded_metrics_port_costs_the_agent_nothing_else(clan):
    from .attacker import closed_by_peer, tcp_connections

    addr = clan.metrics["m1"]
    status, body = _scrape(addr)
    assert status == 200 and b'clanagent_members{state="alive"} 3.0' in body
    held = []
    try:
        for source in FLOOD_SOURCES:
            held += tcp_connections(addr, IDLE_FLOOD // len(FLOOD_SOURCES), source)
        for s in held[::7]:  # half a request head from some, garbage from others
            try:
                s.send(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100)
            except OSError:
                pass
        # the caps closed all but a few at once; status still answers fast
        time.sleep(0.5)
        open_now = [s for s in held if not closed_by_peer(s)]
        assert len(open_now) <= 16, len(open_now)
        clan.assert_healthy()
        # once the deadline has freed the slots a genuine scrape gets in
        deadline = time.monotonic() + 15
        while True:
            try:
                status, body = _scrape(addr, "127.0.0.9")
                break
            except (OSError, IndexError, ValueError):
                assert time.monotonic() < deadline, "no scrape got in within 15 s"
                time.sleep(0.5)
        assert status == 200
        got = {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in body.decode().splitlines()
            if line.startswith("clanagent_status_counter{") and 'part="metrics_http"' in line
        }
        refused = sum(v for k, v in got.items() if "refused_" in k)
        assert refused >= len(held) - 16, got
        assert got['clanagent_status_counter{name="errors",part="metrics_http"}'] == 0
    finally:
        for s in held:
            s.close()
    clan.assert_healthy()
