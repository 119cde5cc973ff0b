"""The unix-socket HTTP client: request framing, the bounded parser, and every failure kind.

Servers here are raw trio listeners that send exactly the bytes a test wants,
so malformed, oversized and silent servers are as easy as good ones.  Tests
where time matters run on MockClock(autojump_threshold=0); each has a
fail_after guard.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from clanagent.vmhost.http_unix import (
    ApiConnectError,
    ApiError,
    ApiLocalError,
    ApiProtocolError,
    ApiStatusError,
    ApiTimeout,
    HttpLimits,
    Response,
    build_request,
    fault_message,
    parse_response,
    request,
)
from clanagent.vmhost.spec import VmHostLocalError, VmHostRemoteError


@pytest.fixture
def sockdir():
    # tmp_path can exceed the 107-byte sun_path limit; /tmp stays short.
    d = tempfile.mkdtemp(prefix="vmh-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def listen_unix(path: str) -> trio.SocketListener:
    """Bind synchronously: trio's async bind uses a thread for AF_UNIX paths, and
    a MockClock with autojump would leap over every deadline while it runs."""
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    raw.bind(path)
    raw.listen(16)
    return trio.SocketListener(trio.socket.from_stdlib_socket(raw))


async def _read_request(stream: trio.SocketStream) -> bytes:
    """Everything up to the end of the request (headers + Content-Length body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return buf
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += await stream.receive_some(4096)
    return buf


async def serve_raw(path, reply, *, task_status=trio.TASK_STATUS_IGNORED):
    """Serve ``reply(request_bytes) -> bytes | None`` (None: never answer).

    After answering, the connection stays open until the client closes it,
    like Firecracker's keep-alive server: the client must not wait for EOF.
    """
    listener = listen_unix(path)
    seen: list[bytes] = []

    async def handle(stream):
        async with stream:
            req = await _read_request(stream)
            seen.append(req)
            out = reply(req)
            if out is None:
                await trio.sleep_forever()
            try:
                await stream.send_all(out)
                while await stream.receive_some(4096):
                    pass
            except trio.BrokenResourceError:
                pass

    async with trio.open_nursery() as nursery:
        task_status.started(seen)
        async with listener:
            while True:
                stream = await listener.accept()
                nursery.start_soon(handle, stream)


def http(status: int, body: bytes = b"", *, reason: str = "X", headers: str | None = None) -> bytes:
    if headers is None:
        # Like micro_http (Firecracker's and cloud-hypervisor's server): a length on
        # everything but 204, and a keep-alive connection.
        headers = "Server: Firecracker API\r\nConnection: keep-alive\r\n"
        if status != 204:
            headers += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return f"HTTP/1.1 {status} {reason}\r\n{headers}\r\n".encode() + body


async def test_get_json_and_the_exact_request_bytes(sockdir):
    path = os.path.join(sockdir, "api.sock")
    info = {"app_name": "Firecracker", "state": "Running"}
    body = json.dumps(info).encode()
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            seen = await n.start(serve_raw, path, lambda req: http(200, body))
            assert await request(path, "GET", "/") == (200, info)
            n.cancel_scope.cancel()
    # No body headers on GET: Firecracker's server rejects a bodiless Content-Length.
    assert seen == [b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n"]


async def test_put_sends_compact_json_with_length_and_204_gives_none(sockdir):
    path = os.path.join(sockdir, "api.sock")
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            seen = await n.start(serve_raw, path, lambda req: http(204))
            result = await request(path, "PUT", "/machine-config", {"vcpu_count": 2})
            empty = await request(path, "PUT", "/api/v1/vm.boot")
            n.cancel_scope.cancel()
    assert result == (204, None) and empty == (204, None)
    head, _, body = seen[0].partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"PUT /machine-config HTTP/1.1",
        b"Host: localhost",
        b"Accept: application/json",
        b"Content-Type: application/json",
        b"Content-Length: 16",
    ]
    assert body == b'{"vcpu_count":2}'
    assert b"Content-Length: 0\r\n" in seen[1]


@pytest.mark.parametrize(
    ("status", "body", "fault"),
    [
        (400, b'{"fault_message":"Invalid kernel path: /nope"}', "Invalid kernel path: /nope"),
        (
            500,
            b'["Error from API","The VM could not boot","VM is not created"]',
            "Error from API: The VM could not boot: VM is not created",
        ),
        (404, b"Not Found", "Not Found"),  # older cloud-hypervisor: plain text
        (405, b"", "(empty body)"),
    ],
)
async def test_non_2xx_raises_status_error_with_the_api_message(sockdir, status, body, fault):
    path = os.path.join(sockdir, "api.sock")
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(serve_raw, path, lambda req: http(status, body))
            with pytest.raises(ApiStatusError) as info:
                await request(path, "PUT", "/boot-source", {"kernel_image_path": "/nope"})
            n.cancel_scope.cancel()
    err = info.value
    assert (err.status, err.fault, err.method, err.path) == (status, fault, "PUT", "/boot-source")
    assert fault in str(err) and str(status) in str(err)
    assert isinstance(err, VmHostRemoteError)


def test_a_server_that_never_answers_times_out():
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main():
        d = tempfile.mkdtemp(prefix="vmh-", dir="/tmp")
        try:
            path = os.path.join(d, "api.sock")
            with trio.fail_after(60):
                async with trio.open_nursery() as n:
                    await n.start(serve_raw, path, lambda req: None)
                    start = trio.current_time()
                    with pytest.raises(ApiTimeout, match="no response within 2s"):
                        await request(path, "GET", "/", timeout=2.0)
                    assert trio.current_time() - start == pytest.approx(2.0)
                    n.cancel_scope.cancel()
        finally:
            shutil.rmtree(d, ignore_errors=True)

    trio.run(main, clock=clock)


async def test_nobody_listening_is_a_connect_error(sockdir):
    path = os.path.join(sockdir, "api.sock")
    with trio.fail_after(10):
        with pytest.raises(ApiConnectError, match="cannot connect"):
            await request(path, "GET", "/")
        # A socket file left by a dead server refuses connections.
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        sock.close()
        with pytest.raises(ApiConnectError):
            await request(path, "GET", "/")


SMALL = HttpLimits(max_header_bytes=1024, max_headers=8, max_body_bytes=4096)


def _no_length_flood(req: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 10_000


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (lambda r: b"", "before the response headers ended"),
        (lambda r: b"SSH-2.0-OpenSSH\r\n\r\n", "bad status line"),
        (lambda r: b"HTTP/1.1 2000 OK\r\n\r\n", "bad status line"),
        (lambda r: b"HTTP/1.1 100 Continue\r\n\r\n", "informational"),
        (lambda r: b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 500, "headers exceed"),
        (lambda r: b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 9 + b"\r\n", "more than 8"),
        (lambda r: b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", "bad header line"),
        (lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\n", "exceeds the limit"),
        (lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad content-length"),
        (lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "before the response body"),
        (
            lambda r: b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "conflicting",
        ),
        (lambda r: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "transfer-encoding"),
        (_no_length_flood, "exceeds"),
        (lambda r: http(200, b"{not json"), "not JSON"),
        (lambda r: http(200, b"\xff\xfe"), "not JSON"),
    ],
)
async def test_malformed_responses_are_protocol_errors(sockdir, reply, match):
    path = os.path.join(sockdir, "api.sock")

    def once(req):
        out = reply(req)
        return out

    async def serve_and_close(*, task_status=trio.TASK_STATUS_IGNORED):
        # Unlike serve_raw, close right after sending: EOF is part of these cases.
        listener = listen_unix(path)
        task_status.started()
        async with listener:
            while True:
                stream = await listener.accept()
                async with stream:
                    req = await _read_request(stream)
                    try:
                        await stream.send_all(once(req))
                    except trio.BrokenResourceError:
                        pass

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(serve_and_close)
            with pytest.raises(ApiProtocolError, match=match):
                await request(path, "GET", "/", limits=SMALL)
            n.cancel_scope.cancel()


async def test_body_without_length_runs_to_eof(sockdir):
    path = os.path.join(sockdir, "api.sock")

    async def serve_once(*, task_status=trio.TASK_STATUS_IGNORED):
        listener = listen_unix(path)
        task_status.started()
        async with listener:
            stream = await listener.accept()
            async with stream:
                await _read_request(stream)
                await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\n[1, ")
                await trio.sleep(0.01)
                await stream.send_all(b"2]")

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(serve_once)
            assert await request(path, "GET", "/x") == (200, [1, 2])


def test_build_request_refuses_what_it_cannot_send():
    with pytest.raises(ApiLocalError, match="method"):
        build_request("DELETE", "/")
    for bad in ("", "relative", "/a b", "/a\r\nX: y", "/a?b"):
        with pytest.raises(ApiLocalError, match="path"):
            build_request("GET", bad)
    with pytest.raises(ApiLocalError, match="not JSON"):
        build_request("PUT", "/x", {"a": object()})
    with pytest.raises(ApiLocalError, match="not JSON"):
        build_request("PUT", "/x", {"a": float("nan")})
    assert issubclass(ApiLocalError, VmHostLocalError)


def test_parser_needs_more_then_completes_at_every_split():
    raw = b'HTTP/1.1 200 OK\r\nServer: Firecracker API\r\nContent-Length: 9\r\n\r\n{"a": 1}\n'
    want = Response(
        200, "OK", (("server", "Firecracker API"), ("content-length", "9")), b'{"a": 1}\n'
    )
    for cut in range(len(raw)):
        assert parse_response(raw[:cut], eof=False) is None
    assert parse_response(raw, eof=False) == want
    assert parse_response(raw + b"trailing junk", eof=True) == want


def test_parser_204_has_no_body_even_with_bytes_after_it():
    assert parse_response(b"HTTP/1.1 204 \r\n\r\n", eof=False) == Response(204, "", (), b"")
    assert parse_response(b"HTTP/1.1 204 No Content\r\n\r\nxx", eof=True).body == b""


def test_fault_message_is_bounded_and_shaped():
    long = json.dumps({"fault_message": "x" * 2000}).encode()
    msg = fault_message(long, limit=50)
    assert msg == "x" * 50 + "..."
    assert fault_message(b'{"other": 1}') == '{"other": 1}'
    assert fault_message(b"  \n") == "(empty body)"


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=3000), eof=st.booleans())
def test_parser_any_bytes_gives_a_response_none_or_our_error(data, eof):
    try:
        out = parse_response(data, eof=eof, limits=SMALL)
    except ApiProtocolError:
        return
    if out is None:
        assert not eof
    else:
        assert isinstance(out, Response) and 200 <= out.status <= 599
        assert len(out.body) <= SMALL.max_body_bytes


_header_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).filter(
    lambda n: n not in ("content-length", "transfer-encoding")
)


@settings(max_examples=200, deadline=None)
@given(
    status=st.integers(200, 599),
    body=st.binary(max_size=500),
    headers=st.lists(st.tuples(_header_name, st.text("abc xyz/.", max_size=20)), max_size=5),
    cut=st.integers(0, 2000),
)
def test_parser_round_trips_well_formed_responses(status, body, headers, cut):
    if status in (204, 304):
        body = b""  # these end at the blank line, whatever a length header says
    head = f"HTTP/1.1 {status} Reason\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    raw = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    cut = min(cut, len(raw) - 1)
    assert parse_response(raw[:cut], eof=False) is None
    out = parse_response(raw, eof=False)
    assert (out.status, out.body) == (status, body)
    assert out.headers[: len(headers)] == tuple((n, v.strip(" \t")) for n, v in headers)


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300))
def test_fault_message_never_raises(data):
    assert isinstance(fault_message(data), str)


def test_every_error_is_an_api_error():
    for cls in (ApiConnectError, ApiTimeout, ApiProtocolError, ApiStatusError, ApiLocalError):
        assert issubclass(cls, ApiError)
