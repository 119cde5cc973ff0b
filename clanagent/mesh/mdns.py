"""LAN discovery of clan peers over mDNS / DNS-SD (python-zeroconf).

Owns: the trio shell `MdnsDiscovery`, which drives zeroconf's own threads:
announcing our `_clan._tcp.local.` instance and feeding answers to the
I/O-free core in `mdns_peers.py` (TXT encoding, filtering, the table of LAN
candidates per node key; re-exported here).

Must never: put the clan id or name on the wire (only a personalised hash,
so a LAN observer cannot read which clan this is or link it to an
inventory), raise on what another host announced (malformed TXT, other
clans, our own echo: counted and dropped), block the trio loop (zeroconf's
sync API runs in worker threads and its callbacks come back through a
channel), or stop the agent: no multicast interface or a failing zeroconf
leaves `available` False with a `reason`.

Trust: an mDNS answer is unauthenticated -- anyone on the LAN can claim any
node key. A candidate is only a hint where to dial; the peer handshake
proves who answers, and the caller keeps only keys of the inventory
(`candidates.collect`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from .localaddrs import multicast_interfaces
from .mdns_peers import (  # noqa: F401 (re-exported: the I/O-free core)
    _TAG_BYTES,
    _TAG_PERSON,
    MAX_ADDRESSES,
    NODE_KEY_LEN,
    SERVICE_TYPE,
    TXT_VERSION,
    Announcement,
    Change,
    MdnsPeers,
    _text,
    clan_tag,
    decode_txt,
    encode_txt,
    format_address,
)
from .paths import Candidate

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000


OnUpdate = Callable[[bytes, tuple[Candidate, ...]], None]


__all__ = [
    "SERVICE_TYPE",
    "TXT_VERSION",
    "clan_tag",
    "encode_txt",
    "decode_txt",
    "Announcement",
    "format_address",
    "MdnsPeers",
    "MdnsDiscovery",
    "multicast_interfaces",
]


class MdnsDiscovery:
    """Announce this node on the LAN and report clan peers found there.

    `interfaces`: IP addresses to run mDNS on and to announce (None: every
    interface, announcing this machine's global addresses minus
    `exclude_ifaces`, e.g. the WireGuard overlay). `on_update(node_key,
    candidates)` is called in the trio thread on every change (an empty
    tuple: the node left). Run it with `await nursery.start(d.run)`.
    """

    def __init__(
        self,
        clan_id: bytes,
        node_key: bytes,
        port: int,
        *,
        interfaces: Sequence[str] | None = None,
        wg_port: int | None = None,
        on_update: OnUpdate | None = None,
        exclude_ifaces: frozenset[str] = frozenset(),
    ) -> None:
        if len(node_key) != NODE_KEY_LEN:
            raise ValueError("node key must be 32 bytes")
        if not 0 < port < 65536:
            raise ValueError("port must be 1..65535")
        self._clan_id = clan_id
        self._node_key = node_key
        self._port = port
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._wg_port = wg_port
        self._on_update = on_update
        self._exclude = exclude_ifaces
        self.peers = MdnsPeers(clan_id, node_key)
        self._available = False
        self._reason = "not started"
        self.instance_name: str | None = None

    @property
    def available(self) -> bool:
        return self._available

    @property
    def reason(self) -> str:
        """Why mDNS is unavailable, or where it runs (for status)."""
        return self._reason

    def candidates(self) -> dict[bytes, tuple[Candidate, ...]]:
        return self.peers.candidates()

    def addresses(self) -> dict[bytes, list[str]]:
        """node key -> 'ip:port' strings (the `lan_seen` of `candidates.collect`)."""
        return {k: [c.address for c in cs] for k, cs in self.peers.candidates().items()}

    def _unavailable(self, reason: str) -> None:
        log.warning("mdns unavailable: %s", reason)
        self._available = False
        self._reason = reason

    def _instance_label(self) -> str:
        from ..identity import node_id_of, short_id_of

        return short_id_of(node_id_of(self._node_key))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Announce, browse and report until cancelled; on any setup failure, report and return."""
        try:
            import zeroconf as zc_mod
        except ImportError:
            self._unavailable("python package zeroconf is not installed")
            task_status.started(self)
            return
        ifaces = await trio.to_thread.run_sync(multicast_interfaces)
        if not ifaces:
            self._unavailable("no interface that is up and multicast-capable")
            task_status.started(self)
            return
        try:
            announce = await trio.to_thread.run_sync(self._announce_addresses)
        except Exception as exc:  # pyroute2 or a bad `interfaces` entry
            self._unavailable(f"cannot list our addresses: {exc}")
            task_status.started(self)
            return
        if not announce:
            self._unavailable("no global address to announce on " + ",".join(ifaces))
            task_status.started(self)
            return

        def make_zeroconf() -> zc_mod.Zeroconf:
            if self._interfaces is None:
                return zc_mod.Zeroconf()
            return zc_mod.Zeroconf(interfaces=self._interfaces)

        try:
            zc = await trio.to_thread.run_sync(make_zeroconf)
        except Exception as exc:  # OSError from bind/setsockopt, zeroconf's own errors
            self._unavailable(f"zeroconf failed to start: {exc}")
            task_status.started(self)
            return

        send, receive = trio.open_memory_channel[tuple[Any, str]](float("inf"))
        token = trio.lowlevel.current_trio_token()

        def on_change(zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
            # Runs on zeroconf's browser thread: hand it to trio, never resolve here.
            with contextlib.suppress(trio.RunFinishedError, trio.ClosedResourceError):
                trio.from_thread.run_sync(send.send_nowait, (state_change, name), trio_token=token)

        browser = None
        try:
            info = zc_mod.ServiceInfo(
                SERVICE_TYPE,
                f"{self._instance_label()}.{SERVICE_TYPE}",
                port=self._port,
                properties=encode_txt(self._clan_id, self._node_key, wg_port=self._wg_port),
                server=f"{self._instance_label()}.local.",
                parsed_addresses=announce,
            )
            try:
                browser = await trio.to_thread.run_sync(
                    lambda: zc_mod.ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
                )
                # Probing and announcing block about 1.6 s; a name clash (another
                # node with our short id) gets a new name rather than no service.
                await trio.to_thread.run_sync(
                    lambda: zc.register_service(info, allow_name_change=True)
                )
            except Exception as exc:
                self._unavailable(f"zeroconf failed: {exc}")
                task_status.started(self)
                return
            self.instance_name = info.name
            self._available = True
            self._reason = f"mDNS on {','.join(ifaces)} announcing {','.join(announce)}"
            task_status.started(self)
            async for state, name in receive:
                await self._handle(zc, zc_mod.ServiceStateChange, state, name)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await trio.to_thread.run_sync(self._close, zc, browser)
            send.close()
            if self._available:
                self._available = False
                self._reason = "stopped"

    async def _handle(self, zc: Any, states: Any, state: Any, name: str) -> None:
        if state is states.Removed:
            changes = self.peers.gone(name)
        else:
            try:
                info = await trio.to_thread.run_sync(
                    zc.get_service_info, SERVICE_TYPE, name, RESOLVE_TIMEOUT_MS
                )
            except Exception as exc:  # a malformed answer must not stop discovery
                log.debug("mdns: resolving %s failed: %s", name, exc)
                return
            if info is None:
                return  # it went away (or never answered) before we resolved it
            try:
                addresses = info.parsed_addresses()
            except Exception:
                addresses = []
            changes = self.peers.resolved(name, info.properties, addresses, info.port or 0)
        if self._on_update is not None:
            for key, cands in changes:
                self._on_update(key, cands)

    @staticmethod
    def _close(zc: Any, browser: Any) -> None:
        if browser is not None:
            with contextlib.suppress(Exception):
                browser.cancel()
        # close() unregisters our service, which sends the goodbye (TTL 0)
        # so peers drop us at once instead of after the record TTL.
        with contextlib.suppress(Exception):
            zc.close()

    def _announce_addresses(self) -> list[str]:
        if self._interfaces is not None:
            out = []
            for ip in self._interfaces:
                addr = ipaddress.ip_address(ip)  # ValueError: reported as the reason
                if format_address(str(addr), 1):
                    out.append(str(addr))
            return out
        from .localaddrs import local_addresses

        return local_addresses(self._exclude)
