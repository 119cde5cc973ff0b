"""Link, address, route and policy-rule plumbing over rtnetlink, via pyroute2.

Owns: idempotent helpers over rtnetlink (pyroute2 `IPRoute`, optionally in a
named network namespace) for the things both WireGuard backends need once
the interface exists: find it, set it up/down, add/remove its overlay
addresses, add/remove the route for the overlay prefix; and for the VM taps
(vmhost/network.py): create/remove a persistent tap, replace a route, add and
remove IPv6 policy rules. Each has a blocking `*_sync` form and an async form
that runs it in `trio.to_thread` so the event loop never waits on netlink.

Must never: shell out to `ip`, create a network namespace as a side effect
of a lookup (we open namespaces with flags=0, so a missing one is an error),
or touch a link other than the one named by the caller.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
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
    "Rule6",
    "ensure_tap_sync",
    "remove_link_sync",
    "replace_route_sync",
    "ensure_rule_sync",
    "remove_rule_sync",
    "ensure_tap",
    "remove_link",
    "replace_route",
    "ensure_rule",
    "remove_rule",
]

T = TypeVar("T")

IFF_UP = 0x1
IFA_F_NODAD = 0x02  # linux/if_addr.h (0x80 is IFA_F_PERMANENT)
RT_TABLE_MAIN = 254


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
                **({"flags": IFA_F_NODAD} if want.version == 6 else {}),
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


# -- taps and policy rules (vmhost/network.py) -----------------------------------------


def ensure_tap_sync(ifname: str, netns: str | None = None) -> bool:
    """Create a persistent tap IFNAME (no packet-info header) and set it up.

    False if it existed already (it is set up all the same). A VMM attaches
    to it by name later, in the same namespace."""
    with open_ipr(netns) as ipr:
        created = False
        if not ipr.link_lookup(ifname=ifname):
            try:
                # pyroute2 creates a tap with the TUNSETIFF ioctl (rtnetlink
                # cannot), in a child process when a namespace is named.
                ipr.link("add", ifname=ifname, kind="tuntap", mode="tap", ifr={"no_pi": True})
            except (NetlinkError, OSError) as e:
                raise NetlinkHelperError(f"create tap {ifname}: {e}") from None
            created = True
        ipr.link("set", index=_index(ipr, ifname), state="up")
    return created


def remove_link_sync(ifname: str, netns: str | None = None) -> bool:
    """Delete the link IFNAME; False if there was none."""
    with open_ipr(netns) as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return False
            raise NetlinkHelperError(f"remove link {ifname}: {e}") from None
    return True


def replace_route_sync(ifname: str, prefix: str, netns: str | None = None) -> None:
    """Route PREFIX via IFNAME, replacing any route to exactly PREFIX."""
    net = _net(prefix)
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    with open_ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        try:
            ipr.route("replace", dst=str(net), oif=idx, family=family)
        except NetlinkError as e:
            raise NetlinkHelperError(f"route {prefix} via {ifname}: {e}") from None


@dataclass(frozen=True)
class Rule6:
    """One IPv6 policy rule: match (iif, from, to) at `priority`, then look
    up the main table, or drop (`blackhole`). Empty fields match anything."""

    priority: int
    iif: str = ""
    src: str = ""  # a prefix, "addr/len"
    dst: str = ""
    blackhole: bool = False

    def _kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"family": socket.AF_INET6, "priority": self.priority}
        if self.iif:
            kw["iifname"] = self.iif
        for name, prefix in (("src", self.src), ("dst", self.dst)):
            if prefix:
                net = _net(prefix)
                if net.version != 6:
                    raise NetlinkHelperError(f"{prefix!r}: not an IPv6 prefix")
                kw[name], kw[f"{name}_len"] = str(net.network_address), net.prefixlen
        if self.blackhole:
            kw["action"] = "blackhole"
        else:
            kw["table"] = RT_TABLE_MAIN
        return kw


def ensure_rule_sync(rule: Rule6, netns: str | None = None) -> bool:
    """Add RULE; False if an identical rule was there already."""
    with open_ipr(netns) as ipr:
        try:
            # pyroute2 asks with NLM_F_EXCL, so the kernel refuses a duplicate
            # (EEXIST) instead of stacking a second copy as `ip rule add` does.
            ipr.rule("add", **rule._kwargs())
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                return False
            raise NetlinkHelperError(f"add rule {rule}: {e}") from None
    return True


def remove_rule_sync(rule: Rule6, netns: str | None = None, most: int = 16) -> int:
    """Remove every copy of RULE (up to `most`; `ip rule add` stacks duplicates)."""
    removed = 0
    with open_ipr(netns) as ipr:
        while removed < most:
            try:
                ipr.rule("del", **rule._kwargs())
            except NetlinkError as e:
                if e.code in (errno.ENOENT, errno.ESRCH):
                    break
                raise NetlinkHelperError(f"remove rule {rule}: {e}") from None
            removed += 1
    return removed


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


async def ensure_tap(ifname: str, netns: str | None = None) -> bool:
    return await _run(ensure_tap_sync, ifname, netns)


async def remove_link(ifname: str, netns: str | None = None) -> bool:
    return await _run(remove_link_sync, ifname, netns)


async def replace_route(ifname: str, prefix: str, netns: str | None = None) -> None:
    await _run(replace_route_sync, ifname, prefix, netns)


async def ensure_rule(rule: Rule6, netns: str | None = None) -> bool:
    return await _run(ensure_rule_sync, rule, netns)


async def remove_rule(rule: Rule6, netns: str | None = None) -> int:
    return await _run(remove_rule_sync, rule, netns)
