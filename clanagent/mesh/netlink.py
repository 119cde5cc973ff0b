"""Link, address and route plumbing for the WireGuard interface, via pyroute2.

Owns: idempotent helpers over rtnetlink (pyroute2 `IPRoute`, optionally in a
named network namespace) for the things both WireGuard backends need once
the interface exists: find it, set it up/down, add/remove its overlay
addresses, add/remove the route for the overlay prefix. Each has a blocking
`*_sync` form and an async form that runs it in `trio.to_thread` so the
event loop never waits on netlink.

Must never: shell out to `ip`, create a network namespace as a side effect
of a lookup (we open namespaces with flags=0, so a missing one is an error),
or touch a link other than the one named by the caller.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .wireguard import WireGuardLocalError

__all__ = [
    "NetlinkHelperError",
    "open_ipr",
    "link_index_sync",
    "set_link_state_sync",
    "link_is_up_sync",
    "addresses_sync",
    "ensure_address_sync",
    "remove_address_sync",
    "ensure_route_sync",
    "remove_route_sync",
    "link_index",
    "set_link_state",
    "link_is_up",
    "addresses",
    "ensure_address",
    "remove_address",
    "ensure_route",
    "remove_route",
]

T = TypeVar("T")

IFF_UP = 0x1


class NetlinkHelperError(WireGuardLocalError):
    """A link we were asked about is missing, or the kernel refused a change."""


def open_ipr(netns: str | None = None) -> IPRoute:
    """An rtnetlink socket in the current namespace or in /run/netns/NETNS.

    flags=0: pyroute2's default (O_CREAT) would silently create a missing
    namespace, which would hide a caller's mistake and leak a namespace."""
    if netns is None:
        return IPRoute()
    try:
        return IPRoute(netns=netns, flags=0)
    except (OSError, NetlinkError) as e:
        raise NetlinkHelperError(f"cannot open netns {netns!r}: {e}") from None


def link_index_sync(ifname: str, netns: str | None = None) -> int | None:
    """The interface index of IFNAME, or None if there is no such link."""
    with open_ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlinkHelperError(f"no link named {ifname!r}")
    return found[0]


def set_link_state_sync(ifname: str, up: bool, netns: str | None = None) -> None:
    with open_ipr(netns) as ipr:
        ipr.link("set", index=_index(ipr, ifname), state="up" if up else "down")


def link_is_up_sync(ifname: str, netns: str | None = None) -> bool:
    with open_ipr(netns) as ipr:
        (msg,) = ipr.get_links(_index(ipr, ifname))
    return bool(msg["flags"] & IFF_UP)


def _iface(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError:
        raise NetlinkHelperError(f"{cidr!r}: expected address/prefixlen") from None


def addresses_sync(ifname: str, netns: str | None = None) -> set[str]:
    """Addresses on IFNAME as "addr/prefixlen" (link-local v6 included)."""
    with open_ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        return {
            str(ipaddress.ip_interface(f"{m.get_attr('IFA_ADDRESS')}/{m['prefixlen']}"))
            for m in ipr.get_addr(index=idx)
        }


def ensure_address_sync(ifname: str, cidr: str, netns: str | None = None) -> bool:
    """Add CIDR (e.g. "fd12::1/64") to IFNAME; False if it was there already."""
    want = _iface(cidr)
    with open_ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.addr(
                "add",
                index=idx,
                address=str(want.ip),
                prefixlen=want.network.prefixlen,
                # IPv6 DAD would hold the overlay address "tentative" for ~1 s,
                # and a tunnel has no one to collide with.
                **({"flags": 0x80} if want.version == 6 else {}),  # IFA_F_NODAD
            )
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return False
            raise NetlinkHelperError(f"add {cidr} on {ifname}: {e}") from None
    return True


def remove_address_sync(ifname: str, cidr: str, netns: str | None = None) -> bool:
    """Remove CIDR from IFNAME; False if it was not there."""
    want = _iface(cidr)
    with open_ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.addr("del", index=idx, address=str(want.ip), prefixlen=want.network.prefixlen)
        except NetlinkError as e:
            if e.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                return False
            raise NetlinkHelperError(f"remove {cidr} from {ifname}: {e}") from None
    return True


def ensure_route_sync(ifname: str, prefix: str, netns: str | None = None) -> bool:
    """Route PREFIX (the overlay prefix) via IFNAME; False if it existed."""
    net = _net(prefix)
    with open_ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.route("add", dst=str(net), oif=idx)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return False
            raise NetlinkHelperError(f"route {prefix} via {ifname}: {e}") from None
    return True


def remove_route_sync(ifname: str, prefix: str, netns: str | None = None) -> bool:
    net = _net(prefix)
    with open_ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.route("del", dst=str(net), oif=idx)
        except NetlinkError as e:
            if e.code in (errno.ESRCH, errno.ENOENT):
                return False
            raise NetlinkHelperError(f"remove route {prefix} via {ifname}: {e}") from None
    return True


def _net(prefix: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(prefix, strict=True)
    except ValueError:
        raise NetlinkHelperError(f"{prefix!r}: expected a network prefix") from None


async def _run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    # abandon_on_cancel=False: a netlink change half-way must finish before
    # the caller moves on, or the next reconcile would race it.
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


async def link_index(ifname: str, netns: str | None = None) -> int | None:
    return await _run(link_index_sync, ifname, netns)


async def set_link_state(ifname: str, up: bool, netns: str | None = None) -> None:
    await _run(set_link_state_sync, ifname, up, netns)


async def link_is_up(ifname: str, netns: str | None = None) -> bool:
    return await _run(link_is_up_sync, ifname, netns)


async def addresses(ifname: str, netns: str | None = None) -> set[str]:
    return await _run(addresses_sync, ifname, netns)


async def ensure_address(ifname: str, cidr: str, netns: str | None = None) -> bool:
    return await _run(ensure_address_sync, ifname, cidr, netns)


async def remove_address(ifname: str, cidr: str, netns: str | None = None) -> bool:
    return await _run(remove_address_sync, ifname, cidr, netns)


async def ensure_route(ifname: str, prefix: str, netns: str | None = None) -> bool:
    return await _run(ensure_route_sync, ifname, prefix, netns)


async def remove_route(ifname: str, prefix: str, netns: str | None = None) -> bool:
    return await _run(remove_route_sync, ifname, prefix, netns)
