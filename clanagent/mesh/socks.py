"""A minimal SOCKS5 client (RFC 1928) for dialling through Tor, in trio.

Owns: the SOCKS5 CONNECT exchange with no authentication -- pure encoders
and decoders for its messages (no I/O, testable byte by byte) and one trio
shell, `open_socks5_stream`, that runs the exchange on a TCP stream and
hands the stream back ready for the application bytes.

Must never: resolve the destination name locally (it always sends the name
as ATYP=3, "domain", so a `.onion` name, or any name, is resolved by the
proxy and never leaks to the local resolver), read past the proxy's reply
(bytes after it belong to the application), or leave a half-negotiated
stream open after an error or a timeout.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

import trio

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

VERSION = 5
NO_AUTH = 0x00
NO_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04
MAX_DOMAIN = 255  # the length travels in one byte

# RFC 1928 section 6, then Tor's extended codes (sent when the SocksPort has
# the ExtendedErrors flag; see tor's socks-extensions.txt). Why keep Tor's:
# "descriptor not found" and "intro failed" need different handling
# (retry later vs. the peer is gone) and the message ends up in status.
REPLY_MESSAGES: dict[int, str] = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
    0xF0: "onion service descriptor can not be found",
    0xF1: "onion service descriptor is invalid",
    0xF2: "onion service introduction failed",
    0xF3: "onion service rendezvous failed",
    0xF4: "onion service missing client authorization",
    0xF5: "onion service wrong client authorization",
    0xF6: "onion service invalid address",
    0xF7: "onion service introduction timed out",
}


class SocksError(Exception):
    """Base of every error this module raises on purpose."""


class SocksLocalError(SocksError):
    """We asked for something SOCKS5 cannot carry (a name over 255 bytes, a bad port)."""


class SocksRemoteError(SocksError):
    """The proxy answered with something that is not valid SOCKS5, or closed mid-exchange."""


class SocksReplyError(SocksRemoteError):
    """The proxy answered a well-formed refusal; `code` is the SOCKS5 reply code."""

    def __init__(self, code: int) -> None:
        self.code = code
        msg = REPLY_MESSAGES.get(code, "unassigned reply code")
        super().__init__(f"SOCKS5 reply 0x{code:02x}: {msg}")


class SocksTimeout(SocksError):
    """Connecting to the proxy plus the SOCKS5 exchange took longer than `timeout`."""


class SocksProxyUnreachable(SocksError):
    """The TCP connection to the proxy itself failed (proxy not running?)."""


@dataclass(frozen=True, slots=True)
class BoundAddress:
    """BND.ADDR/BND.PORT of a successful reply (Tor sends 0.0.0.0:0; kept for completeness)."""

    host: str
    port: int


# ---- sans-IO encoders and decoders ----


def greeting() -> bytes:
    """The client's method selection message: version 5, one method, "no authentication"."""
    return bytes([VERSION, 1, NO_AUTH])


def parse_method_choice(data: bytes) -> None:
    """Check the proxy's 2-byte method choice; SocksRemoteError unless it chose "no auth"."""
    if len(data) != 2:
        raise SocksRemoteError(f"method choice: expected 2 bytes, got {len(data)}")
    if data[0] != VERSION:
        raise SocksRemoteError(f"method choice: version {data[0]}, expected 5")
    if data[1] == NO_ACCEPTABLE:
        raise SocksRemoteError("proxy accepts none of our methods (it wants authentication)")
    if data[1] != NO_AUTH:
        raise SocksRemoteError(f"proxy chose method 0x{data[1]:02x}, which we did not offer")


def connect_request(host: str, port: int) -> bytes:
    """A CONNECT request for `host:port`, the host always sent as a domain name (ATYP=3)."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise SocksLocalError(f"destination port {port!r}: expected 1..65535")
    try:
        name = host.encode("idna") if not host.isascii() else host.encode("ascii")
    except UnicodeError:
        raise SocksLocalError(f"destination host {host!r}: not encodable as a name") from None
    if not 0 < len(name) <= MAX_DOMAIN:
        raise SocksLocalError(f"destination host: {len(name)} bytes, expected 1..{MAX_DOMAIN}")
    return bytes([VERSION, CMD_CONNECT, 0, ATYP_DOMAIN, len(name)]) + name + struct.pack(">H", port)


def reply_bytes_needed(buf: bytes) -> int:
    """How many more bytes the CONNECT reply in `buf` needs (0: complete).

    Raises SocksReplyError as soon as the reply code says "refused" (the rest
    of a refusal carries nothing we need, and some proxies close right
    after it), SocksRemoteError for a malformed reply.
    """
    if len(buf) < 2:
        return 2 - len(buf)
    if buf[0] != VERSION:
        raise SocksRemoteError(f"reply: version {buf[0]}, expected 5")
    if buf[1] != 0:
        raise SocksReplyError(buf[1])
    if len(buf) < 5:
        return 5 - len(buf)
    if buf[2] != 0:
        raise SocksRemoteError("reply: reserved byte is not zero")
    atyp = buf[3]
    if atyp == ATYP_IPV4:
        total = 4 + 4 + 2
    elif atyp == ATYP_IPV6:
        total = 4 + 16 + 2
    elif atyp == ATYP_DOMAIN:
        total = 4 + 1 + buf[4] + 2
    else:
        raise SocksRemoteError(f"reply: unknown address type {atyp}")
    if len(buf) > total:
        # Only reachable when a caller over-reads; the shell never does.
        raise SocksRemoteError("reply: longer than its address type allows")
    return total - len(buf)


def parse_connect_reply(buf: bytes) -> BoundAddress:
    """Decode a complete successful CONNECT reply (as sized by `reply_bytes_needed`)."""
    if reply_bytes_needed(buf) != 0:
        raise SocksRemoteError("reply: incomplete")
    atyp = buf[3]
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(buf[4:8]))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(buf[4:20]))
    else:
        host = buf[5 : 5 + buf[4]].decode("ascii", errors="replace")
    (port,) = struct.unpack(">H", buf[-2:])
    return BoundAddress(host, port)


# ---- trio shell ----


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
