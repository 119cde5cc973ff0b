"""This machine's own addresses and multicast-capable interfaces.

Owns: listing the global-scope addresses of interfaces that are up (via
pyroute2, never by running `ip`).  Must never: advertise loopback,
link-local or overlay addresses (the caller excludes the overlay interface); it is blocking (call it in a
worker thread).
"""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct

__all__ = ["local_addresses", "multicast_interfaces"]


def local_addresses(exclude_ifaces: frozenset[str] = frozenset()) -> list[str]:
    """Global-scope unicast addresses of up, non-loopback interfaces (strings)."""
    from pyroute2 import IPRoute

    out: list[str] = []
    with IPRoute() as ipr:
        up = {}
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            flags = link["flags"]
            up[link["index"]] = (name, bool(flags & 1) and not flags & 8)  # IFF_UP, !LOOPBACK
        for msg in ipr.get_addr():
            name, usable = up.get(msg["index"], ("", False))
            if not usable or name in exclude_ifaces or msg["scope"] != 0:  # RT_SCOPE_UNIVERSE
                continue
            addr = msg.get_attr("IFA_ADDRESS")
            if not addr:
                continue
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                continue
            out.append(str(ip))
    return sorted(set(out))


def multicast_interfaces() -> list[str]:
    """Names of interfaces in *this* network namespace that are up, multicast-capable, not loopback.

    Uses SIOCGIFFLAGS rather than /sys/class/net, which shows the namespace
    /sys was mounted in, not necessarily ours.
    """
    siocgifflags, iff_up, iff_loopback, iff_multicast = 0x8913, 0x1, 0x8, 0x1000
    names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("16sH14x", name.encode()[:15], 0)
                flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), siocgifflags, req))[1]
            except OSError:
                continue
            if flags & iff_up and flags & iff_multicast and not flags & iff_loopback:
                names.append(name)
    return sorted(names)
