"""This machine's own addresses, to advertise as LAN paths.

Owns: listing the global-scope addresses of interfaces that are up (via
pyroute2, never by running `ip`).  Must never: advertise loopback,
link-local or overlay addresses (the caller excludes the overlay interface); it is blocking (call it in a
worker thread).
"""

from __future__ import annotations

import ipaddress

__all__ = ["local_addresses"]


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
