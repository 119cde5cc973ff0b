"""The mesh service: the trio shell that turns discovery into a WireGuard mesh.

Owns: publishing our own `endpoints` record, LAN discovery (mDNS) and the
optional onion service, feeding every candidate path into the path selector,
the WireGuard interface this agent creates (backend, overlay addresses, link,
route) and reconciling its peers on every change and every 30 s.  Must
never: touch an interface it did not create, block the event loop (netlink
and zeroconf run in threads), or stop the agent when a capability is missing
(it reports it and keeps the rest running).
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from typing import Any

import trio

from .._log import kv
from ..capabilities import Capability
from ..config import split_hostport
from ..wire import SignedRecord, WireError
from . import candidates as cands
from .overlay import assign_ipv4, clan_subnet, overlay_ip6
from .paths import Candidate, PathSelector
from .vmroutes import VM_STATUS_KIND, vm_routes
from .wireguard import MeshPeer, desired_from, reconcile

__all__ = ["MeshService", "RECONCILE_INTERVAL"]

log = logging.getLogger("clanagent.mesh")

RECONCILE_INTERVAL = 30.0
# Probe the current path of every peer this often; this many misses in a row
# fail it (so failover takes about PROBE_INTERVAL * PROBE_MISSES + a reconcile).
PROBE_INTERVAL = 1.0
PROBE_MISSES = 3
ADDRESS_CHECK_INTERVAL = 60.0
# A peer we gave an endpoint must complete a handshake within this long.
HANDSHAKE_GRACE = 12.0
# WireGuard rekeys every 2 minutes on an active tunnel; older means stale.
HANDSHAKE_FRESH = 180.0


def _socks_text(tor: Any) -> str | None:
    socks = getattr(tor, "socks_address", None) if tor is not None else None
    return None if not socks else _join_host_port(socks[0], socks[1])


def _path_id(c: Candidate | None) -> tuple[str, str] | None:
    return None if c is None else c.path_id


def _host_of(addr: str) -> str:
    host, _ = split_hostport(addr, "address")
    return host


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MeshService:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.cfg = agent.cfg.mesh
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
        }
        self._cands: dict[tuple[bytes, str], Candidate] = {}
        self._probe_sock: Any = None

    # -- status ------------------------------------------------------------------

    def capabilities(self) -> list[Capability]:
        wg_ok = self.backend is not None
        out = [
            Capability(
                "mesh.wireguard",
                wg_ok,
                f"{self.backend.kind} interface {self.backend.name}, overlay {self.overlay6}"
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

        ident = self.agent.identity
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
                gossip = self.agent.gossip
                if gossip is not None:
                    gossip.add_seed(addr)
        else:
            seen.discard(addr)
        self.wake()

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        agent = self.agent
        anchor = agent.anchor
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if anchor is not None:
                self.overlay6 = overlay_ip6(anchor.clan_id, agent.identity.public_key)
            for rec in list(agent.store.records()):
                if rec.kind == cands.ENDPOINTS_KIND:
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
        agent = self.agent
        if not self.cfg.wireguard:
            self.backend_reason = "disabled (mesh.wireguard = false)"
            return
        if agent.anchor is None:
            self.backend_reason = "not in a clan yet"
            return
        cap = next((c for c in agent.capabilities if c.name == "wireguard"), None)
        if cap is not None and not cap.available:
            self.backend_reason = cap.reason
            log.info("WireGuard mesh unavailable", extra=kv(reason=cap.reason))
            return
        from .wgnetlink import KernelBackend, choose_backend

        kind, reason = choose_backend()
        if kind is None:
            self.backend_reason = reason
            return
        if kind == "kernel":
            backend: Any = KernelBackend(self.cfg.interface)
        else:
            from .uapi import UserspaceBackend

            backend = UserspaceBackend(self.cfg.interface)
        try:
            await backend.create()
            from . import netlink

            assert self.overlay6 is not None
            await netlink.ensure_address(self.cfg.interface, f"{self.overlay6}/128")
            await netlink.set_link_state(self.cfg.interface, True)
            await netlink.ensure_route(self.cfg.interface, str(clan_subnet(agent.anchor.clan_id)))
        except Exception as exc:  # never fatal: report and run without the mesh
            self.backend_reason = f"could not create {self.cfg.interface}: {exc}"
            log.warning("WireGuard interface not created", extra=kv(error=exc))
            try:
                await backend.destroy()
            except Exception:
                pass
            return
        self.backend = backend
        self.selector = PathSelector(self._self_allows_public(), random.Random())
        log.info(
            "WireGuard interface up",
            extra=kv(interface=self.cfg.interface, backend=backend.kind, overlay=self.overlay6),
        )

    async def _stop_wireguard(self) -> None:
        if self._probe_sock is not None:
            self._probe_sock.close()
            self._probe_sock = None
        if self.backend is not None:
            try:
                await self.backend.destroy()
            except Exception as exc:
                log.warning("could not remove the WireGuard interface", extra=kv(error=exc))
            self.backend = None

    def _self_allows_public(self) -> bool:
        inv = self.agent.inventory.inventory
        if inv is None:
            return True
        me = inv.machine_by_node_key(self.agent.identity.public_key)
        return True if me is None else bool(me.public)

    async def _run_mdns(self) -> None:
        agent = self.agent
        if agent.anchor is None:
            self.mdns_reason = "not in a clan yet"
            return
        gossip = agent.gossip
        if gossip is None or gossip.port is None:
            self.mdns_reason = "gossip is not listening: nothing to advertise"
            return
        try:
            from .mdns import MdnsDiscovery
        except ImportError as exc:
            self.mdns_reason = f"unavailable: {exc}"
            return
        self.mdns = MdnsDiscovery(
            agent.anchor.clan_id,
            agent.identity.public_key,
            gossip.port,
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
        tor = TorService(
            self.agent.cfg.state_path, control_port=control_port, control_socket=control_socket
        )
        self.tor = tor
        gossip = self.agent.gossip
        if gossip is None or gossip.port is None:
            self.tor_reason = "gossip is not listening: nothing to publish as an onion service"
            return
        assert self._nursery is not None
        await self._nursery.start(tor.run, gossip.port)
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

        gossip = self.agent.gossip
        if gossip is None or gossip.port is None:
            return
        host = gossip.listen_host or "0.0.0.0"
        family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
        sock = trio.socket.socket(family, _socket.SOCK_DGRAM)
        try:
            await sock.bind((host, gossip.port))  # the gossip port number, over UDP
        except OSError as exc:
            sock.close()
            log.warning("path probes unavailable", extra=kv(error=exc))
            return
        self._probe_sock = sock
        self.tracker = ProbeTracker(timeout=PROBE_INTERVAL * 2, misses_to_fail=PROBE_MISSES)

    def _box_keys(self) -> dict[bytes, bytes]:
        inv = self.agent.inventory.inventory
        if inv is None:
            return {}
        return {m["node_key"]: m["box_key"] for m in inv.doc["machines"].values()}

    async def _probe_receiver(self) -> None:
        from . import probe

        sock = self._probe_sock
        ident = self.agent.identity
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
            got = self.tracker.answered(pid, sender, time.time())
            if got is None or self.selector is None:
                continue
            sent, rtt = got
            self.stats["probes_answered"] += 1
            cand = self._cands.get((sent.node_key, sent.address))
            if cand is not None:
                before = _path_id(self.selector.current(sent.node_key))
                self.selector.report_success(sent.node_key, cand, rtt, time.time())
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
        ident = self.agent.identity
        pid = self.tracker.sent(node_key, address, time.time())
        data = probe.encode(probe.PING, pid, time.time(), ident.public_key, ident.box_key, box)
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
            await trio.sleep(PROBE_INTERVAL)
            sel = self.selector
            if sel is None:
                continue
            now = time.time()

            def is_current(node_key: bytes, address: str, sel=sel) -> bool:
                cur = sel.current(node_key)
                return cur is not None and cur.address == address

            for p in self.tracker.failures(now, is_current):
                cand = self._cands.get((p.node_key, p.address))
                if cand is None:
                    continue
                before = _path_id(sel.current(p.node_key))
                sel.report_failure(p.node_key, cand, now)
                if before == cand.path_id:
                    log.info(
                        "path failed",
                        extra=kv(peer=p.node_key.hex()[:12], path=f"{cand.kind} {cand.address}"),
                    )
                if _path_id(sel.current(p.node_key)) != before:
                    self.wake()
            targets: set[tuple[bytes, str]] = set()
            for node_key in {k for k, _ in self._cands}:
                cur = sel.current(node_key)
                if cur is not None and cur.kind in ("lan", "public"):
                    targets.add((node_key, cur.address))
            for node_key, cand in sel.probes_due(now):
                if cand.kind in ("lan", "public"):
                    targets.add((node_key, cand.address))
            for node_key, address in targets:
                await self._send_probe(node_key, address)

    # -- our own endpoints -------------------------------------------------------------

    async def _address_loop(self) -> None:
        while True:
            try:
                await self._publish_endpoints()
            except Exception as exc:
                log.warning("could not publish endpoints", extra=kv(error=exc))
            await trio.sleep(ADDRESS_CHECK_INTERVAL)

    async def _publish_endpoints(self) -> None:
        agent = self.agent
        gossip = agent.gossip
        if gossip is None or gossip.port is None or agent.anchor is None:
            return
        from .localaddrs import local_addresses

        host = gossip.listen_host
        if host in ("", "0.0.0.0", "::"):
            ips = await trio.to_thread.run_sync(local_addresses, frozenset({self.cfg.interface}))
        else:
            ips = [host]
        lan = [_join_host_port(ip, gossip.port) for ip in ips]
        sealed_onion = b""
        if self.tor is not None and getattr(self.tor, "onion_address", None):
            inv = agent.inventory.inventory
            if inv is not None:
                from ..inventory.sealing import recipients_of, seal_endpoints

                sealed_onion = seal_endpoints(
                    [f"{self.tor.onion_address}:{gossip.port}"], recipients_of(inv.doc)
                )
        body = cands.endpoints_body(
            lan,
            self.cfg.public_endpoints,
            self.cfg.wg_port if self.backend is not None else None,
            sealed_onion,
        )
        if body != self._published:
            await agent.publish_record(cands.ENDPOINTS_KIND, "", body)
            self._published = body

    # -- reconciling --------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await self.reconcile_once()
            except Exception as exc:  # the next round tries again
                self.stats["errors"] += 1
                log.warning("mesh reconcile failed", extra=kv(error=exc))
            deadline = trio.current_time() + RECONCILE_INTERVAL
            if self.selector is not None:
                nd = self.selector.next_deadline()
                if nd is not None:
                    deadline = min(deadline, trio.current_time() + max(0.5, nd - time.time()))
            with trio.move_on_at(deadline):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            await trio.sleep(0.05)  # batch a burst of changes into one round

    def _candidates(self) -> dict[bytes, list[Candidate]]:
        agent = self.agent
        inv = agent.inventory.inventory
        if inv is None:
            return {}
        opened = agent.inventory_endpoints()
        return cands.collect(
            inv.doc,
            self_key=agent.identity.public_key,
            records=self.records,
            opened_inventory=opened,
            lan_seen=self.lan_seen,
            onions=self.onions,
        )

    async def reconcile_once(self) -> None:
        agent = self.agent
        inv = agent.inventory.inventory
        self.stats["reconciles"] += 1
        if inv is None or self.selector is None or self.backend is None:
            return
        from ..inventory.select import path_preference

        now = time.time()
        doc = inv.doc
        by_key = {m["node_key"]: (name, m) for name, m in doc["machines"].items()}
        all_cands = self._candidates()
        v4 = {}
        if self.cfg.ipv4_range:
            v4 = assign_ipv4(self.cfg.ipv4_range, list(by_key))
        vms = vm_routes(
            doc,
            inv.clan_id,
            ((r.origin, r.key, r.body) for r in agent.store.records() if r.kind == VM_STATUS_KIND),
            self._gone(by_key),
        )
        peers: list[MeshPeer] = []
        for key, (name, m) in sorted(by_key.items()):
            if key == agent.identity.public_key:
                continue
            for c in all_cands.get(key, []):
                self._cands[(key, c.address)] = c
            self.selector.set_candidates(
                key, all_cands.get(key, []), path_preference(doc, name), bool(m["public"]), now
            )
            chosen = self.selector.choose(key, now)
            endpoint = None
            if chosen is not None and chosen.kind in ("lan", "public") and chosen.port_wg:
                endpoint = _join_host_port(_host_of(chosen.address), chosen.port_wg)
            peers.append(
                MeshPeer(
                    m["wg_key"],
                    overlay_ip6(inv.clan_id, key),
                    v4.get(key),
                    endpoint,
                    tuple(vms.get(key, ())),
                )
            )
        desired = desired_from(
            agent.identity.wg_private, agent.identity.wg_public, self.cfg.wg_port, peers
        )
        actual = await self.backend.get()
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
        if self.overlay4 is None and agent.identity.public_key in v4:
            from . import netlink

            self.overlay4 = v4[agent.identity.public_key]
            await netlink.ensure_address(self.cfg.interface, f"{self.overlay4}/32")
            await netlink.ensure_route(self.cfg.interface, self.cfg.ipv4_range)
        self._device = actual if diff.empty else await self.backend.get()
        self._judge_paths(self._device, by_key, now)

    def _judge_paths(self, device: Any, by_key: dict, now: float) -> None:
        """WireGuard handshakes tell whether a chosen direct path works."""
        assert self.selector is not None
        wg_to_node = {m["wg_key"]: key for key, (_, m) in by_key.items()}
        for wg_key, peer in device.peers.items():
            node_key = wg_to_node.get(wg_key)
            if node_key is None or peer.endpoint is None:
                continue
            current = self.selector.current(node_key)
            if current is None:
                continue
            status = device.status.get(wg_key)
            last = status.last_handshake if status is not None else None
            if last is not None and now - last < HANDSHAKE_FRESH:
                self.selector.report_success(node_key, current, self._rtt_of(node_key), now)
            elif (
                self._probe_sock is None
                and now - self._configured_at.get(wg_key, now) > HANDSHAKE_GRACE
            ):
                # Without probes, a missing handshake is the only sign of a dead path.
                self.selector.report_failure(node_key, current, now)
                self._configured_at[wg_key] = now

    def _gone(self, keys: Any) -> frozenset[bytes]:
        """Machines the membership knows to be dead or gone (their VM routes lapse)."""
        from ..gossip.events import MemberState
        from ..identity import node_id_of

        gossip = self.agent.gossip
        if gossip is None or gossip.node is None:
            return frozenset()
        out = set()
        for key in keys:
            info = gossip.node.membership.member(node_id_of(key))
            if info is not None and info.state in (MemberState.DEAD, MemberState.LEFT):
                out.add(key)
        return frozenset(out)

    def _rtt_of(self, node_key: bytes) -> float:
        from ..identity import node_id_of

        gossip = self.agent.gossip
        if gossip is not None and gossip.node is not None:
            info = gossip.node.membership.member(node_id_of(node_key))
            if info is not None and info.rtt is not None:
                return info.rtt
        return 0.001

    # -- views ------------------------------------------------------------------------

    def explain(self, machine: str) -> dict[str, Any]:
        inv = self.agent.inventory.inventory
        if inv is None or machine not in inv.machines:
            raise KeyError(machine)
        m = inv.doc["machines"][machine]
        key = m["node_key"]
        handshake = None
        if self._device is not None:
            status = self._device.status.get(m["wg_key"])
            handshake = None if status is None else status.last_handshake
        out: dict[str, Any] = {
            "machine": machine,
            "overlay6": str(overlay_ip6(inv.clan_id, key)),
            "wireguard": self.backend is not None,
            "handshake": handshake is not None and time.time() - handshake < HANDSHAKE_FRESH,
            "tor_socks": _socks_text(self.tor),
            "mesh_stats": dict(self.stats),
        }
        if self.selector is None:
            # No WireGuard: still rank what we know, for gossip and ssh.
            from ..inventory.select import path_preference

            sel = PathSelector(self._self_allows_public(), random.Random(0))
            sel.set_candidates(
                key,
                self._candidates().get(key, []),
                path_preference(inv.doc, machine),
                bool(m["public"]),
                time.time(),
            )
            out.update(sel.explain(key, time.time()))
        else:
            out.update(self.selector.explain(key, time.time()))
        return out
