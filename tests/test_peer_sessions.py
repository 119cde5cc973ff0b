"""Peer sessions over real WebSockets on 127.0.0.1, and over memory streams.

The socket tests run on trio's real clock: with real sockets, MockClock's
autojump would fire timeouts whenever every task waits for the kernel, so
the timeouts they test are short.  The memory-stream tests at the end run on
the virtual clock (`autojump_clock`).  Every test has a fail_after guard.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    serve_websocket,
    wrap_client_stream,
    wrap_server_stream,
)

from clanagent.gossip.errors import LocalProtocolError, PeerDisconnected, RemoteProtocolError
from clanagent.gossip.handshake import Role
from clanagent.gossip.peer import (
    CLOSE_POLICY_VIOLATION,
    PeerSession,
    connect,
    establish_session,
    open_peer_session,
    serve_peers,
)
from clanagent.identity import Identity

pytestmark = pytest.mark.integration

ALICE = Identity.generate()
BOB = Identity.generate()  # the server
CAROL = Identity.generate()
CLAN = b"clan-of-the-cave-bear"
GUARD = 15


def always(_key: bytes) -> bool:
    return True


def only(*ids: Identity) -> Callable[[bytes], bool]:
    keys = {i.public_key for i in ids}
    return lambda key: key in keys


async def echo(session: PeerSession) -> None:
    while True:
        data = await session.receive()
        await session.send(b"echo:" + data)


@asynccontextmanager
async def server(
    handler: Callable[[PeerSession], Awaitable[None]] = echo,
    *,
    admit: Callable[[bytes], bool] = always,
    timeout: float = 5.0,
) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_peers(
                "127.0.0.1",
                0,
                BOB,
                CLAN,
                admit,
                handler,
                timeout=timeout,
                task_status=task_status,
            )
        )
        assert port > 0
        yield f"ws://127.0.0.1:{port}/"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_ws(url: str) -> AsyncIterator[WebSocketConnection]:
    """A bare WebSocket client for speaking nonsense to the server.

    It owns its TCP stream (trio-websocket's own client leaves the socket
    open when the server closes first).
    """
    port = int(url.rsplit(":", 1)[1].strip("/"))
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, f"127.0.0.1:{port}", "/")
            yield ws
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def assert_good_client_works(url: str) -> None:
    async with open_peer_session(url, ALICE, CLAN, always, timeout=5) as s:
        await s.send(b"still there?")
        assert await s.receive() == b"echo:still there?"


async def test_session_works_both_ways() -> None:
    seen: list[str] = []

    async def handler(session: PeerSession) -> None:
        seen.append(session.peer_node_id)
        await session.send(b"hello from bob")
        await echo(session)

    with trio.fail_after(GUARD):
        async with server(handler) as url, open_peer_session(url, ALICE, CLAN, always) as s:
            assert s.peer_public_key == BOB.public_key
            assert s.peer_node_id == BOB.node_id
            assert s.version == 1
            assert await s.receive() == b"hello from bob"
            for n in range(5):
                await s.send(b"ping %d" % n)
                assert await s.receive() == b"echo:ping %d" % n
            big = bytes(range(256)) * 2000
            await s.send(big)
            assert await s.receive() == b"echo:" + big
    assert seen == [ALICE.node_id]


async def test_concurrent_senders_keep_frames_in_order() -> None:
    # Without the send lock, two sealed frames could hit the wire in the
    # opposite order of their nonces and the server would kill the session.
    with trio.fail_after(GUARD):
        async with server() as url, open_peer_session(url, ALICE, CLAN, always) as s:
            sent = {b"%d-%d" % (t, n) for t in range(4) for n in range(25)}

            async def sender(t: int) -> None:
                for n in range(25):
                    await s.send(b"%d-%d" % (t, n))

            got: set[bytes] = set()
            async with trio.open_nursery() as nursery:
                for t in range(4):
                    nursery.start_soon(sender, t)
                for _ in range(len(sent)):
                    got.add(await s.receive())
            assert got == {b"echo:" + m for m in sent}


async def test_connect_with_a_caller_nursery() -> None:
    with trio.fail_after(GUARD):
        async with server() as url, trio.open_nursery() as nursery:
            s = await connect(nursery, url, ALICE, CLAN, always, timeout=5)
            await s.send(b"x")
            assert await s.receive() == b"echo:x"
            await s.aclose()
            assert s.closed
            with pytest.raises(PeerDisconnected):
                await s.send(b"after close")
        # The nursery exited: closing the session ended its connection task.


async def test_unadmitted_client_is_refused_and_server_keeps_serving() -> None:
    handled: list[str] = []

    async def handler(session: PeerSession) -> None:
        handled.append(session.peer_node_id)
        await echo(session)

    with trio.fail_after(GUARD):
        async with server(handler, admit=only(ALICE)) as url:
            with pytest.raises(PeerDisconnected) as info:
                async with open_peer_session(url, CAROL, CLAN, always, timeout=5):
                    pytest.fail("an unadmitted key got a session")
            assert info.value.code == CLOSE_POLICY_VIOLATION
            assert "peer key is not admitted" in info.value.reason
            await assert_good_client_works(url)
    assert handled == [ALICE.node_id]


async def test_wrong_clan_is_refused_and_server_keeps_serving() -> None:
    with trio.fail_after(GUARD):
        async with server() as url:
            with pytest.raises(PeerDisconnected) as info:
                async with open_peer_session(url, ALICE, b"another clan", always, timeout=5):
                    pytest.fail("a foreign clan got a session")
            assert info.value.code == CLOSE_POLICY_VIOLATION
            assert "peer belongs to another clan" in info.value.reason
            await assert_good_client_works(url)


async def test_client_refuses_an_unadmitted_server() -> None:
    handled: list[str] = []

    async def handler(session: PeerSession) -> None:
        handled.append(session.peer_node_id)

    with trio.fail_after(GUARD):
        async with server(handler) as url:
            with pytest.raises(RemoteProtocolError) as info:
                async with open_peer_session(url, ALICE, CLAN, only(CAROL), timeout=5):
                    pytest.fail("connected to an unadmitted server")
            assert info.value.reason == "peer key is not admitted"
    assert handled == []


async def test_garbage_does_not_stop_the_server() -> None:
    with trio.fail_after(GUARD):
        async with server(timeout=1.0) as url:
            port = int(url.rsplit(":", 1)[1].strip("/"))
            # Not HTTP at all.
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"\x00\xff\x16\x03\x01 not a websocket \r\n\r\n" * 50)
            await stream.aclose()
            # A valid WebSocket whose first message is garbage.
            async with raw_ws(url) as ws:
                await ws.send_message(b"\xc1 garbage")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == CLOSE_POLICY_VIOLATION
                assert "malformed handshake message" in closed.value.reason.reason
            # A text message instead of a binary one.
            async with raw_ws(url) as ws:
                await ws.send_message("hello?")
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason.code == CLOSE_POLICY_VIOLATION
            # A half-open TCP connection that never says anything.
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            await assert_good_client_works(url)
            await silent.aclose()


async def test_silent_client_times_out_with_a_policy_close() -> None:
    with trio.fail_after(GUARD):
        async with server(timeout=0.5) as url, raw_ws(url) as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == CLOSE_POLICY_VIOLATION
            assert closed.value.reason.reason == "handshake timed out"


async def test_connect_times_out_on_a_silent_server() -> None:
    async def mute(request) -> None:
        await request.accept()
        await trio.sleep_forever()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            ws_server = await nursery.start(serve_websocket, mute, "127.0.0.1", 0, None)
            url = f"ws://127.0.0.1:{ws_server.port}/"
            start = trio.current_time()
            with pytest.raises(PeerDisconnected, match="handshake timed out"):
                await connect(nursery, url, ALICE, CLAN, always, timeout=0.5)
            assert trio.current_time() - start < 3
            nursery.cancel_scope.cancel()


async def test_connect_to_a_closed_port_is_peer_disconnected() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with trio.fail_after(GUARD), pytest.raises(PeerDisconnected) as info:
        async with open_peer_session(f"ws://127.0.0.1:{port}/", ALICE, CLAN, always, timeout=2):
            pass
    # Raised `from None`: no trio-websocket internals leak into tracebacks.
    assert info.value.__suppress_context__


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:1/", "wss://127.0.0.1:1/", "ws:///nohost", "ws://h:99999/"]
)
async def test_bad_urls_are_local_errors(url: str) -> None:
    with trio.fail_after(GUARD), pytest.raises(LocalProtocolError):
        async with open_peer_session(url, ALICE, CLAN, always, timeout=1):
            pass


async def test_forged_frame_closes_the_link_with_a_policy_violation() -> None:
    errors: list[str] = []

    async def handler(session: PeerSession) -> None:
        try:
            await echo(session)
        except RemoteProtocolError as exc:
            errors.append(exc.reason)
            raise

    with trio.fail_after(GUARD):
        async with server(handler) as url, open_peer_session(url, ALICE, CLAN, always) as s:
            # Bypass the cipher: a frame nobody sealed.
            await s._ws.send_message(b"\x00" * 64)
            with pytest.raises(PeerDisconnected) as info:
                await s.receive()
            assert info.value.code == CLOSE_POLICY_VIOLATION
            assert "frame failed authentication" in info.value.reason
            assert s.closed
            with pytest.raises(PeerDisconnected):
                await s.send(b"too late")
            await assert_good_client_works(url)
    assert errors == ["frame failed authentication"]


async def test_peer_going_away_is_peer_disconnected() -> None:
    async def hang_up(session: PeerSession) -> None:
        return  # serve_peers closes the session when the handler returns

    with trio.fail_after(GUARD):
        async with server(hang_up) as url, open_peer_session(url, ALICE, CLAN, always) as s:
            with pytest.raises(PeerDisconnected) as info:
                await s.receive()
            assert info.value.code == 1000
            assert info.value.__suppress_context__


# -- over memory streams, on the virtual clock ---------------------------------


@asynccontextmanager
async def memory_ws_pair() -> AsyncIterator[tuple[WebSocketConnection, WebSocketConnection]]:
    """Two ends of a WebSocket over trio.testing.memory_stream_pair."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    accepted: list[WebSocketConnection] = []
    ready = trio.Event()

    async def server_side(nursery: trio.Nursery) -> None:
        request = await wrap_server_stream(nursery, server_stream)
        accepted.append(await request.accept())
        ready.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server_side, nursery)
        client = await wrap_client_stream(nursery, client_stream, "sim", "/")
        await ready.wait()
        yield client, accepted[0]
        nursery.cancel_scope.cancel()


async def test_establish_session_over_memory_streams(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD):
        async with memory_ws_pair() as (client_ws, server_ws):
            sessions: dict[str, PeerSession] = {}

            async def side(name: str, ws: WebSocketConnection, role: Role, me: Identity) -> None:
                sessions[name] = await establish_session(ws, role, me, CLAN, always, timeout=5)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(side, "a", client_ws, Role.INITIATOR, ALICE)
                nursery.start_soon(side, "b", server_ws, Role.RESPONDER, BOB)
            a, b = sessions["a"], sessions["b"]
            assert a.peer_node_id == BOB.node_id and b.peer_node_id == ALICE.node_id
            await a.send(b"over memory")
            assert await b.receive() == b"over memory"
            await b.send(b"and back")
            assert await a.receive() == b"and back"
            await a.aclose()
            with pytest.raises(PeerDisconnected) as info:
                await b.receive()
            assert info.value.code == 1000


async def test_handshake_deadline_on_the_virtual_clock(autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(GUARD * 10):  # virtual seconds
        async with memory_ws_pair() as (client_ws, server_ws):
            start = trio.current_time()
            with pytest.raises(PeerDisconnected, match="handshake timed out"):
                await establish_session(server_ws, Role.RESPONDER, BOB, CLAN, always, timeout=20)
            assert trio.current_time() - start == pytest.approx(20)
            with pytest.raises(ConnectionClosed) as closed:
                await client_ws.get_message()
            assert closed.value.reason.code == CLOSE_POLICY_VIOLATION
            assert closed.value.reason.reason == "handshake timed out"
