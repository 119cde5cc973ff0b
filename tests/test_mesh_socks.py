"""SOCKS5 client: the pure codec byte by byte, and the trio shell against a tiny
SOCKS5 server on loopback (success, every reply code, malformed answers, a
proxy that hangs).  Real sockets, so the real clock; every test has a
fail_after guard."""

from __future__ import annotations

import struct
import time
from functools import partial

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from clanagent.mesh.socks import (
    REPLY_MESSAGES,
    BoundAddress,
    SocksLocalError,
    SocksProxyUnreachable,
    SocksRemoteError,
    SocksReplyError,
    SocksTimeout,
    connect_request,
    greeting,
    open_socks5_stream,
    parse_connect_reply,
    parse_method_choice,
    reply_bytes_needed,
)

GUARD = 10
ONION = "a" * 56 + ".onion"
OK_V4 = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x1f\x90"  # bound 127.0.0.1:8080


# ---- codec ----


def test_greeting_offers_only_no_auth():
    assert greeting() == b"\x05\x01\x00"


def test_connect_request_sends_a_domain_name():
    req = connect_request(ONION, 80)
    assert req[:5] == bytes([5, 1, 0, 3, 62])
    assert req[5:-2] == ONION.encode()
    assert req[-2:] == b"\x00\x50"


def test_connect_request_sends_ip_literals_as_names_too():
    # The proxy resolves/parses; we never turn a name into ATYP 1/4 ourselves.
    assert connect_request("127.0.0.1", 1)[3] == 3


@pytest.mark.parametrize("host", ["", "x" * 256])
def test_connect_request_rejects_bad_names(host):
    with pytest.raises(SocksLocalError):
        connect_request(host, 80)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_connect_request_rejects_bad_ports(port):
    with pytest.raises(SocksLocalError):
        connect_request("example.org", port)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"\x04\x00", "version"),
        (b"\x05\xff", "authentication"),
        (b"\x05\x02", "did not offer"),
        (b"\x05", "2 bytes"),
    ],
)
def test_method_choice_errors(data, match):
    with pytest.raises(SocksRemoteError, match=match):
        parse_method_choice(data)


def test_reply_sizes_follow_the_address_type():
    assert reply_bytes_needed(b"") == 2
    assert reply_bytes_needed(b"\x05\x00") == 3
    assert reply_bytes_needed(b"\x05\x00\x00\x01\x00") == 5
    assert reply_bytes_needed(b"\x05\x00\x00\x04\x00") == 17
    assert reply_bytes_needed(b"\x05\x00\x00\x03\x03") == 5  # 3 name bytes + port
    assert reply_bytes_needed(OK_V4) == 0


def test_parse_replies_of_each_address_type():
    assert parse_connect_reply(OK_V4) == BoundAddress("127.0.0.1", 8080)
    v6 = b"\x05\x00\x00\x04" + bytes(15) + b"\x01" + b"\x00\x16"
    assert parse_connect_reply(v6) == BoundAddress("::1", 22)
    dom = b"\x05\x00\x00\x03\x03abc\x00\x01"
    assert parse_connect_reply(dom) == BoundAddress("abc", 1)


@pytest.mark.parametrize("code", sorted(REPLY_MESSAGES) + [0x09, 0x80])
def test_each_reply_code_is_a_reply_error(code):
    with pytest.raises(SocksReplyError) as ei:
        reply_bytes_needed(bytes([5, code]))
    assert ei.value.code == code
    assert f"0x{code:02x}" in str(ei.value)
    assert REPLY_MESSAGES.get(code, "unassigned") in str(ei.value)


@pytest.mark.parametrize(
    "buf,match",
    [
        (b"\x04\x00", "version"),
        (b"\x05\x00\x01\x01\x00", "reserved"),
        (b"\x05\x00\x00\x09\x00", "address type"),
        (OK_V4 + b"x", "longer"),
    ],
)
def test_malformed_replies(buf, match):
    with pytest.raises(SocksRemoteError, match=match):
        reply_bytes_needed(buf)


@given(st.binary(max_size=300))
def test_reply_decoder_never_raises_anything_else(buf):
    try:
        need = reply_bytes_needed(buf)
    except SocksRemoteError:
        return
    assert need >= 0
    if need == 0:
        assert isinstance(parse_connect_reply(buf), BoundAddress)
    else:
        with pytest.raises(SocksRemoteError):
            parse_connect_reply(buf)


@given(st.binary(max_size=4))
def test_method_choice_decoder_never_raises_anything_else(buf):
    try:
        parse_method_choice(buf)
    except SocksRemoteError:
        return
    assert buf == b"\x05\x00"


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-", min_size=1, max_size=255),
    st.integers(1, 65535),
)
def test_connect_request_roundtrip(host, port):
    req = connect_request(host, port)
    assert req[4] == len(host)
    assert req[5 : 5 + req[4]].decode() == host
    assert struct.unpack(">H", req[-2:])[0] == port


# ---- the trio shell against a tiny SOCKS5 server ----


async def _read(stream, n):
    buf = b""
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


async def _read_request(stream):
    """Read greeting + CONNECT; return (host, port)."""
    assert await _read(stream, 3) == b"\x05\x01\x00"
    await stream.send_all(b"\x05\x00")
    head = await _read(stream, 5)
    assert head[:4] == b"\x05\x01\x00\x03"
    host = (await _read(stream, head[4])).decode()
    (port,) = struct.unpack(">H", await _read(stream, 2))
    return host, port


async def _serve(nursery, handler):
    async def guarded(stream):
        # The client may hang up first (that is what several tests do).
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, EOFError):
            pass

    listeners = await nursery.start(partial(trio.serve_tcp, guarded, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1]


async def test_success_then_application_bytes_flow():
    seen = []

    async def handler(stream):
        seen.append(await _read_request(stream))
        # The reply and the first application bytes in one segment: the client
        # must not swallow the latter.
        await stream.send_all(OK_V4 + b"hello")
        data = await stream.receive_some(100)
        await stream.send_all(data.upper())

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, handler)
            stream = await open_socks5_stream("127.0.0.1", port, ONION, 4242, timeout=5)
            assert await _read(stream, 5) == b"hello"
            await stream.send_all(b"ping")
            assert await _read(stream, 4) == b"PING"
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert seen == [(ONION, 4242)]


async def test_success_with_a_domain_bound_address_sent_byte_by_byte():
    async def handler(stream):
        await _read_request(stream)
        for b in b"\x05\x00\x00\x03\x04host\x00\x07" + b"!":
            await stream.send_all(bytes([b]))
            await trio.sleep(0.001)

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, handler)
            stream = await open_socks5_stream("127.0.0.1", port, "peer.onion", 1, timeout=5)
            assert await _read(stream, 1) == b"!"
            await stream.aclose()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("code", sorted(REPLY_MESSAGES))
async def test_each_refusal_code_reaches_the_caller(code):
    async def handler(stream):
        await _read_request(stream)
        await stream.send_all(bytes([5, code, 0, 1, 0, 0, 0, 0, 0, 0]))

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, handler)
            with pytest.raises(SocksReplyError) as ei:
                await open_socks5_stream("127.0.0.1", port, ONION, 80, timeout=5)
            assert ei.value.code == code
            assert REPLY_MESSAGES[code] in str(ei.value)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "method,reply,match",
    [
        (b"\x05\xff", None, "authentication"),  # wants a method we do not have
        (b"\x04\x00", None, "version"),  # SOCKS4 server
        (b"\x05", None, "closed after 1 of 2"),  # closes mid method choice
        (b"\x05\x00", b"\x05\x00\x00\x07\x00", "address type"),
        (b"\x05\x00", b"\x05\x00\x00\x01\x7f\x00", "closed after 1 of 5"),  # closes mid reply
        (b"\x05\x00", b"HTTP/1.1 400", "version"),  # not a SOCKS server at all
    ],
)
async def test_malformed_answers(method, reply, match):
    async def handler(stream):
        await _read(stream, 3)
        await stream.send_all(method)
        if reply is not None:
            await _read(stream, 5 + len(ONION) + 2)  # the CONNECT request
            await stream.send_all(reply)
        await stream.aclose()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, handler)
            with pytest.raises(SocksRemoteError, match=match):
                await open_socks5_stream("127.0.0.1", port, ONION, 80, timeout=5)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("stage", ["greeting", "connect"])
async def test_a_proxy_that_hangs_times_out(stage):
    async def handler(stream):
        if stage == "connect":
            await _read_request(stream)
        await trio.sleep_forever()

    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            port = await _serve(nursery, handler)
            t0 = time.monotonic()
            with pytest.raises(SocksTimeout, match="longer than 0.3"):
                await open_socks5_stream("127.0.0.1", port, ONION, 80, timeout=0.3)
            assert 0.3 <= time.monotonic() - t0 < 3
            nursery.cancel_scope.cancel()


async def test_proxy_not_listening():
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens on it now
    with trio.fail_after(GUARD), pytest.raises(SocksProxyUnreachable, match=str(port)):
        await open_socks5_stream("127.0.0.1", port, ONION, 80, timeout=5)


async def test_bad_destination_fails_before_any_io():
    # Port 9 on loopback is not a SOCKS proxy; a local error must come first.
    with trio.fail_after(GUARD), pytest.raises(SocksLocalError):
        await open_socks5_stream("127.0.0.1", 9, "x" * 300, 80, timeout=5)
