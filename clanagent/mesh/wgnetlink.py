"""The kernel WireGuard backend (generic netlink via pyroute2).

Owns: building the WG_CMD_SET_DEVICE / WG_CMD_GET_DEVICE messages for a
`Diff` with pyroute2's `wgmsg` classes (`build_set_messages`,
`build_get_message`, pure), turning GET_DEVICE dump replies into a `Device`
(`parse_device`), and `KernelBackend`: it creates the interface with
rtnetlink kind=wireguard (or adopts the one a previous run of this agent
left: a WireGuard link holding our own private key, or none at all), sends
those messages through a small `Transport`, and on `release` leaves the
interface configured so that an agent restart does not drop a tunnel.
Which backend a machine uses is `wgchoice`.

Must never: set WGDEVICE_F_REPLACE_PEERS (that would drop peers the diff did
not mention for a moment; we remove peers one by one), adopt or destroy an
interface that is not ours (another kind of link, or a WireGuard link with
another private key), or load a kernel module itself (creating the link
lets the kernel autoload it, as `ip link add` does).

Why not pyroute2's `WireGuard.set`: it sends one peer per message and
re-sends device attributes each time; one diff should be one (or a few, when
large) messages, as `wg setconf` does.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable
from socket import AF_INET, AF_INET6, inet_pton
from typing import Protocol

import trio
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_GET_DEVICE,
    WG_CMD_SET_DEVICE,
    WG_GENL_VERSION,
    WGPEER_F_REMOVE_ME,
    WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY,
    wgmsg,
)

from .wireguard import (
    BackendKind,
    Device,
    Diff,
    PeerConfig,
    PeerStatus,
    WireGuardLocalError,
    WireGuardRemoteError,
    normalize_endpoint,
)

__all__ = [
    "PEERS_PER_MESSAGE",
    "build_set_messages",
    "build_get_message",
    "parse_device",
    "Transport",
    "PyrouteTransport",
    "KernelBackend",
]

# wg(8) fills messages up to a page; ~170 bytes per peer with two allowed ips
# keeps 16 peers well under 4 KiB.
PEERS_PER_MESSAGE = 16


def _b64(key: bytes) -> str:
    # pyroute2's key NLA encoder takes base64 text.
    return base64.b64encode(key).decode()


def _allowed_attrs(cidrs: Iterable[str]) -> list[dict]:
    out = []
    for c in cidrs:
        addr, _, mask = c.partition("/")
        family = AF_INET6 if ":" in addr else AF_INET
        out.append(
            {
                "attrs": [
                    ["WGALLOWEDIP_A_FAMILY", family],
                    ["WGALLOWEDIP_A_IPADDR", inet_pton(family, addr)],
                    ["WGALLOWEDIP_A_CIDR_MASK", int(mask)],
                ]
            }
        )
    return out


def _endpoint_attr(endpoint: str) -> list:
    host, _, port = endpoint.rpartition(":")
    return ["WGPEER_A_ENDPOINT", {"addr": host.strip("[]"), "port": int(port)}]


def _peer_attrs(
    key: bytes,
    flags: int,
    endpoint: str | None = None,
    allowed_ips: tuple[str, ...] | None = None,
    keepalive: int | None = None,
) -> dict:
    attrs: list[list] = [["WGPEER_A_PUBLIC_KEY", _b64(key)], ["WGPEER_A_FLAGS", flags]]
    if endpoint is not None:
        attrs.append(_endpoint_attr(endpoint))
    if keepalive is not None:
        attrs.append(["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", keepalive])
    if allowed_ips is not None:
        attrs.append(["WGPEER_A_ALLOWEDIPS", _allowed_attrs(allowed_ips)])
    return {"attrs": attrs}


def build_set_messages(ifname: str, diff: Diff) -> list[wgmsg]:
    """SET_DEVICE messages (header type/flags left to the transport) for DIFF.

    Device attributes go in the first message; peers are chunked by
    PEERS_PER_MESSAGE in the order removals, adds, updates."""
    peers: list[dict] = [_peer_attrs(k, WGPEER_F_REMOVE_ME) for k in diff.remove]
    peers += [
        _peer_attrs(
            p.public_key, WGPEER_F_REPLACE_ALLOWEDIPS, p.endpoint, p.allowed_ips, p.keepalive
        )
        for p in diff.add
    ]
    for u in diff.update:
        flags = WGPEER_F_UPDATE_ONLY
        if u.allowed_ips is not None:
            flags |= WGPEER_F_REPLACE_ALLOWEDIPS
        peers.append(_peer_attrs(u.public_key, flags, u.endpoint, u.allowed_ips, u.keepalive))
    has_device = diff.private_key is not None or diff.listen_port is not None
    if not peers and not has_device:
        return []
    msgs = []
    chunks = [peers[i : i + PEERS_PER_MESSAGE] for i in range(0, len(peers), PEERS_PER_MESSAGE)]
    for i, chunk in enumerate(chunks or [[]]):
        m = wgmsg()
        m["cmd"] = WG_CMD_SET_DEVICE
        m["version"] = WG_GENL_VERSION
        m["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
        if i == 0:
            if diff.private_key is not None:
                m["attrs"].append(["WGDEVICE_A_PRIVATE_KEY", _b64(diff.private_key)])
            if diff.listen_port is not None:
                m["attrs"].append(["WGDEVICE_A_LISTEN_PORT", diff.listen_port])
        if chunk:
            m["attrs"].append(["WGDEVICE_A_PEERS", chunk])
        msgs.append(m)
    return msgs


def build_get_message(ifname: str) -> wgmsg:
    m = wgmsg()
    m["cmd"] = WG_CMD_GET_DEVICE
    m["version"] = WG_GENL_VERSION
    m["attrs"].append(["WGDEVICE_A_IFNAME", ifname])
    return m


def _unb64(value: object, what: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise WireGuardRemoteError(f"netlink reply: {what} is not a key") from None
    if len(raw) != 32:
        raise WireGuardRemoteError(f"netlink reply: {what} is not 32 bytes")
    return raw


def parse_device(msgs: Iterable) -> Device:
    """Merge the (decoded) GET_DEVICE dump messages of one device.

    A large device spans several messages, and one peer's allowed ips may
    continue in the next message under the same public key."""
    private_key = None
    listen_port = 0
    order: list[bytes] = []
    acc: dict[bytes, dict] = {}
    for msg in msgs:
        err = msg["header"].get("error") if "header" in msg else None
        if err is not None:
            raise WireGuardRemoteError(f"netlink GET_DEVICE failed: {err}")
        pk = msg.get_attr("WGDEVICE_A_PRIVATE_KEY")
        if pk is not None:
            private_key = _unb64(pk, "private key")
        lp = msg.get_attr("WGDEVICE_A_LISTEN_PORT")
        if lp is not None:
            listen_port = lp
        for peer in msg.get_attr("WGDEVICE_A_PEERS") or ():
            key = _unb64(peer.get_attr("WGPEER_A_PUBLIC_KEY"), "peer key")
            a = acc.get(key)
            if a is None:
                order.append(key)
                a = acc[key] = {"endpoint": None, "allowed": [], "ka": 0, "st": PeerStatus()}
            ep = peer.get_attr("WGPEER_A_ENDPOINT")
            if ep is not None and ep.get("port"):
                host = ep["addr"]
                a["endpoint"] = normalize_endpoint(
                    f"[{host}]:{ep['port']}" if ":" in host else f"{host}:{ep['port']}"
                )
            ka = peer.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
            if ka is not None:
                a["ka"] = ka
            for aip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                a["allowed"].append(aip["addr"])
            hs = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
            rx = peer.get_attr("WGPEER_A_RX_BYTES")
            tx = peer.get_attr("WGPEER_A_TX_BYTES")
            if hs is not None or rx is not None:
                last = hs["tv_sec"] + hs["tv_nsec"] / 1e9 if hs and hs["tv_sec"] else None
                a["st"] = PeerStatus(last, rx or 0, tx or 0)
    return Device(
        private_key,
        listen_port,
        {
            k: PeerConfig(k, acc[k]["endpoint"], tuple(acc[k]["allowed"]), acc[k]["ka"] or None)
            for k in order
        },
        {k: acc[k]["st"] for k in order},
    )


class Transport(Protocol):
    """Blocking netlink I/O, run in a worker thread by KernelBackend."""

    def link_exists(self, ifname: str) -> bool: ...

    def link_kind(self, ifname: str) -> str | None:
        """The rtnetlink kind of IFNAME ("wireguard", "veth", "" for a TUN), None if absent."""
        ...

    def link_add(self, ifname: str) -> None: ...

    def link_del(self, ifname: str) -> None: ...

    def request(self, msg: wgmsg) -> None: ...

    def dump(self, msg: wgmsg) -> list: ...


class PyrouteTransport:
    """The real transport: pyroute2 IPRoute for the link, WireGuard genl for config."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def _wg(self):
        from pyroute2 import WireGuard

        try:
            if self.netns is None:
                return WireGuard()
            return WireGuard(netns=self.netns, flags=0)
        except Exception as e:  # pyroute2 raises NetlinkError(ENOENT) without the module
            raise WireGuardLocalError(f"no wireguard generic netlink family: {e}") from None

    def link_exists(self, ifname: str) -> bool:
        from .netlink import link_index_sync

        return link_index_sync(ifname, self.netns) is not None

    def link_kind(self, ifname: str) -> str | None:
        from .netlink import open_ipr

        with open_ipr(self.netns) as ipr:
            links = ipr.get_links(ifname=ifname) if ipr.link_lookup(ifname=ifname) else []
            if not links:
                return None
            info = links[0].get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            return kind or ""

    def link_add(self, ifname: str) -> None:
        from .netlink import open_ipr

        with open_ipr(self.netns) as ipr:
            ipr.link("add", ifname=ifname, kind="wireguard")

    def link_del(self, ifname: str) -> None:
        from .netlink import open_ipr

        with open_ipr(self.netns) as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if idx:
                ipr.link("del", index=idx[0])

    def request(self, msg: wgmsg) -> None:
        with self._wg() as wg:
            tuple(wg.nlm_request(msg, msg_type=wg.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))

    def dump(self, msg: wgmsg) -> list:
        with self._wg() as wg:
            return list(wg.nlm_request(msg, msg_type=wg.prid, msg_flags=NLM_F_REQUEST | NLM_F_DUMP))


class KernelBackend:
    """A kernel WireGuard interface that this object creates, owns and destroys."""

    kind: BackendKind = "kernel"

    def __init__(
        self, name: str, *, netns: str | None = None, transport: Transport | None = None
    ) -> None:
        if not name or len(name) > 15 or "/" in name:
            raise WireGuardLocalError(f"interface name {name!r}: 1-15 chars, no '/'")
        self.name = name
        self.netns = netns
        self.transport: Transport = transport or PyrouteTransport(netns)
        self._owned = False
        self.adopted = False  # True when open() found our interface from a previous run

    @property
    def owned(self) -> bool:
        return self._owned

    async def _thread(self, fn: Callable, *args):
        return await trio.to_thread.run_sync(fn, *args)

    async def create(self) -> None:
        if self._owned:
            raise WireGuardLocalError(f"{self.name}: already created by this backend")
        if await self._thread(self.transport.link_exists, self.name):
            raise WireGuardLocalError(
                f"{self.name}: an interface of that name exists already; "
                "refusing to touch an interface we did not create"
            )
        await self._thread(self.transport.link_add, self.name)
        self._owned = True

    async def open(self, private_key: bytes) -> str:
        """Create the interface, or adopt the one a previous run of this agent
        left (so a restart keeps every tunnel up): "created" or "adopted".

        Ours means a WireGuard link whose private key is PRIVATE_KEY, or one
        with no key and no peers (we created it and stopped before the first
        reconcile). Anything else of that name is refused."""
        if self._owned:
            raise WireGuardLocalError(f"{self.name}: already created by this backend")
        kind = await self._thread(self.transport.link_kind, self.name)
        if kind is None:
            await self.create()
            return "created"
        if kind != "wireguard":
            raise WireGuardLocalError(
                f"{self.name}: an interface of that name exists already "
                f"(kind {kind or 'tun'}); refusing to touch an interface we did not create"
            )
        dev = parse_device(await self._thread(self.transport.dump, build_get_message(self.name)))
        unkeyed = dev.private_key in (None, bytes(32)) and not dev.peers
        if dev.private_key != private_key and not unkeyed:
            raise WireGuardLocalError(
                f"{self.name}: a WireGuard interface of that name exists already with "
                "another private key; refusing to touch an interface we did not create"
            )
        self._owned = True
        self.adopted = True
        return "adopted"

    async def release(self) -> None:
        """The agent stops: leave the interface and its peers as they are (the
        kernel keeps forwarding; the next start adopts it) and forget it."""
        self._owned = False

    async def remove_leftover(self, private_key: bytes) -> bool:
        """The agent starts without a mesh (WireGuard turned off, or not in a
        clan): delete the interface a previous run left, if it is ours by the
        same rule as `open` (our private key, or unkeyed and empty).  True
        when one was deleted; anything else of that name is left alone."""
        if self._owned:
            raise WireGuardLocalError(f"{self.name}: in use by this backend")
        kind = await self._thread(self.transport.link_kind, self.name)
        if kind != "wireguard":
            return False
        dev = parse_device(await self._thread(self.transport.dump, build_get_message(self.name)))
        unkeyed = dev.private_key in (None, bytes(32)) and not dev.peers
        if dev.private_key != private_key and not unkeyed:
            return False
        await self._thread(self.transport.link_del, self.name)
        return True

    async def destroy(self) -> None:
        if not self._owned:
            raise WireGuardLocalError(
                f"{self.name}: not created by this backend; refusing to destroy it"
            )
        await self._thread(self.transport.link_del, self.name)
        self._owned = False

    async def get(self) -> Device:
        if not self._owned:
            raise WireGuardLocalError(f"{self.name}: not created by this backend")
        return parse_device(await self._thread(self.transport.dump, build_get_message(self.name)))

    async def apply(self, diff: Diff) -> None:
        if not self._owned:
            raise WireGuardLocalError(f"{self.name}: not created by this backend")
        for msg in build_set_messages(self.name, diff):
            await self._thread(self.transport.request, msg)
