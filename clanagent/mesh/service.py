"""The mesh service: the trio shell that turns discovery into a WireGuard mesh.

Owns: publishing our own `endpoints` record, LAN discovery (mDNS) and the
optional onion service, feeding every candidate path into the path selector,
the WireGuard interface this agent creates (backend, overlay addresses, link,
route) and reconciling its peers on every change and every 30 s.  Must
never: touch an interface it did not create, block the event loop (netlink
and zeroconf run in threads), stop the agent when a capability is missing
(it reports it and keeps the rest running), or reach for the agent or
another service: it is built from `Ports` (DESIGN rule 7) plus its config
section, its state dir, the probed capabilities, a `GossipEndpoint` (where
gossip listens; a new LAN address for it) and the inventory's opened
endpoints.  Which peers WireGuard should have is `peerplan.plan_peers`.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._log import kv
from ..capabilities import Capability
from ..config import split_hostport
from ..identity import node_id_of
from ..wire import SignedRecord, WireError
from . import candidates as cands
from .nat import NAT_KIND, effective_preference
from .overlay import clan_subnet, overlay_ip6
from .paths import Candidate, PathSelector
from .peerplan import join_host_port, plan_peers
from .probe import _host
from .relay import RelayConfig, RelayLimiter
from .traversal import Traversal
from .vmroutes import VM_STATUS_KIND
from .wireguard import desired_from, reconcile

if TYPE_CHECKING:
    from ..config import MeshSection
    from ..ports import Ports

__all__ = ["GossipEndpoint", "MeshService", "RECONCILE_INTERVAL", "explain_path"]

log = logging.getLogger("clanagent.mesh")

RECONCILE_INTERVAL = 30.0
# Path probes: the path in use every second, ten a second once it missed one,
# failed after eight misses in a row (probe.ProbeConfig has the arithmetic).
PROBE_INTERVAL = 1.0
ADDRESS_CHECK_INTERVAL = 60.0
# A peer we gave an endpoint must complete a handshake within this long.
HANDSHAKE_GRACE = 12.0
# Behind a NAT: how often a peer without a session is sent a datagram through
# the tunnel (WireGuard retries a handshake every 5 s on its own once it sends).
KICK_EVERY = 5.0
# A path learnt from the peer's packets counts while WireGuard received from
# the peer this recently (its keepalives come every 25 s).
LEARNT_FRESH = 60.0
# WireGuard rekeys every 2 minutes on an active tunnel; older means stale.
HANDSHAKE_FRESH = 180.0


def _socks_text(tor: Any) -> str | None:
    socks = getattr(tor, "socks_address", None) if tor is not None else None
    return None if not socks else join_host_port(socks[0], socks[1])


def _path_id(c: Candidate | None) -> tuple[str, str] | None:
    return None if c is None else c.path_id


@dataclass(frozen=True)
class GossipEndpoint:
    """What the mesh needs of the gossip part (which a clan change restarts,
    so these are asked each time): where it listens, and a new address to
    contact (a LAN sighting)."""

    # (listen host as configured, port) once gossip listens; None before or without.
    listening: Callable[[], tuple[str, int] | None]
    add_seed: Callable[[str], None]


def _no_gossip() -> tuple[str, int] | None:
    return None


def _self_allows_public(ports: Ports) -> bool:
    inv = ports.inventory.inventory
    if inv is None:
        return True
    me = inv.machine_by_node_key(ports.identity.public_key)
    return True if me is None else bool(me.public)


def _collect(
    ports: Ports,
    inventory_endpoints: Callable[[], dict[str, list[str]]],
    records: dict[bytes, dict[str, Any]],
    lan_seen: dict[bytes, set[str]],
    onions: dict[bytes, str],
) -> dict[bytes, list[Candidate]]:
    inv = ports.inventory.inventory
    if inv is None:
        return {}
    return cands.collect(
        inv.doc,
        self_key=ports.identity.public_key,
        records=records,
        opened_inventory=inventory_endpoints(),
        lan_seen=lan_seen,
        onions=onions,
    )


def explain_path(
    ports: Ports,
    *,
    machine: str,
    inventory_endpoints: Callable[[], dict[str, list[str]]],
) -> dict[str, Any]:
    """`clanctl path` when the mesh does not run: rank what the inventory and
    the stored endpoints records say, change nothing.  KeyError: no such machine."""
    records: dict[bytes, dict[str, Any]] = {}
    for rec in ports.store.of_kind(cands.ENDPOINTS_KIND):
        try:
            records[rec.origin] = cands.parse_endpoints_body(rec.body)
        except WireError:
            continue
    return _explain(
        ports,
        machine,
        selector=None,
        candidates=lambda: _collect(ports, inventory_endpoints, records, {}, {}),
        extra={"wireguard": False, "tor_socks": None, "mesh_stats": {}},
        device=None,
    )


def _explain(
    ports: Ports,
    machine: str,
    *,
    selector: PathSelector | None,
    candidates: Callable[[], dict[bytes, list[Candidate]]],
    extra: dict[str, Any],
    device: Any,
) -> dict[str, Any]:
    from ..inventory.select import path_preference

    inv = ports.inventory.inventory
    if inv is None or machine not in inv.machines:
        raise KeyError(machine)
    m = inv.doc["machines"][machine]
    key = m["node_key"]
    handshake = None
    if device is not None:
        status = device.status.get(m["wg_key"])
        handshake = None if status is None else status.last_handshake
    out: dict[str, Any] = {
        "machine": machine,
        "overlay6": str(overlay_ip6(inv.clan_id, key)),
        "wireguard": extra["wireguard"],
        # WireGuard reports handshakes in epoch seconds.
        "handshake": handshake is not None and ports.clock.wall() - handshake < HANDSHAKE_FRESH,
        "tor_socks": extra["tor_socks"],
        "mesh_stats": extra["mesh_stats"],
    }
    now = ports.clock.now()
    if selector is None:
        # No WireGuard: still rank what we know, for gossip and ssh.
        selector = PathSelector(_self_allows_public(ports), random.Random(0))
        selector.set_candidates(
            key,
            candidates().get(key, []),
            effective_preference(path_preference(inv.doc, machine)),
            bool(m["public"]),
            now,
        )
    out.update(selector.explain(key, now))
    return out


def learnt_path(
    out: dict[str, Any],
    machine: str,
    endpoint: str | None,
    heard_ago: float | None,
    member_hosts: set[str],
) -> None:
    """Where nothing of ours works (a machine behind a NAT, seen from a public
    member) but WireGuard hears the peer at the address its packets come
    from, show that path: a reflexive one we did not choose.

    `heard_ago`: seconds since WireGuard last received from the peer (None:
    not within LEARNT_FRESH); `member_hosts`: hosts of other members' paths
    -- an endpoint there is a relay's port or a stale path, not the peer's
    NAT mapping."""
    if endpoint is None or heard_ago is None:
        return
    rows = out.get("paths", [])
    ours = next((r for r in rows if r["chosen"]), None)
    if out.get("chosen") is not None:
        # a chosen direct path that is failing or unproven does not replace
        # the address WireGuard learnt (peerplan._working): that one is in use
        if ours is None or ours["kind"] not in ("lan", "public"):
            return
        if not (ours["failures"] or ours["rtt_ms"] is None):
            return
    host = _host(endpoint)
    if host in member_hosts or host in {_host(r["address"]) for r in rows}:
        # (at a candidate's host it is that candidate's session, which the
        # selector judged: a relay that stopped, a LAN path that failed)
        return
    if ours is None:
        why = "no path of ours works" + (f" ({out['reason']})" if out.get("reason") else "")
    else:
        state = "failing" if ours["failures"] else "unproven"
        why = f"our {ours['kind']} path {ours['address']} is {state}"
        ours["chosen"] = False
    out["chosen"] = {"kind": "reflexive", "address": endpoint, "learnt": True}
    out["reason"] = (
        f"learnt from the peer's packets: WireGuard hears {machine} at {endpoint} "
        f"({heard_ago:.0f} s ago); {why}"
    )
    out.setdefault("paths", []).insert(
        0,
        {
            "kind": "reflexive",
            "address": endpoint,
            "via": None,
            "sources": ["wireguard"],
            "port_wg": None,
            "chosen": True,
            "usable": True,
            "reason": "learnt from the peer's packets",
            "rtt_ms": None,
            "failures": 0,
            "retry_in": None,
        },
    )


class MeshService:
    def __init__(
        self,
        ports: Ports,
        *,
        cfg: MeshSection,
        state_path: Path,
        capabilities: Sequence[Capability] = (),
        gossip_endpoint: GossipEndpoint | None = None,
        inventory_endpoints: Callable[[], dict[str, list[str]]] = dict,
    ) -> None:
        self.ports = ports
        self.cfg = cfg
        self.state_path = state_path
        self._capabilities = list(capabilities)
        self.gossip_endpoint = gossip_endpoint or GossipEndpoint(_no_gossip, lambda addr: None)
        self.inventory_endpoints = inventory_endpoints
        self.selector: PathSelector | None = None
        self.backend: Any = None
        self.backend_reason = "not started"
        self.mdns: Any = None
        self.mdns_reason = "disabled" if not self.cfg.mdns else "not started"
        self.tor: Any = None
        self.tor_reason = "off" if self.cfg.tor == "off" else "not started"
        self.lan_seen: dict[bytes, set[str]] = {}
        self.records: dict[bytes, dict[str, Any]] = {}
        self.onions: dict[bytes, str] = {}
        self.overlay6: ipaddress.IPv6Address | None = None
        self.overlay4: ipaddress.IPv4Address | None = None
        self._configured_at: dict[bytes, float] = {}
        self._device: Any = None  # what the interface had at the last reconcile
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._published: dict[str, Any] | None = None
        self.stats = {
            "reconciles": 0,
            "applied": 0,
            "errors": 0,
            "probes_sent": 0,
            "probes_answered": 0,
            "probes_bad": 0,
            "paths_suspected": 0,  # first misses of a path in use
            "failures_vetoed": 0,  # probes said dead, WireGuard had heard the peer
            "paths_failed": 0,  # paths in use given up (failovers)
            "sessions_kicked": 0,  # datagrams sent so WireGuard handshakes now (behind a NAT)
        }
        self._cands: dict[tuple[bytes, str], Candidate] = {}
        self._probe_sock: Any = None
        # Endpoints records feed the candidates; a VM's status may move its
        # overlay address to another peer; a new inventory changes everything.
        self.traversal = Traversal(ports.identity.public_key, ports.identity.box_key)
        self._trigger_sock: Any = None
        self._kicked: dict[bytes, float] = {}  # peer -> when we last made WireGuard send
        self._rx: dict[Any, tuple[int, float]] = {}  # wg key -> (rx bytes, when it last grew)
        self._relay_pairs: dict[Any, Any] = {}
        self.relay_config = RelayConfig.scaled(
            cfg.relay_pair_mibps, cfg.relay_max_mibps, cfg.relay_max_pps
        )
        self.relay_limiter = RelayLimiter(self.relay_config)
        ports.bus.subscribe([cands.ENDPOINTS_KIND, VM_STATUS_KIND, NAT_KIND], self.on_record)
        ports.inventory.subscribe(lambda inv: self.wake())

    # -- status ------------------------------------------------------------------

    def capabilities(self) -> list[Capability]:
        wg_ok = self.backend is not None
        out = [
            Capability(
                "mesh.wireguard",
                wg_ok,
                f"{self.backend_reason}; interface {self.backend.name}, overlay {self.overlay6}"
                if wg_ok
                else self.backend_reason,
            ),
            Capability(
                "mesh.mdns",
                self.mdns is not None and self.mdns_reason == "running",
                self.mdns_reason,
            ),
            Capability(
                "mesh.tor",
                self.tor is not None and self.tor_reason.startswith("onion"),
                self.tor_reason,
            ),
        ]
        return out

    def wake(self) -> None:
        self._wakeup.set()

    # -- inputs --------------------------------------------------------------------

    def on_record(self, rec: SignedRecord) -> None:
        """A gossiped record was stored: endpoints records feed the candidates;
        a VM's status may move its overlay address to another peer."""
        if rec.kind == VM_STATUS_KIND:
            self.wake()
            return
        if rec.kind == NAT_KIND:
            self.traversal.on_record(rec, self.ports.clock.wall())
            self.wake()
            return
        if rec.kind != cands.ENDPOINTS_KIND:
            return
        try:
            body = cands.parse_endpoints_body(rec.body)
        except WireError as exc:
            log.debug("bad endpoints record", extra=kv(reason=exc.reason))
            return
        self.records[rec.origin] = body
        if body["onion"]:
            onion = self._open_onion(body["onion"])
            if onion:
                self.onions[rec.origin] = onion
        self.wake()

    def _open_onion(self, sealed: bytes) -> str | None:
        from ..inventory.sealing import SealError, open_endpoints

        ident = self.ports.identity
        try:
            opened = open_endpoints(sealed, ident.public_key, ident.box_key)
        except SealError:
            return None
        return opened[0] if opened else None

    def on_lan_candidate(self, node_key: bytes, addr: str, present: bool = True) -> None:
        seen = self.lan_seen.setdefault(node_key, set())
        if present:
            if addr not in seen:
                seen.add(addr)
                self.gossip_endpoint.add_seed(addr)
        else:
            seen.discard(addr)
        self.wake()

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        anchor = self.ports.inventory.anchor
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if anchor is not None:
                self.overlay6 = overlay_ip6(anchor.clan_id, self.ports.identity.public_key)
            for kind in (cands.ENDPOINTS_KIND, NAT_KIND):
                for rec in self.ports.store.of_kind(kind):
                    self.on_record(rec)
            await self._start_wireguard()
            if self.cfg.mdns:
                nursery.start_soon(self._run_mdns)
            if self.cfg.tor != "off":
                nursery.start_soon(self._run_tor)
            nursery.start_soon(self._address_loop)
            if self.backend is not None:
                await self._open_probe_socket()
                if self._probe_sock is not None:
                    nursery.start_soon(self._probe_receiver)
                    nursery.start_soon(self._probe_sender)
            task_status.started(self)
            try:
                await self._reconcile_loop()
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop_wireguard()

    async def _start_wireguard(self) -> None:
        anchor = self.ports.inventory.anchor
        if not self.cfg.wireguard:
            await self._remove_leftover_interface("disabled (mesh.wireguard = false)")
            return
        if anchor is None:
            await self._remove_leftover_interface("not in a clan yet")
            return
        cap = next((c for c in self._capabilities if c.name == "wireguard"), None)
        if cap is not None and not cap.available:
            self.backend_reason = cap.reason
            log.info("WireGuard mesh unavailable", extra=kv(reason=cap.reason))
            return
        from .wgchoice import open_backend

        backend, choice = await open_backend(self.cfg.interface, self.ports.identity.wg_private)
        self.backend_reason = choice.reason
        if backend is None:
            log.info("WireGuard mesh unavailable", extra=kv(reason=choice.reason))
            return
        try:
            from . import netlink

            assert self.overlay6 is not None
            await netlink.ensure_address(self.cfg.interface, f"{self.overlay6}/128")
            await netlink.set_link_state(self.cfg.interface, True)
            await netlink.ensure_route(self.cfg.interface, str(clan_subnet(anchor.clan_id)))
        except Exception as exc:  # never fatal: report and run without the mesh
            self.backend_reason = f"could not set up {self.cfg.interface}: {exc}"
            log.warning("WireGuard interface not set up", extra=kv(error=exc))
            try:
                await backend.destroy()
            except Exception:
                pass
            return
        self.backend = backend
        self.selector = PathSelector(_self_allows_public(self.ports), random.Random())
        log.info(
            "WireGuard interface up",
            extra=kv(interface=self.cfg.interface, backend=choice.reason, overlay=self.overlay6),
        )

    @property
    def device(self) -> Any:
        """The WireGuard interface's state at the last reconcile (a
        `wireguard.Device`), None before one or without WireGuard."""
        return self._device

    async def _remove_leftover_interface(self, reason: str) -> None:
        """A kernel interface outlives the agent (the next start adopts it);
        a start without a mesh removes it instead, so turning WireGuard off or
        leaving the clan leaves no tunnels, address or clan route behind.
        REASON (why there is no mesh) is what status shows, once done."""
        from .wgchoice import remove_leftover

        removed = await remove_leftover(self.cfg.interface, self.ports.identity.wg_private)
        self.backend_reason = reason
        if removed:
            self.backend_reason += f"; removed {self.cfg.interface} left by an earlier run"
            log.info(
                "removed the WireGuard interface an earlier run left",
                extra=kv(interface=self.cfg.interface, reason=self.backend_reason),
            )

    async def _stop_wireguard(self) -> None:
        for sockets in self._relay_pairs.values():
            sockets.close()
        self._relay_pairs.clear()
        if self._trigger_sock is not None:
            self._trigger_sock.close()
            self._trigger_sock = None
        if self._probe_sock is not None:
            self._probe_sock.close()
            self._probe_sock = None
        if self.backend is not None:
            from .wgchoice import close_backend

            try:
                await close_backend(self.backend)
            except Exception as exc:
                log.warning("could not stop the WireGuard interface", extra=kv(error=exc))
            self.backend = None

    async def _run_mdns(self) -> None:
        anchor = self.ports.inventory.anchor
        if anchor is None:
            self.mdns_reason = "not in a clan yet"
            return
        listening = self.gossip_endpoint.listening()
        if listening is None:
            self.mdns_reason = "gossip is not listening: nothing to advertise"
            return
        try:
            from .mdns import MdnsDiscovery
        except ImportError as exc:
            self.mdns_reason = f"unavailable: {exc}"
            return
        self.mdns = MdnsDiscovery(
            anchor.clan_id,
            self.ports.identity.public_key,
            listening[1],
            wg_port=self.cfg.wg_port if self.backend is not None else None,
            on_update=self._on_mdns,
            exclude_ifaces=frozenset({self.cfg.interface}),
        )
        self.mdns_reason = "running"
        try:
            await self.mdns.run()
        except Exception as exc:
            self.mdns_reason = f"failed: {exc}"
            log.warning("mDNS stopped", extra=kv(error=exc))
            return
        if not self.mdns.available:
            self.mdns_reason = self.mdns.reason

    def _on_mdns(self, node_key: bytes, found: tuple[Candidate, ...]) -> None:
        new = {c.address for c in found}
        for addr in new - self.lan_seen.get(node_key, set()):
            self.on_lan_candidate(node_key, addr, True)
        for addr in self.lan_seen.get(node_key, set()) - new:
            self.on_lan_candidate(node_key, addr, False)

    async def _run_tor(self) -> None:
        from .tor import TorService

        control_port = control_socket = None
        if self.cfg.tor == "attach":
            ctl = self.cfg.tor_control
            if ctl.rsplit(":", 1)[-1].isdigit():
                control_port = int(ctl.rsplit(":", 1)[-1])
            elif ctl:
                control_socket = ctl
            else:
                self.tor_reason = "mesh.tor = attach needs mesh.tor_control (port or socket)"
                return
        tor = TorService(self.state_path, control_port=control_port, control_socket=control_socket)
        self.tor = tor
        listening = self.gossip_endpoint.listening()
        if listening is None:
            self.tor_reason = "gossip is not listening: nothing to publish as an onion service"
            return
        assert self._nursery is not None
        await self._nursery.start(tor.run, listening[1])
        if tor.available and tor.onion_address:
            self.tor_reason = f"onion service {tor.onion_address} (socks {tor.socks_address})"
            self._published = None  # republish our endpoints with the (sealed) onion
            await self._publish_endpoints()
        else:
            self.tor_reason = tor.reason
            log.info("tor unavailable", extra=kv(reason=tor.reason))

    # -- path probes ----------------------------------------------------------------------

    async def _open_probe_socket(self) -> None:
        import socket as _socket

        from .probe import ProbeTracker

        listening = self.gossip_endpoint.listening()
        if listening is None:
            return
        host = listening[0] or "0.0.0.0"
        family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
        sock = trio.socket.socket(family, _socket.SOCK_DGRAM)
        try:
            await sock.bind((host, listening[1]))  # the gossip port number, over UDP
        except OSError as exc:
            sock.close()
            log.warning("path probes unavailable", extra=kv(error=exc))
            return
        self._probe_sock = sock
        self.tracker = ProbeTracker()

    def _box_keys(self) -> dict[bytes, bytes]:
        inv = self.ports.inventory.inventory
        if inv is None:
            return {}
        return {m["node_key"]: m["box_key"] for m in inv.doc["machines"].values()}

    async def _probe_receiver(self) -> None:
        from . import probe

        sock = self._probe_sock
        ident = self.ports.identity
        while True:
            data, src = await sock.recvfrom(probe.MAX_DATAGRAM + 1)
            try:
                sender, kind, pid, sent_at = probe.decode(data, ident.box_key, self._box_keys())
            except WireError:
                self.stats["probes_bad"] += 1
                continue
            if kind == probe.PING:
                reply = probe.encode(
                    probe.PONG,
                    pid,
                    sent_at,
                    ident.public_key,
                    ident.box_key,
                    self._box_keys()[sender],
                )
                try:
                    await sock.sendto(reply, src)
                except OSError:
                    pass
                continue
            now = self.ports.clock.now()
            got = self.tracker.answered(pid, sender, now)
            if got is None or self.selector is None:
                continue
            sent, rtt = got
            self.stats["probes_answered"] += 1
            cand = self._cands.get((sent.node_key, sent.address))
            if cand is not None:
                before = _path_id(self.selector.current(sent.node_key))
                self.selector.report_success(sent.node_key, cand, rtt, now)
                if _path_id(self.selector.current(sent.node_key)) != before:
                    self.wake()

    async def _send_probe(self, node_key: bytes, address: str) -> None:
        from . import probe

        box = self._box_keys().get(node_key)
        if box is None:
            return
        try:
            host, port = split_hostport(address, "address")
            infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_DGRAM)
        except (OSError, ValueError):
            return
        ident = self.ports.identity
        now = self.ports.clock.now()
        # Until the tracker has an RTT of its own for the path, the selector's
        # (probes before, or the membership's estimate) sets the timeout.
        cand = self._cands.get((node_key, address))
        hint = None if cand is None or self.selector is None else self.selector.rtt(node_key, cand)
        pid = self.tracker.sent(node_key, address, now, rtt_hint=hint)
        # sent_at only comes back in the pong; the tracker keeps its own copy.
        data = probe.encode(probe.PING, pid, now, ident.public_key, ident.box_key, box)
        for family, _, _, _, sockaddr in infos:
            if family == self._probe_sock.family:
                try:
                    await self._probe_sock.sendto(data, sockaddr)
                    self.stats["probes_sent"] += 1
                except OSError:
                    pass
                return

    async def _probe_sender(self) -> None:
        while True:
            # Let the receiver take pongs already here before misses are counted.
            await trio.sleep(0)
            sel = self.selector
            if sel is not None:
                await self._probe_round(sel)
            nd = self.tracker.next_deadline()
            wait = PROBE_INTERVAL if nd is None else nd - self.ports.clock.now()
            await trio.sleep(min(PROBE_INTERVAL, max(0.005, wait)))

    async def _probe_round(self, sel: PathSelector) -> None:
        now = self.ports.clock.now()

        def is_current(node_key: bytes, address: str, sel=sel) -> bool:
            cur = sel.current(node_key)
            return cur is not None and cur.address == address

        for p, verdict in self.tracker.verdicts(now, is_current):
            cand = self._cands.get((p.node_key, p.address))
            if cand is None:
                continue
            using = is_current(p.node_key, p.address)
            if verdict == "suspect":
                self.stats["paths_suspected"] += 1
                self.tracker.wg_baseline(p.node_key, p.address, await self._wg_sample(p.node_key))
                continue
            if verdict != "fail":
                continue
            if using and self.tracker.wg_vetoes(
                p.node_key, p.address, await self._wg_sample(p.node_key)
            ):
                self.stats["failures_vetoed"] += 1
                log.info(
                    "path kept: WireGuard heard the peer",
                    extra=kv(peer=p.node_key.hex()[:12], path=f"{cand.kind} {cand.address}"),
                )
                continue
            now = self.ports.clock.now()
            before = _path_id(sel.current(p.node_key))
            sel.report_failure(p.node_key, cand, now)
            if before == cand.path_id:
                self.stats["paths_failed"] += 1
                log.info(
                    "path failed",
                    extra=kv(peer=p.node_key.hex()[:12], path=f"{cand.kind} {cand.address}"),
                )
            if _path_id(sel.current(p.node_key)) != before:
                self.wake()
        now = self.ports.clock.now()
        in_use: set[tuple[bytes, str]] = set()
        for node_key in {k for k, _ in self._cands}:
            cur = sel.current(node_key)
            if cur is not None and cur.kind in ("lan", "public"):
                in_use.add((node_key, cur.address))
        targets = set(self.tracker.due(now, in_use))
        for node_key, cand in sel.probes_due(now):
            if cand.kind in ("lan", "public"):
                targets.add((node_key, cand.address))
        for node_key, address in sorted(targets):
            await self._send_probe(node_key, address)

    async def _wg_sample(self, node_key: bytes) -> Any:
        """WireGuard's counters for the peer, read now (None when unknown)."""
        from .probe import WgSample

        inv = self.ports.inventory.inventory
        if inv is None or self.backend is None:
            return None
        wg_key = next(
            (m["wg_key"] for m in inv.doc["machines"].values() if m["node_key"] == node_key), None
        )
        if wg_key is None:
            return None
        try:
            device = await self.backend.get()
        except Exception as exc:  # no evidence: the probes' verdict stands
            log.debug("could not read WireGuard", extra=kv(error=exc))
            return None
        peer = device.peers.get(wg_key)
        status = device.status.get(wg_key)
        if peer is None or status is None:
            return None
        return WgSample(peer.endpoint, status.rx_bytes, status.last_handshake)

    # -- our own endpoints -------------------------------------------------------------

    async def _address_loop(self) -> None:
        while True:
            try:
                await self._publish_endpoints()
            except Exception as exc:
                log.warning("could not publish endpoints", extra=kv(error=exc))
            await trio.sleep(ADDRESS_CHECK_INTERVAL)

    async def _publish_endpoints(self) -> None:
        listening = self.gossip_endpoint.listening()
        if listening is None or self.ports.inventory.anchor is None:
            return
        from .localaddrs import local_addresses

        host, port = listening
        if host in ("", "0.0.0.0", "::"):
            ips = await trio.to_thread.run_sync(local_addresses, frozenset({self.cfg.interface}))
        else:
            ips = [host]
        lan = [join_host_port(ip, port) for ip in ips]
        sealed_onion = b""
        if self.tor is not None and getattr(self.tor, "onion_address", None):
            inv = self.ports.inventory.inventory
            if inv is not None:
                from ..inventory.sealing import recipients_of, seal_endpoints

                sealed_onion = seal_endpoints(
                    [f"{self.tor.onion_address}:{port}"], recipients_of(inv.doc)
                )
        body = cands.endpoints_body(
            lan,
            self.cfg.public_endpoints,
            self.cfg.wg_port if self.backend is not None else None,
            sealed_onion,
        )
        # A body our own check refuses is not remembered: the next round tries again.
        if body != self._published and await self.ports.bus.publish(cands.ENDPOINTS_KIND, "", body):
            self._published = body

    # -- reconciling --------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception as exc:  # the next round tries again
                self.stats["errors"] += 1
                log.warning("mesh reconcile failed", extra=kv(error=exc))
            # The selector runs on ports.clock.now(); trio's sleeps follow the
            # same clock in the agent and in the simulator, so wait a duration.
            wait = RECONCILE_INTERVAL
            if self.selector is not None:
                nd = self.selector.next_deadline()
                if nd is not None:
                    wait = min(wait, max(0.5, nd - self.ports.clock.now()))
                nat_wait = self.traversal.next_deadline(self.ports.clock.wall())
                if nat_wait is not None:
                    wait = min(wait, max(0.5, nat_wait))
            with trio.move_on_after(wait):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            await trio.sleep(0.05)  # batch a burst of changes into one round

    def _candidates(self) -> dict[bytes, list[Candidate]]:
        return _collect(
            self.ports, self.inventory_endpoints, self.records, self.lan_seen, self.onions
        )

    async def reconcile_once(self) -> None:
        ports = self.ports
        inv = ports.inventory.inventory
        self.stats["reconciles"] += 1
        if inv is None or self.selector is None or self.backend is None:
            return
        now = ports.clock.now()
        wall = ports.clock.wall()
        ident = ports.identity
        # Read first: which peers WireGuard holds a live session with (at an
        # address their own packets chose) decides what the plan may override.
        actual = await self.backend.get()
        plan = plan_peers(
            inv.doc,
            inv.clan_id,
            ident.public_key,
            self.selector,
            now,
            endpoints=self.records,
            vm_status=((r.origin, r.key, r.body) for r in ports.store.of_kind(VM_STATUS_KIND)),
            gone=self._gone(m["node_key"] for m in inv.doc["machines"].values()),
            ipv4_range=self.cfg.ipv4_range,
            opened_inventory=self.inventory_endpoints(),
            lan_seen=self.lan_seen,
            onions=self.onions,
            reflexive=self.traversal.admitted(wall),
            relayed=self.traversal.relayed,
            live=self._live(inv, actual, wall),
        )
        # Probes are keyed by address; where two kinds share one (a public
        # endpoint that is also a LAN address), the first -- the more
        # preferred, as collected -- takes the probe results.
        cands_now: dict[tuple[bytes, str], Candidate] = {}
        for key, found in plan.candidates.items():
            for c in found:
                cands_now.setdefault((key, c.address), c)
        self._cands = cands_now
        desired = desired_from(
            ident.wg_private,
            ident.wg_public,
            self.cfg.wg_port,
            plan.peers,
            behind_nat=self._behind_nat(wall),
        )
        diff = reconcile(desired, actual)
        if not diff.empty:
            await self.backend.apply(diff)
            self.stats["applied"] += 1
            for p in (*diff.add, *diff.update):
                self._configured_at[p.public_key] = now
            log.info(
                "WireGuard peers reconciled",
                extra=kv(add=len(diff.add), update=len(diff.update), remove=len(diff.remove)),
            )
        if self.overlay4 is None and plan.overlay4 is not None:
            from . import netlink

            self.overlay4 = plan.overlay4
            await netlink.ensure_address(self.cfg.interface, f"{self.overlay4}/32")
            await netlink.ensure_route(self.cfg.interface, self.cfg.ipv4_range)
        self._device = actual if diff.empty else await self.backend.get()
        for wg_key, st in self._device.status.items():
            prev = self._rx.get(wg_key)
            if prev is None or st.rx_bytes != prev[0]:
                self._rx[wg_key] = (st.rx_bytes, now if st.rx_bytes else -LEARNT_FRESH)
        wg_to_node = {m["wg_key"]: m["node_key"] for m in inv.doc["machines"].values()}
        self._judge_paths(self._device, wg_to_node, now, wall)
        await self._nat_round(inv, plan, wg_to_node, now, wall)

    # -- NAT traversal (mesh/traversal.py) ---------------------------------------------

    def _live(self, inv: Any, device: Any, wall: float) -> frozenset[bytes]:
        """Peers WireGuard has a fresh session with."""
        wg_to_node = {m["wg_key"]: m["node_key"] for m in inv.doc["machines"].values()}
        out = set()
        for wg_key, st in device.status.items():
            if (
                st.last_handshake
                and wall - st.last_handshake < HANDSHAKE_FRESH
                and wg_key in wg_to_node
            ):
                out.add(wg_to_node[wg_key])
        return frozenset(out)

    def _behind_nat(self, wall: float) -> bool:
        """Keep every mapping open (a keepalive to every peer) unless we have a
        public address of our own: until a member saw us, we cannot know."""
        if self.traversal.behind_nat(wall):
            return True
        if self.cfg.public_endpoints:
            return False
        inv = self.ports.inventory.inventory
        me = None if inv is None else inv.machine_by_node_key(self.ports.identity.public_key)
        if me is None:
            return True
        return not (
            inv.doc["machines"][me.name].get("endpoints") or self.inventory_endpoints().get(me.name)
        )

    async def _nat_round(
        self, inv: Any, plan: Any, wg_to_node: dict, now: float, wall: float
    ) -> None:
        assert self.selector is not None
        sources: dict[bytes, str] = {}
        for (a, b), sockets in self._relay_pairs.items():
            for side, key in (("a", a), ("b", b)):
                learnt = sockets.state.learnt.get(side)
                if learnt is not None:
                    sources[key] = join_host_port(*learnt[0])
        self.traversal.relay_sources = sources
        result = self.traversal.round(
            self._device, wg_to_node, inv.doc, self.selector, plan.candidates, now, wall
        )
        for pair in result.close_pairs:
            sockets = self._relay_pairs.pop(pair, None)
            if sockets is not None:
                sockets.close()
        for pair in result.open_pairs:
            await self._open_relay_pair(pair)
        if result.body is not None and await self.ports.bus.publish(
            NAT_KIND, "", result.body, push=not result.refresh_only
        ):
            self.traversal.published(result.body, wall)
        if result.relayed_changed or result.open_pairs:
            self.wake()  # plan the new relay paths; publish the new grants' ports
        for key in result.triggers:
            await self._trigger(key)
        await self._kick_sessions(inv, now, wall)

    async def _kick_sessions(self, inv: Any, now: float, wall: float) -> None:
        """Behind a NAT, a member learns our mapping only from our WireGuard's
        packets: where a LAN or public path has no session yet, send one
        datagram into the tunnel so WireGuard handshakes now, not at its next
        keepalive (up to 25 s later).  At most one per peer every KICK_EVERY s."""
        assert self.selector is not None
        if not self._behind_nat(wall) or self._device is None:
            return
        live = self._live(inv, self._device, wall)
        for m in inv.doc["machines"].values():
            key = m["node_key"]
            if key == self.ports.identity.public_key or key in live:
                continue
            cur = self.selector.current(key)
            if cur is None or cur.kind not in ("lan", "public"):
                continue
            if now - self._kicked.get(key, -KICK_EVERY) < KICK_EVERY:
                continue
            self._kicked[key] = now
            self.stats["sessions_kicked"] += 1
            await self._trigger(key)

    async def _open_relay_pair(self, pair: Any) -> None:
        """As a relay: two ports for the pair, forwarding until it is closed."""
        from .relay_socket import RelaySockets

        listening = self.gossip_endpoint.listening()
        host = listening[0] if listening else ""
        if host in ("", "::"):
            host = "0.0.0.0"
        sockets = RelaySockets(
            pair,
            host,
            lambda key: [self.traversal.wg_hosts.get(key, "")],
            self.ports.clock.now,
            self.relay_config,
            self.relay_limiter,
        )
        try:
            pa, pb = await sockets.bind()
        except OSError as exc:
            log.warning("relay ports unavailable", extra=kv(error=exc))
            return
        self.traversal.bind(pair, pa, pb)
        self._relay_pairs[pair] = sockets
        assert self._nursery is not None
        self._nursery.start_soon(sockets.run)
        log.info(
            "relaying", extra=kv(a=pair[0].hex()[:12], b=pair[1].hex()[:12], ports=f"{pa},{pb}")
        )

    async def _trigger(self, node_key: bytes) -> None:
        """Send one datagram through the tunnel to the peer, so WireGuard sends
        (and handshakes) towards the endpoint it has now: in a punch window,
        the peer's reflexive address."""
        import socket as _socket

        anchor = self.ports.inventory.anchor
        listening = self.gossip_endpoint.listening()
        if anchor is None:
            return
        if self._trigger_sock is None:
            self._trigger_sock = trio.socket.socket(_socket.AF_INET6, _socket.SOCK_DGRAM)
        port = listening[1] if listening else 9
        try:
            await self._trigger_sock.sendto(
                b"clanagent-punch", (str(overlay_ip6(anchor.clan_id, node_key)), port)
            )
        except OSError:
            pass

    def _judge_paths(self, device: Any, wg_to_node: dict, now: float, wall: float) -> None:
        """WireGuard handshakes tell whether a chosen direct path works.

        `now` is the selector's clock; `wall` is for WireGuard's handshake
        times, which are epoch seconds."""
        assert self.selector is not None
        rtts = self._rtts()
        for wg_key, peer in device.peers.items():
            node_key = wg_to_node.get(wg_key)
            if node_key is None or peer.endpoint is None:
                continue
            current = self.selector.current(node_key)
            if current is None or current.kind in ("reflexive", "relay"):
                # judged by the traversal: a punch window's counters, the relay's reach
                continue
            status = device.status.get(wg_key)
            last = status.last_handshake if status is not None else None
            # A handshake speaks for the current path only when WireGuard heard
            # the peer there: behind a NAT the peer's packets come from its
            # mapping, and a dead LAN path must not look alive because of them.
            # Where probes run they decide (a handshake up to 3 minutes old would
            # keep a path that just died alive; WireGuard's counters can still
            # veto a probe failure, see probe.wg_says_alive).
            if (
                last is not None
                and wall - last < HANDSHAKE_FRESH
                and _host(peer.endpoint) == _host(current.address)
                and self._probe_sock is None
            ):
                rtt = rtts.get(node_id_of(node_key), 0.001)
                self.selector.report_success(node_key, current, rtt, now)
            elif (
                self._probe_sock is None
                and now - self._configured_at.get(wg_key, now) > HANDSHAKE_GRACE
            ):
                # Without probes, a missing handshake is the only sign of a dead path.
                self.selector.report_failure(node_key, current, now)
                self._configured_at[wg_key] = now

    def _gone(self, keys: Any) -> frozenset[bytes]:
        """Machines the membership knows to be dead or gone (their VM routes lapse)."""
        state = self.ports.members.state
        return frozenset(k for k in keys if state(node_id_of(k)) in ("dead", "left"))

    def _rtts(self) -> dict[str, float]:
        """Node id -> the membership's RTT estimate (seconds), where it has one."""
        out = {}
        for row in self.ports.members.rows():
            if row.get("rtt_ms") is not None:
                out[row["node_id"]] = row["rtt_ms"] / 1000.0
        return out

    # -- views ------------------------------------------------------------------------

    def path_kind(self, node_key: bytes) -> str | None:
        """The kind of the path in use to a machine (for the map): the chosen
        one, else `reflexive` when WireGuard holds a fresh session at an
        address learnt from the peer's packets, else None."""
        if self.selector is None:
            return None
        current = self.selector.current(node_key)
        if current is not None and (
            current.kind not in ("lan", "public")
            or (
                self.selector.healthy(node_key, current)
                and self.selector.rtt(node_key, current) is not None
            )
        ):
            return current.kind  # (a doubtful direct path may yield to a learnt one)
        inv = self.ports.inventory.inventory
        m = None if inv is None else inv.machine_by_node_key(node_key)
        if m is None or self._device is None:
            return None
        out = _explain(
            self.ports,
            m.name,
            selector=self.selector,
            candidates=self._candidates,
            extra={"wireguard": True, "tor_socks": None, "mesh_stats": {}},
            device=self._device,
        )
        self._learnt(out, m.name)
        return None if out["chosen"] is None else out["chosen"]["kind"]

    def _learnt(self, out: dict[str, Any], machine: str) -> None:
        inv = self.ports.inventory.inventory
        if self._device is None or inv is None:
            return
        m = inv.doc["machines"][machine]
        peer = self._device.peers.get(m["wg_key"])
        grew = self._rx.get(m["wg_key"])
        ago = None if grew is None else self.ports.clock.now() - grew[1]
        hosts = {_host(addr) for (key, addr) in self._cands if key != m["node_key"]}
        learnt_path(
            out,
            machine,
            None if peer is None else peer.endpoint,
            ago if ago is not None and ago < LEARNT_FRESH else None,
            hosts,
        )

    def explain(self, machine: str) -> dict[str, Any]:
        out = _explain(
            self.ports,
            machine,
            selector=self.selector,
            candidates=self._candidates,
            extra={
                "wireguard": self.backend is not None,
                "tor_socks": _socks_text(self.tor),
                "mesh_stats": dict(self.stats),
            },
            device=self._device,
        )
        self._learnt(out, machine)
        key = bytes.fromhex(out["peer"]) if out.get("peer") else None
        if key is not None:
            out["nat"] = self.traversal.explain(key, self.ports.clock.wall())
        out["nat_self"] = self.traversal.own(self.ports.clock.wall())
        out["nat_self"]["relay_stats"] = {
            f"{a.hex()[:12]}-{b.hex()[:12]}": dict(r.state.stats)
            for (a, b), r in self._relay_pairs.items()
        }
        out["nat_self"]["relay_limit"] = {
            "pair_mib_per_s": self.relay_config.rate_bytes / (1024 * 1024),
            "mib_per_s": self.relay_config.total_rate_bytes / (1024 * 1024),
            "packets_per_s": self.relay_config.total_rate_packets,
            "refused": self.relay_limiter.refused,
        }
        return out
