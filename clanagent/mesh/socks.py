"""A minimal SOCKS5 client (RFC 1928) for dialling through Tor, in trio.

Owns: the trio shell `open_socks5_stream`, which runs the SOCKS5 CONNECT
exchange on a TCP stream and hands the stream back ready for the
application bytes.  This module does the I/O (it imports trio); the
messages are encoded and decoded by the I/O-free `socks_codec.py`
(re-exported here).

Must never: resolve the destination name locally (it always sends the name
as ATYP=3, "domain", so a `.onion` name, or any name, is resolved by the
proxy and never leaks to the local resolver), read past the proxy's reply
(bytes after it belong to the application), or leave a half-negotiated
stream open after an error or a timeout.
"""

from __future__ import annotations

import trio

from .socks_codec import (  # noqa: F401 (re-exported: the I/O-free core)
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    CMD_CONNECT,
    MAX_DOMAIN,
    NO_ACCEPTABLE,
    NO_AUTH,
    REPLY_MESSAGES,
    VERSION,
    BoundAddress,
    SocksError,
    SocksLocalError,
    SocksProxyUnreachable,
    SocksRemoteError,
    SocksReplyError,
    SocksTimeout,
    connect_request,
    greeting,
    parse_connect_reply,
    parse_method_choice,
    reply_bytes_needed,
)

__all__ = [
    "SocksError",
    "SocksLocalError",
    "SocksRemoteError",
    "SocksReplyError",
    "SocksTimeout",
    "SocksProxyUnreachable",
    "REPLY_MESSAGES",
    "BoundAddress",
    "greeting",
    "parse_method_choice",
    "connect_request",
    "reply_bytes_needed",
    "parse_connect_reply",
    "open_socks5_stream",
]


async def _receive_exactly(stream: trio.SocketStream, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = await stream.receive_some(n - len(buf))
        except trio.BrokenResourceError:
            raise SocksRemoteError(f"{what}: connection to the proxy broke") from None
        if not chunk:
            raise SocksRemoteError(f"{what}: proxy closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def _send(stream: trio.SocketStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except trio.BrokenResourceError:
        raise SocksRemoteError("connection to the proxy broke while sending") from None


async def _negotiate(stream: trio.SocketStream, dest_host: str, dest_port: int) -> BoundAddress:
    # Both messages could be pipelined, but a proxy that wants authentication
    # would then read our CONNECT as garbage; one round trip on loopback is free.
    await _send(stream, greeting())
    parse_method_choice(await _receive_exactly(stream, 2, "method choice"))
    await _send(stream, connect_request(dest_host, dest_port))
    buf = b""
    while need := reply_bytes_needed(buf):
        # Read exactly what the reply still needs: what follows is the peer's.
        buf += await _receive_exactly(stream, need, "connect reply")
    return parse_connect_reply(buf)


async def open_socks5_stream(
    proxy_host: str,
    proxy_port: int,
    dest_host: str,
    dest_port: int,
    *,
    timeout: float,
) -> trio.SocketStream:
    """Connect to `dest_host:dest_port` through the SOCKS5 proxy; the stream is ready for data.

    The whole thing (TCP connect to the proxy and the exchange) runs under
    `timeout` seconds. Errors: SocksLocalError (bad destination),
    SocksProxyUnreachable, SocksReplyError (the proxy refused, with `code`),
    SocksRemoteError (malformed answer), SocksTimeout.
    """
    connect_request(dest_host, dest_port)  # fail on a bad destination before any I/O
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(proxy_host, proxy_port)
        except OSError as exc:
            raise SocksProxyUnreachable(
                f"cannot connect to SOCKS proxy {proxy_host}:{proxy_port}: {exc.strerror or exc}"
            ) from None
        try:
            await _negotiate(stream, dest_host, dest_port)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream
    assert scope.cancelled_caught
    raise SocksTimeout(
        f"SOCKS5 connect to {dest_host}:{dest_port} via {proxy_host}:{proxy_port} "
        f"took longer than {timeout} s"
    )
