"""The composition root: builds every part from the config and runs them.

Owns: start-up order (identity, store, capabilities, control socket, then
the network parts), the one trio nursery everything runs in, sd_notify and
the watchdog, and a clean stop.  Must never: let one part's failure to
start (no tor, no root) stop the others; it reports it as a capability.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from . import __version__
from ._eventbus import EventBus
from ._log import kv
from ._sdnotify import Notifier, watchdog_interval
from .capabilities import Capability, probe_all
from .config import Config
from .control.server import ControlServer
from .gossip.config import RecordLimits
from .identity import Identity, load_or_create
from .inventory.anchor import Anchor, load_anchor, save_anchor
from .inventory.manager import InventoryManager
from .ports import NodeMembership, Ports, Subscriptions
from .publish_policy import PublishGate
from .record_checks import RecordChecker
from .records import is_durable, min_interval
from .store import Store
from .wire import SignedRecord

__all__ = ["Agent"]

log = logging.getLogger("clanagent.agent")

LOGS_ASK_INTERVAL = 1.0  # seconds between two console-tail requests of ours for one VM


class TrioClock:
    """The Clock port: trio's clock for intervals, the system clock for timestamps."""

    def now(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return time.time()


class AgentBus:
    """The RecordBus port: our records go out through `publish` (the agent's
    body check, then gossip), never one (kind, key) faster than its kind's
    min_interval (`PublishGate`: a publisher that asks sooner waits, on
    trio's clock); stored records come back to subscribers by kind through
    `subscriptions.dispatch`. The whole-agent simulator uses it too."""

    def __init__(
        self,
        publish: Callable[..., Awaitable[bool]],
        rng: random.Random | None = None,
    ) -> None:
        self._publish = publish
        self.subscriptions = Subscriptions()
        self.gate = PublishGate(min_interval, rng or random.Random())

    async def publish(self, kind: str, key: str, body: Any, *, push: bool = True) -> bool:
        wait = self.gate.wait(trio.current_time(), kind, key)
        if wait > 0:
            await trio.sleep(wait)
        self.gate.published(trio.current_time(), kind, key)
        return await self._publish(kind, key, body, push=push)

    def subscribe(self, kinds: Any, handler: Any) -> None:
        self.subscriptions.subscribe(kinds, handler)


class Agent:
    def __init__(self, cfg: Config, *, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.events_bus = EventBus()
        self.identity: Identity | None = None
        self.store: Store | None = None
        self.capabilities: list[Capability] = []
        self.control: ControlServer | None = None
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.name = cfg.gossip.name or socket.gethostname()
        self.gossip: Any = None  # the gossip service, once it runs
        self.anchor: Anchor | None = None
        self.inventory = InventoryManager(None)
        self._gossip_scope: trio.CancelScope | None = None
        self.mesh: Any = None  # the mesh service, once it runs
        self.services: Any = None  # service wiring, once in a clan
        self.secrets: Any = None  # secrets, once in a clan
        self.vms: Any = None  # this machine's micro VMs, once in a clan
        self.topology: Any = None  # publishes our links; the clan map (once in a clan)
        self.web: Any = None  # the web console, once enabled (config or `clanctl ui`)
        self._stopping = trio.Event()
        self._nursery: trio.Nursery | None = None
        # Held while the network parts start and while a clan change restarts
        # gossip: a `clan init` that arrives while the first start is still
        # under way (the control socket serves before the parts are up) waits
        # for it instead of cancelling a gossip run that has not started yet.
        self._parts_lock = trio.Lock()
        # Record body checks (clanagent.records): peers' records and our own.
        self.records = RecordChecker(
            wall=time.time,
            inventory=lambda: self.inventory.inventory,
            store=lambda: self.store,
            identity=lambda: self.identity,
            clan=lambda: self.anchor.clan_id if self.anchor else b"",
        )
        self._logs_asked: dict[str, float] = {}  # VM -> monotonic time of our last logs request
        self.bus = AgentBus(self.publish_record)
        # over whichever gossip node runs now (a clan change restarts gossip)
        self.membership = NodeMembership(lambda: None if self.gossip is None else self.gossip.node)
        self.ports: Ports | None = None  # built in run(), once identity and store exist

    # -- AgentView (the control API calls these) ----------------------------

    def capability_rows(self) -> list[dict[str, Any]]:
        """What this machine can do, one row a capability (status and topology show it)."""
        caps = [c.to_wire() for c in self.capabilities]
        if self.gossip is not None:
            caps.append(self.gossip.capability().to_wire())
        if self.mesh is not None:
            caps += [c.to_wire() for c in self.mesh.capabilities()]
        if self.vms is not None:
            caps.append(self.vms.capability().to_wire())
        if self.web is not None:
            caps.append(self.web.capability().to_wire())
        else:
            off = (
                "starting"
                if self.cfg.web.enabled
                else "off: 'clanctl ui' starts it for this run (or set web.enabled = true)"
            )
            caps.append(Capability("web", False, off).to_wire())
        return caps

    def status(self) -> dict[str, Any]:
        assert self.identity is not None
        caps = self.capability_rows()
        return {
            "node_id": self.identity.node_id,
            "short_id": self.identity.short_id,
            "name": self.name,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "started_at": self.started_wall,
            "state_dir": str(self.cfg.state_dir),
            "control_socket": str(self.cfg.control.socket),
            "records": len(self.store) if self.store is not None else 0,
            "members": self.gossip.member_counts() if self.gossip is not None else {},
            "gossip_addr": self.gossip.addr if self.gossip is not None else "",
            "clan": None
            if self.anchor is None
            else {"id": self.anchor.clan_id.hex(), "name": self.anchor.name},
            "capabilities": caps,
            "counters": self.counters(),
        }

    def counters(self) -> dict[str, dict[str, int]]:
        """Each part's limit and fault counters (`clanctl status` shows them).

        Built from memory only, so `status` still answers at the fd limit."""
        out: dict[str, dict[str, int]] = {}
        for name, part in (("control", self.control), ("gossip", self.gossip), ("web", self.web)):
            counters = getattr(part, "counters", None)
            if callable(counters):
                out[name] = dict(counters())
        records = self.record_counters()
        if self.store is not None:
            records.update({f"store_{k}": v for k, v in self.store.stats.items()})
        out["records"] = records
        return out

    def whoami(self) -> dict[str, Any]:
        ident = self.identity
        assert ident is not None
        from .identity import wg_key_base64

        return {
            "node_id": ident.node_id,
            "short_id": ident.short_id,
            "name": self.name,
            "signing_key": ident.public_key.hex(),
            "box_key": ident.box_public.hex(),
            "wireguard_key": wg_key_base64(ident.wg_public),
        }

    def peers(self) -> list[dict[str, Any]]:
        if self.gossip is None:
            return []
        return self.gossip.peer_table()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        async for event in self.events_bus.subscribe():
            yield event

    # -- inventory (the control API calls these) -----------------------------

    def inventory_show(self) -> dict[str, Any]:
        from .inventory import views

        return views.show(self.inventory)

    def inventory_history(self) -> list[dict[str, Any]]:
        from .inventory import views

        return views.history(self.inventory)

    def inventory_conflicts(self) -> list[dict[str, Any]]:
        from .inventory import views

        return views.conflicts(self.inventory)

    def machines(self) -> list[dict[str, Any]]:
        from .inventory import views

        assert self.identity is not None
        states = views.member_states(
            self.inventory, self.membership.rows(), self.identity.public_key
        )
        return views.machines(self.inventory, states)

    async def inventory_submit(self, version_wire: Any, init: bool) -> dict[str, Any]:
        from .control.protocol import ControlError, ErrorCode
        from .inventory.versions import InventoryVersion, OfferStatus
        from .wire import WireError

        def refuse(msg: str) -> ControlError:
            return ControlError(ErrorCode.INVALID_PARAMS, msg)

        try:
            version = InventoryVersion.from_wire(version_wire)
        except WireError as exc:
            raise refuse(f"malformed inventory version: {exc.reason}") from None
        if init:
            if self.anchor is not None:
                raise refuse(
                    f"this agent already belongs to clan '{self.anchor.name}' "
                    f"({self.anchor.clan_id.hex()})"
                )
            if version.parents:
                raise refuse("a new clan starts with a version that has no parents")
            clan = version.doc.get("clan") if isinstance(version.doc, dict) else None
            if not isinstance(clan, dict):
                raise refuse("the first version has no [clan] section")
            anchor = Anchor(clan["id"], clan["name"], tuple(clan["admins"]))
            trial = InventoryManager(anchor).offer_version(version)
            if trial is None or trial.status is OfferStatus.REJECTED:
                detail = "" if trial is None else f"{trial.reason}: {trial.detail}"
                raise refuse(f"inventory rejected: {detail}")
            await self.set_anchor(anchor)
        if self.inventory.history is None:
            raise refuse(
                "this agent is not in a clan yet: run 'clanctl clan init NAME' to found one "
                "or 'clanagent join TOKEN' to join one"
            )
        result = self.inventory.offer_version(version)
        assert result is not None
        if result.status is OfferStatus.REJECTED:
            raise refuse(f"inventory rejected: {result.reason}: {result.detail}")
        if result.status is not OfferStatus.DUPLICATE:
            await self.publish_record("inventory", version.hash.hex(), version.to_wire())
        head = self.inventory.head
        return {
            "status": result.status.value,
            "hash": version.hash,
            "leaves": [] if head is None else list(head.leaves),
            "conflicts": 0 if head is None else len(head.conflicts),
        }

    def inventory_endpoints(self) -> dict[str, list[str]]:
        """Every machine's endpoints this member can read (for resealing on apply)."""
        from .inventory.sealing import open_doc_endpoints

        head = self.inventory.head
        if head is None or head.doc is None:
            return {}
        assert self.identity is not None
        return open_doc_endpoints(head.doc, self.identity.public_key, self.identity.box_key)

    def invite(self, machine: str) -> dict[str, Any]:
        from .control.protocol import ControlError, ErrorCode
        from .inventory.token import make_token

        inv = self.inventory.inventory
        if self.anchor is None or inv is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        if machine not in inv.machines:
            raise ControlError(
                ErrorCode.INVALID_PARAMS,
                f"no machine '{machine}' in the inventory: add it with 'clanctl machine add'",
            )
        seeds: list[str] = []
        if self.gossip is not None and self.gossip.addr and ":" in self.gossip.addr:
            if not self.gossip.addr.startswith("outbound-only"):
                seeds.append(self.gossip.addr)
            if self.gossip.node is not None:
                seeds += [
                    m["addr"]
                    for m in self.gossip.node.members()
                    if m["state"] == "alive" and not m["self"]
                ]
        seeds += list(self.anchor.seeds)
        seeds = list(dict.fromkeys(seeds))[:16]
        token = make_token(
            self.anchor.clan_id, self.anchor.name, list(self.anchor.admins), seeds, machine
        )
        return {"token": token, "machine": machine, "seeds": seeds}

    # -- inventory hooks (the gossip service asks these) ---------------------

    def admit_peer(self, public_key: bytes) -> bool | None:
        return self.inventory.admit_peer(public_key)

    def admit_record(self, rec: SignedRecord) -> bool | None:
        return self.inventory.admit_record(rec)

    def on_record(self, rec: SignedRecord) -> None:
        """A record was stored (ours or a peer's): tell the parts that care."""
        self.bus.subscriptions.dispatch(rec)

    def on_member_changed(self) -> None:
        """Someone joined, left or failed: who generates which secret may change."""
        self.membership.changed()

    async def vm_request(self, body: Any) -> dict[str, Any]:
        """An admin's signed start/stop/restart order: check it, then gossip it."""
        import time as _time

        from .control.protocol import ControlError, ErrorCode
        from .vmhost.requests import MAX_SKEW, REQUEST_KIND, parse_request
        from .wire import WireError

        inv = self.inventory.inventory
        if inv is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        try:
            req = parse_request(body, frozenset(inv.doc["clan"]["admins"]))
        except WireError as exc:
            raise ControlError(ErrorCode.PERMISSION_DENIED, exc.reason) from None
        if req.vm not in inv.doc["vms"]:
            raise ControlError(ErrorCode.INVALID_PARAMS, f"no VM '{req.vm}' in the inventory")
        if abs(_time.time() - req.at) > MAX_SKEW:
            raise ControlError(
                ErrorCode.INVALID_PARAMS, "the request is too old (or the clock is off)"
            )
        await self.publish_record(REQUEST_KIND, req.vm, req.to_wire())
        from .inventory.select import placement

        return {"vm": req.vm, "action": req.action, "hosts": placement(inv.doc, req.vm)}

    async def vm_logs(self, name: str, since: int) -> dict[str, Any]:
        """A VM's console tail: read here when it runs here, else asked of its host.

        Returns {"tail", "machine", "at"} once a tail at least as new as
        `since` is known, or {"pending": True} after publishing a request
        (clanctl asks again until the host's answer has arrived)."""
        import time as _time

        from .control.protocol import ControlError, ErrorCode
        from .vmhost.service import LOGS_KIND, LOGS_REQUEST_KIND

        inv = self.inventory.inventory
        if inv is None or self.vms is None:
            raise ControlError(
                ErrorCode.UNAVAILABLE,
                "the inventory has not arrived yet" if self.anchor else "not in a clan yet",
            )
        if name not in inv.doc["vms"]:
            raise ControlError(ErrorCode.INVALID_PARAMS, f"no VM '{name}' in the inventory")
        me = inv.machine_by_node_key(self.identity.public_key)
        if name in self.vms.handles:
            tail = await trio.to_thread.run_sync(self.vms.local_tail, name)
            return {"tail": tail or b"", "machine": me.name if me else "", "at": int(_time.time())}
        from .records import placed_on

        # A read: what we ask of the host is bounded.  `since` never runs
        # ahead of our clock (a request "newer than the future" would let the
        # host's answer stand for every later one, freezing the tail
        # clan-wide), and we ask at most once per LOGS_ASK_INTERVAL per VM.
        now = int(_time.time())
        since = min(since, now)
        hosts = placed_on(inv, name) or frozenset()
        best = None
        for origin in hosts:
            rec = self.store.get(origin, LOGS_KIND, name)
            m = inv.machine_by_node_key(origin)
            # Only the hosting machine's own word about its VM counts.
            if rec is None or m is None or not isinstance(rec.body, dict):
                continue
            at = rec.body.get("at")
            if rec.body.get("machine") != m.name or type(at) is not int:
                continue
            if best is None or at > best["at"]:
                best = {"tail": rec.body.get("tail", b""), "machine": m.name, "at": at}
        if best is not None and best["at"] >= since:
            return best
        mine = self.store.get(self.identity.public_key, LOGS_REQUEST_KIND, name)
        asked = self._logs_asked.get(name)
        mono = _time.monotonic()
        if (mine is None or not isinstance(mine.body, dict) or mine.body.get("at", 0) < since) and (
            asked is None or mono - asked >= LOGS_ASK_INTERVAL
        ):
            self._logs_asked[name] = mono
            await self.publish_record(LOGS_REQUEST_KIND, name, {"at": since})
        return {"pending": True}

    @asynccontextmanager
    async def vm_console(self, body: Any) -> AsyncIterator[Any]:
        """A byte stream to a VM's serial console, wherever in the clan it runs.

        `body` is an admin-signed console request naming the VM and its host;
        the host checks it again (signature, freshness, nonce)."""
        from .control.protocol import ControlError, ErrorCode
        from .vmhost.attach import open_remote
        from .vmhost.requests import parse_console
        from .vmhost.spec import VmHostLocalError
        from .wire import WireError

        inv = self.inventory.inventory
        if inv is None or self.vms is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        try:
            req = parse_console(body, frozenset(inv.doc["clan"]["admins"]))
        except WireError as exc:
            raise ControlError(ErrorCode.PERMISSION_DENIED, exc.reason) from None
        if req.vm not in inv.doc["vms"]:
            raise ControlError(ErrorCode.INVALID_PARAMS, f"no VM '{req.vm}' in the inventory")
        host = inv.machines.get(req.machine)
        if host is None:
            raise ControlError(ErrorCode.INVALID_PARAMS, f"no machine '{req.machine}'")
        try:
            if req.machine == self.vms.my_machine():
                try:
                    self.vms.admit_console(req)  # the signature was checked above
                except WireError as exc:
                    raise ControlError(ErrorCode.PERMISSION_DENIED, exc.reason) from None
                cm = self.vms.console(req.vm)
            else:
                from .mesh.overlay import overlay_ip6

                port = self.cfg.mesh.console_port
                if self.mesh is None or self.mesh.backend is None or not port:
                    raise ControlError(
                        ErrorCode.UNAVAILABLE,
                        f"VM {req.vm} runs on {req.machine}, and reaching its console needs "
                        "the WireGuard mesh, which is not up here (see 'clanctl status')",
                    )
                addr = str(overlay_ip6(inv.clan_id, host.node_key))
                cm = open_remote(addr, port, req.to_wire())
            async with cm as stream:
                yield stream
        except VmHostLocalError as exc:
            raise ControlError(ErrorCode.UNAVAILABLE, str(exc)) from None

    def vm_list(self) -> list[dict[str, Any]]:
        return [] if self.vms is None else self.vms.clan_vms()

    def secrets_rows(self) -> list[dict[str, Any]]:
        return [] if self.secrets is None else self.secrets.rows()

    async def secrets_rotate(self, instance_id: str) -> dict[str, Any]:
        from .control.protocol import ControlError, ErrorCode

        if self.secrets is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        try:
            return await self.secrets.request_rotation(instance_id)
        except KeyError as exc:
            raise ControlError(ErrorCode.INVALID_PARAMS, str(exc.args[0])) from None

    def services_view(self) -> list[dict[str, Any]]:
        if self.services is None:
            return []
        return self.services.view()

    def path(self, machine: str) -> dict[str, Any]:
        from .control.protocol import ControlError, ErrorCode

        if self.inventory.inventory is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "this agent is not in a clan yet")
        try:
            if self.mesh is None:  # not running: rank what is known, change nothing
                from .mesh.service import explain_path

                assert self.ports is not None
                return explain_path(
                    self.ports, machine=machine, inventory_endpoints=self.inventory_endpoints
                )
            return self.mesh.explain(machine)
        except KeyError:
            raise ControlError(
                ErrorCode.INVALID_PARAMS, f"no machine '{machine}' in the inventory"
            ) from None

    # -- topology and the web console (the control API calls these) ---------------

    def topology_view(self) -> dict[str, Any]:
        return (self.topology or self._topology_service()).view()

    def _topology_service(self) -> Any:
        from .topology import TopologyService

        def path_kind(node_key: bytes) -> str | None:
            current = getattr(self.mesh, "selector", None)
            current = None if current is None else current.current(node_key)
            return None if current is None else current.kind

        assert self.ports is not None
        return TopologyService(
            self.ports,
            name=self.name,
            machines=self.machines,
            vms=self.vm_list,
            capabilities=self.capability_rows,
            path_kind=path_kind,
        )

    async def ui_open(self, admin_key: str = "") -> dict[str, Any]:
        """Start the web console (if needed) and mint a one-time login URL."""
        from .control.protocol import ControlError, ErrorCode
        from .web import WebConsole
        from .web.auth import LOGIN_TTL

        if admin_key and not os.path.isabs(admin_key):
            raise ControlError(ErrorCode.INVALID_PARAMS, "'admin_key' must be an absolute path")
        if self._nursery is None:
            raise ControlError(ErrorCode.UNAVAILABLE, "the agent is still starting; try again")
        if self.web is None:
            self.web = WebConsole(self)
        signer = self._signer_for(admin_key)
        port = await self.web.ensure_running(self._nursery)
        url = self.web.login_url(self.web.app.clock(), signer)
        from .web.actions import SIGNER

        SIGNER.set(signer)
        key, why = await trio.to_thread.run_sync(self.web.keys.load)
        return {
            "url": url,
            "port": port,
            "expires_in": LOGIN_TTL,
            "admin_key": {
                "available": key is not None,
                "reason": why,
                "path": signer[0] if signer else "",
            },
        }

    def _signer_for(self, admin_key: str) -> tuple[str, int | None] | None:
        """The admin key a new web session may sign with, for whoever runs `clanctl ui`.

        Root and the agent's own user may name any file, or fall back on
        web.admin_key / the default path.  Anyone else (a member of the
        control group) signs only with a key file they own: the agent runs
        as root and must not lend them another user's key."""
        from .control.server import CURRENT_PEER

        peer = CURRENT_PEER.get(None)
        trusted = peer is None or peer.uid in (0, os.getuid())
        if trusted:
            if admin_key:
                return admin_key, None
            assert self.web is not None
            return str(self.web.keys.default_path()), None
        if not admin_key:
            return None
        return admin_key, peer.uid

    def _inventory_changed(self, inv: Any) -> None:
        self.events_bus.publish(
            "inventory.head",
            machines=sorted(inv.machines),
            hash=inv.hash.hex(),
        )
        if self.gossip is not None:
            self.gossip.on_inventory(inv.node_keys())

    # -- record bodies (clanagent.records, checked by clanagent.record_checks) ------

    def validate_record(self, record: SignedRecord) -> None:
        """The gossip node's `validate=` hook (RecordChecker.validate)."""
        self.records.validate(record)

    @property
    def record_stats(self) -> dict[str, int]:
        return self.records.stats

    def record_counters(self) -> dict[str, int]:
        """Record body checks: checked, refused, deferred (transient), own_refusals."""
        return dict(self.records.stats)

    def check_own_record(self, kind: str, key: str, body: Any) -> bool:
        """Would our peers take this record of ours?  False (counted, logged once) if not."""
        return self.records.check_own(kind, key, body)

    async def publish_record(self, kind: str, key: str, body: Any, *, push: bool = True) -> bool:
        """Store a record of ours and gossip it (store only, when gossip is off).

        The record passes the same body check as a peer's first: one our
        peers would refuse is not published (False, counted in
        record_stats["own_refusals"])."""
        if not self.check_own_record(kind, key, body):
            return False
        gossip = self.gossip
        if (
            gossip is not None
            and gossip.node is not None
            and (self.anchor is None or gossip.clan == self.anchor.clan_id)
        ):
            gossip.publish(kind, key, body, push=push)
            return True
        assert self.store is not None and self.identity is not None
        store, ident = self.store, self.identity
        clan = self.anchor.clan_id if self.anchor else b""
        rec = SignedRecord.create(
            ident, kind, key, store.max_version(ident.public_key) + 1, body, clan=clan
        )
        await trio.to_thread.run_sync(store.put, rec)
        return True

    async def set_anchor(self, anchor: Anchor) -> None:
        """Join (or found) a clan: remember it and restart gossip under its id.

        All under the parts lock: a first start still under way must not see
        the new anchor before gossip runs under it (it started the mesh on
        the old gossip node, which signed our endpoints record with the
        default clan id; peers refused it, scored us down and never learned
        our WireGuard port)."""
        async with self._parts_lock:
            await trio.to_thread.run_sync(save_anchor, self.cfg.state_path, anchor)
            self.inventory.set_anchor(anchor)
            self.anchor = anchor
            log.info("clan set", extra=kv(clan=anchor.clan_id.hex(), name=anchor.name))
            if self._gossip_scope is not None:
                self._gossip_scope.cancel()
            await self._drop_other_clans(anchor.clan_id)
            if self._nursery is not None:
                await self._start_gossip(self._nursery)

    async def _drop_other_clans(self, clan_id: bytes) -> None:
        """Forget records signed for another clan (ours from before a clan
        init, or from an older bug): peers refuse them and score the sender
        down, and our own would never be republished (same body)."""
        assert self.store is not None
        store = self.store

        def drop() -> int:
            stale = [r for r in store.records() if r.clan != clan_id]
            return sum(store.delete(r.origin, r.kind, r.key) for r in stale)

        dropped = await trio.to_thread.run_sync(drop)
        if dropped:
            log.info("dropped records of another clan", extra=kv(records=dropped))

    # -- lifecycle ----------------------------------------------------------

    def make_ports(self) -> Ports:
        """The ports every part gets (once identity, store and inventory exist)."""
        assert self.identity is not None and self.store is not None
        return Ports(
            clock=TrioClock(),
            identity=self.identity,
            store=self.store,
            bus=self.bus,
            members=self.membership,
            inventory=self.inventory,
            events=self.events_bus,
        )

    def stop(self) -> None:
        self._stopping.set()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await trio.sleep(interval)

    async def _start_parts(self, nursery: trio.Nursery) -> None:
        """Start the network parts; each one that cannot run is reported, not fatal."""
        async with self._parts_lock:
            await self._start_gossip(nursery)

    async def _start_web(self, nursery: trio.Nursery) -> None:
        from .control.protocol import ControlError
        from .web import WebConsole

        self.web = WebConsole(self)
        try:
            await self.web.ensure_running(nursery)
        except ControlError:
            pass  # logged and shown in `clanctl status`; the agent runs on

    async def _start_gossip(self, nursery: trio.Nursery) -> None:
        from .gossip.service import GossipService

        seeds = self.cfg.gossip.join or (self.anchor.seeds if self.anchor else ())
        if not (self.cfg.gossip.listen or seeds):
            return
        assert self.identity is not None and self.store is not None
        self.gossip = GossipService(
            self.cfg.gossip,
            identity=self.identity,
            store=self.store,
            name=self.name,
            state_path=self.cfg.state_path,
            anchor=self.anchor,
            admit_peer=self.admit_peer,
            admit_record=self.admit_record,
            validate=self.validate_record,
            on_record=self.on_record,
            on_member_changed=self.on_member_changed,
            events=self.events_bus,
            tor=lambda: None if self.mesh is None else self.mesh.tor,
        )

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            with trio.CancelScope() as scope:
                self._gossip_scope = scope
                await self.gossip.run(task_status=task_status)

        await nursery.start(run)
        inv = self.inventory.inventory
        if inv is not None:
            self.gossip.on_inventory(inv.node_keys())
        await self._start_mesh(nursery)

    async def _start_mesh(self, nursery: trio.Nursery) -> None:
        from .mesh.service import GossipEndpoint, MeshService

        if self.anchor is None or self.mesh is not None:
            return

        def gossip_listening() -> tuple[str, int] | None:
            g = self.gossip  # the current one: a clan change restarts gossip
            return None if g is None or g.port is None else (g.listen_host, g.port)

        def gossip_add_seed(addr: str) -> None:
            if self.gossip is not None:
                self.gossip.add_seed(addr)

        assert self.ports is not None
        self.mesh = MeshService(
            self.ports,
            cfg=self.cfg.mesh,
            state_path=self.cfg.state_path,
            capabilities=self.capabilities,
            gossip_endpoint=GossipEndpoint(gossip_listening, gossip_add_seed),
            inventory_endpoints=self.inventory_endpoints,
        )
        await nursery.start(self.mesh.run)
        from .services.service import ServicesService

        assert self.ports is not None
        self.services = ServicesService(self.ports, runtime_dir=self.cfg.runtime_dir)
        await nursery.start(self.services.run)
        from .secrets.service import SecretsService

        self.secrets = SecretsService(
            self.ports,
            runtime_dir=self.cfg.runtime_dir,
            default_owner=self.cfg.secrets_owner,
            on_public_files_changed=self.services.wake,
        )
        await nursery.start(self.secrets.run)
        from .vmhost.service import VmService

        assert self.ports is not None
        self.vms = VmService(
            self.ports,
            state_dir=self.cfg.state_dir,
            runtime_dir=self.cfg.runtime_dir,
            clan_interface=self.cfg.mesh.interface,
            console_port=self.cfg.mesh.console_port,
            wireguard=self.cfg.mesh.wireguard,
            overlay6=lambda: None if self.mesh is None else self.mesh.overlay6,
        )
        await nursery.start(self.vms.run)
        self.topology = self._topology_service()
        await nursery.start(self.topology.run)
        await nursery.start(self.vms.serve_consoles)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.cfg
        state = cfg.state_path
        self.identity, created = await trio.to_thread.run_sync(load_or_create, state)
        if created:
            log.info("generated node keys", extra=kv(state_dir=state))
        g = self.cfg.gossip
        quota = RecordLimits(
            g.max_records_per_origin, g.max_bytes_per_origin, g.max_records, g.max_bytes
        )
        self.store = await trio.to_thread.run_sync(
            functools.partial(Store.open, state / "records", quota=quota, durable=is_durable)
        )
        self.anchor = await trio.to_thread.run_sync(load_anchor, state)
        if self.anchor is not None:
            await self._drop_other_clans(self.anchor.clan_id)
        self.inventory = InventoryManager(self.anchor)
        self.inventory.listeners.append(self._inventory_changed)
        # Every version we ever accepted is in the store: rebuild the head from it.
        await trio.to_thread.run_sync(self.inventory.load, list(self.store.records()))
        self.ports = self.make_ports()
        self.capabilities = await trio.to_thread.run_sync(probe_all)
        for cap in self.capabilities:
            if not cap.available:
                log.info("capability unavailable", extra=kv(name=cap.name, reason=cap.reason))
        self.control = ControlServer(Path(cfg.control.socket), self, cfg.control)
        self.control.bind()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.control.serve)
            await self._start_parts(nursery)
            if cfg.web.enabled:
                await self._start_web(nursery)
            wd = watchdog_interval()
            if wd:
                nursery.start_soon(self._watchdog, wd)
            self.notifier.notify("READY=1", f"STATUS=node {self.identity.short_id} running")
            log.info(
                "agent started",
                extra=kv(
                    node=self.identity.short_id,
                    version=__version__,
                    control=cfg.control.socket,
                    records=len(self.store),
                ),
            )
            self.events_bus.publish("agent.started", node_id=self.identity.node_id)
            task_status.started(self)
            await self._stopping.wait()
            self.notifier.notify("STOPPING=1")
            log.info("agent stopping")
            self.events_bus.publish("agent.stopping")
            self.events_bus.close()
            # Give event streams a moment to deliver the last events and end.
            with trio.move_on_after(0.5):
                while self.events_bus.subscribers:
                    await trio.sleep(0.01)
            if self.web is not None:
                self.web.stop()
            if self.gossip is not None:
                with trio.move_on_after(min(1.0, cfg.shutdown_timeout / 2)):
                    await self.gossip.leave()
            nursery.cancel_scope.cancel()
        log.info("agent stopped")
