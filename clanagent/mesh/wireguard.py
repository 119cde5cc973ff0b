"""WireGuard reconciliation: desired interface vs. what the device has, as a diff.

Owns: the value types that describe a WireGuard interface (`PeerConfig`,
`InterfaceConfig`, `Device`), the smallest `Diff` that turns the configured
device into the desired one (`reconcile`), how the mesh builds its desired
interface (`desired_from`), the "who initiates" rule (`initiator`), the
backend protocol that the kernel (netlink) and userspace (wireguard-go UAPI)
backends implement, and the error kinds they raise.

Must never: do I/O (no trio, no sockets, no pyroute2 here: backends do that),
or produce a diff that touches a peer it was not asked about except to remove
it (the desired config is the full truth for the interface we own).

Responder first (why `initiator` exists): WireGuard drops a handshake
initiation for a peer it does not know yet, and the initiator retries only
after REKEY_TIMEOUT (5 s). So the side that *initiates* (sends a handshake as
soon as it is configured, because it has a persistent keepalive) must be
configured after the side that *responds*. The rule is deterministic on both
ends without any message: the peer with the lower WireGuard public key
(bytewise) is the initiator. Only the initiator gets a keepalive for that
pair (unless we are behind NAT, where every peer keeps the mapping open);
both sides get the endpoint when one is known, because the responder also
needs it to send traffic of its own. When one process configures several
interfaces (tests, a host with VMs), `configure_order` gives the order:
pure responders first.

Endpoint semantics: a desired endpoint of None means "no opinion": the
device learns (roams to) the address the peer's handshakes come from, and
WireGuard has no way to clear an endpoint, so the reconciler leaves it alone.
A keepalive of None means "off" and is reconciled (set to 0) if the device
has one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "WireGuardError",
    "WireGuardLocalError",
    "WireGuardRemoteError",
    "KEY_LEN",
    "KEEPALIVE",
    "PeerConfig",
    "PeerStatus",
    "InterfaceConfig",
    "Device",
    "PeerUpdate",
    "Diff",
    "MeshPeer",
    "reconcile",
    "desired_from",
    "initiator",
    "configure_order",
    "normalize_endpoint",
    "normalize_allowed_ips",
    "Backend",
    "BackendKind",
]

KEY_LEN = 32
# The keepalive WireGuard's own docs recommend for NAT traversal: below
# common UDP NAT mapping timeouts (30 s+), rare enough to be cheap.
KEEPALIVE = 25

BackendKind = Literal["kernel", "userspace"]


class WireGuardError(Exception):
    """Base of every error from the WireGuard part."""


class WireGuardLocalError(WireGuardError):
    """We misused something: bad config value, an interface that is not ours,
    a missing binary or module."""


class WireGuardRemoteError(WireGuardError):
    """The device side (wireguard-go's UAPI socket, the kernel) answered with
    an error or with something we cannot parse."""


def _check_key(key: object, what: str) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise WireGuardLocalError(f"{what}: expected {KEY_LEN} raw bytes")
    return key


def normalize_endpoint(endpoint: str) -> str:
    """Canonical "ip:port" / "[ip6]:port" form of an IP-literal endpoint.

    WireGuard endpoints are addresses, not names (the UAPI and netlink take
    a resolved sockaddr), so a host name is a local error here: resolving is
    the caller's job, done before the reconciler sees it.
    """
    if not isinstance(endpoint, str):
        raise WireGuardLocalError("endpoint: expected a str")
    host, sep, port_s = endpoint.rpartition(":")
    if not sep or not host:
        raise WireGuardLocalError(f"endpoint {endpoint!r}: expected host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ip = ipaddress.ip_address(host)
        port = int(port_s, 10)
    except ValueError:
        raise WireGuardLocalError(f"endpoint {endpoint!r}: expected ip:port") from None
    if not 0 < port < 65536 or port_s != str(port):
        raise WireGuardLocalError(f"endpoint {endpoint!r}: bad port")
    if ip.version == 6:
        return f"[{ip.compressed}]:{port}"
    return f"{ip.compressed}:{port}"


def normalize_allowed_ips(cidrs: Iterable[str]) -> tuple[str, ...]:
    """Sorted, de-duplicated canonical CIDRs (host bits must be zero)."""
    nets = set()
    for c in cidrs:
        try:
            nets.add(ipaddress.ip_network(c, strict=True))
        except (TypeError, ValueError):
            raise WireGuardLocalError(f"allowed ip {c!r}: expected a CIDR") from None
    return tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, n)))


@dataclass(frozen=True)
class PeerConfig:
    """One peer as we want it (or as the device has it)."""

    public_key: bytes
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] = ()
    keepalive: int | None = None

    def __post_init__(self) -> None:
        _check_key(self.public_key, "peer public key")
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", normalize_endpoint(self.endpoint))
        if isinstance(self.allowed_ips, str):
            raise WireGuardLocalError("allowed_ips: expected a tuple of CIDRs, not a str")
        object.__setattr__(self, "allowed_ips", normalize_allowed_ips(self.allowed_ips))
        ka = self.keepalive
        if ka is not None and (type(ka) is not int or not 0 <= ka < 65536):
            raise WireGuardLocalError("keepalive: expected seconds 0..65535 or None")
        # 0 and None both mean "off" on the wire; one spelling keeps diffs honest.
        if ka == 0:
            object.__setattr__(self, "keepalive", None)


@dataclass(frozen=True)
class PeerStatus:
    """Runtime counters the device reports; never part of a diff."""

    last_handshake: float | None = None  # unix seconds, None = never
    rx_bytes: int = 0
    tx_bytes: int = 0


@dataclass(frozen=True)
class InterfaceConfig:
    """The desired interface: the whole truth for an interface we own."""

    private_key: bytes
    listen_port: int | None  # None = let the device choose
    peers: Mapping[bytes, PeerConfig] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_key(self.private_key, "private key")
        _check_port(self.listen_port)
        for k, p in self.peers.items():
            if k != p.public_key:
                raise WireGuardLocalError("peers: key does not match the peer's public key")


def _check_port(port: int | None) -> None:
    if port is not None and (type(port) is not int or not 0 <= port < 65536):
        raise WireGuardLocalError("listen port: expected 0..65535 or None")


@dataclass(frozen=True)
class Device:
    """What the interface has now, as read back from a backend."""

    private_key: bytes | None
    listen_port: int
    peers: Mapping[bytes, PeerConfig] = field(default_factory=dict)
    status: Mapping[bytes, PeerStatus] = field(default_factory=dict)


@dataclass(frozen=True)
class PeerUpdate:
    """Changes to an existing peer; a None field is left unchanged."""

    public_key: bytes
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] | None = None  # replaces the whole set
    keepalive: int | None = None  # 0 turns it off

    @property
    def empty(self) -> bool:
        return self.endpoint is None and self.allowed_ips is None and self.keepalive is None


@dataclass(frozen=True)
class Diff:
    """The smallest set of changes; backends apply removals, then adds, then
    updates (so an allowed ip moving between peers ends on the new one)."""

    private_key: bytes | None = None
    listen_port: int | None = None
    add: tuple[PeerConfig, ...] = ()
    update: tuple[PeerUpdate, ...] = ()
    remove: tuple[bytes, ...] = ()

    @property
    def empty(self) -> bool:
        return (
            self.private_key is None
            and self.listen_port is None
            and not self.add
            and not self.update
            and not self.remove
        )


def reconcile(desired: InterfaceConfig, actual: Device) -> Diff:
    """The smallest diff that makes `actual` match `desired`."""
    private_key = desired.private_key if desired.private_key != actual.private_key else None
    listen_port = None
    if desired.listen_port is not None and desired.listen_port != actual.listen_port:
        listen_port = desired.listen_port
    add: list[PeerConfig] = []
    update: list[PeerUpdate] = []
    for key in sorted(desired.peers):
        want = desired.peers[key]
        have = actual.peers.get(key)
        if have is None:
            add.append(want)
            continue
        u = PeerUpdate(
            public_key=key,
            endpoint=want.endpoint
            if want.endpoint is not None and want.endpoint != have.endpoint
            else None,
            allowed_ips=want.allowed_ips if want.allowed_ips != have.allowed_ips else None,
            keepalive=(want.keepalive or 0) if want.keepalive != have.keepalive else None,
        )
        if not u.empty:
            update.append(u)
    remove = tuple(sorted(k for k in actual.peers if k not in desired.peers))
    return Diff(private_key, listen_port, tuple(add), tuple(update), remove)


def initiator(a_key: bytes, b_key: bytes) -> bool:
    """True when the machine with WireGuard key `a_key` initiates to `b_key`.

    The lower key (bytewise) initiates: both ends compute the same answer
    from public data, so exactly one side of each pair sends the first
    handshake (see the module docstring)."""
    _check_key(a_key, "a_key")
    _check_key(b_key, "b_key")
    if a_key == b_key:
        raise WireGuardLocalError("initiator: a machine does not peer with itself")
    return a_key < b_key


def configure_order(keys: Iterable[bytes]) -> list[bytes]:
    """Order in which to configure several local interfaces so that every
    responder is configured before its initiators: highest key first (it
    initiates to nobody), lowest key (initiates to everyone) last."""
    return sorted(set(keys), reverse=True)


@dataclass(frozen=True)
class MeshPeer:
    """What the mesh knows about one peer machine, for `desired_from`."""

    wg_public: bytes
    overlay6: ipaddress.IPv6Address
    overlay4: ipaddress.IPv4Address | None = None
    endpoint: str | None = None  # the chosen direct path ("ip:port"), None if none
    # Overlay addresses of the micro VMs this peer hosts (mesh.vmroutes checked them).
    vms: tuple[ipaddress.IPv6Address, ...] = ()


def desired_from(
    wg_private: bytes,
    wg_public: bytes,
    listen_port: int | None,
    peers: Iterable[MeshPeer],
    *,
    behind_nat: bool = False,
) -> InterfaceConfig:
    """Build our desired interface from the mesh's view of its peers.

    Allowed ips are exactly the peer's overlay /128 (and /32) plus the /128
    of each VM it hosts (`MeshPeer.vms`, which the caller checked against the
    inventory): a peer can never claim another machine's address. Keepalive is KEEPALIVE when we
    are behind NAT (to hold the mapping open for every peer) or when we are
    the initiator of the pair and have an endpoint to send to."""
    out: dict[bytes, PeerConfig] = {}
    for p in peers:
        if p.wg_public == wg_public:
            continue  # ourselves, e.g. when the caller passes the whole inventory
        allowed = [f"{p.overlay6}/128", *(f"{vm}/128" for vm in p.vms)]
        if p.overlay4 is not None:
            allowed.append(f"{p.overlay4}/32")
        ka = None
        if behind_nat or (p.endpoint is not None and initiator(wg_public, p.wg_public)):
            ka = KEEPALIVE
        out[p.wg_public] = PeerConfig(p.wg_public, p.endpoint, tuple(allowed), ka)
    return InterfaceConfig(wg_private, listen_port, out)


@runtime_checkable
class Backend(Protocol):
    """One WireGuard interface on one machine; the reconciler never knows
    whether it is the kernel module or wireguard-go behind it.

    `create` refuses an interface that exists already (we never take over an
    interface we did not create), `destroy` refuses one we did not create.
    The kernel backend also has `open` (create, or adopt the interface a
    previous run of this agent left) and `release` (the agent stops, the
    interface stays); `mesh.wgchoice` picks the backend and uses them."""

    name: str
    kind: BackendKind

    async def create(self) -> None: ...

    async def destroy(self) -> None: ...

    async def get(self) -> Device: ...

    async def apply(self, diff: Diff) -> None: ...
