"""SOCKS5 CONNECT (RFC 1928, no authentication) as bytes in and out, sans-IO.

Owns: the greeting, the method choice, the CONNECT request with a domain name
(ATYP 3: names are resolved by the proxy, i.e. tor, never here), the reply
and the meaning of every reply code, and the error types.  Must never: import
trio or do any I/O.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

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


__all__ = [
    "VERSION",
    "NO_AUTH",
    "NO_ACCEPTABLE",
    "CMD_CONNECT",
    "ATYP_IPV4",
    "ATYP_DOMAIN",
    "ATYP_IPV6",
    "MAX_DOMAIN",
    "REPLY_MESSAGES",
    "SocksError",
    "SocksLocalError",
    "SocksRemoteError",
    "SocksReplyError",
    "SocksTimeout",
    "SocksProxyUnreachable",
    "BoundAddress",
    "greeting",
    "parse_method_choice",
    "connect_request",
    "reply_bytes_needed",
    "parse_connect_reply",
]
