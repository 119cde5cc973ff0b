"""The VM service: the trio shell that runs this machine's share of the clan's VMs.

Owns: turning the inventory's placement into checked VM specs, adopting VMs
that still run from an earlier agent (an agent restart never kills a VM),
running the lifecycle reconciler against a backend (start, graceful stop,
restart with backoff), rotating console logs, and publishing a `vm-status`
record per VM so every machine's `clanctl vm list` shows the whole clan.
A VM on the "clan" network gets its overlay address (mesh.overlay.vm_ip6)
in its spec, and its record names that address ("overlay") while it runs:
that is what makes every other machine route the address here.
Must never: kill a VM it did not start or adopt, or let one bad declaration
stop the others (it is reported as that VM's error), or reach into another
part: it sees the rest of the agent through its ports (clanagent.ports) and
the mesh through the one callable it is given (`overlay6`).

Which backends it has is the caller's choice (`backends=`): the agent
probes the real VMMs (`probe_backends`); the whole-agent simulator hands in
an in-memory one (tests/_fake_vm_backend.py).
"""

from __future__ import annotations

import functools
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._log import kv
from ..records import spec
from .backend import Backend, RunDir, process_started_at
from .console import ConsoleLog
from .lifecycle import (
    AdoptVm,
    Reconciler,
    ReportError,
    RestartVm,
    StartVm,
    StopVm,
    VmExited,
    VmStarted,
    VmStartFailed,
    VmStopped,
)
from .spec import (
    CLAN_NETWORK,
    HostLimits,
    VmHostError,
    VmHostLocalError,
    VmSpec,
    VmSpecError,
    check_spec,
)

if TYPE_CHECKING:
    from ..ports import Ports

__all__ = ["BackendChoice", "VmService", "VM_STATUS_KIND", "probe_backends"]

log = logging.getLogger("clanagent.vmhost")

VM_STATUS_KIND = "vm-status"
LOGS_REQUEST_KIND = "vm-logs-request"  # key = VM name; body {"at": unix}
LOGS_KIND = "vm-logs"  # key = VM name; body {"at", "machine", "tail"}
LOG_TAIL = 16 * 1024  # records.MAX_LOG_TAIL bounds a peer's
LOGS_ANSWER_INTERVAL = 1.0  # seconds between two published tails of one VM
TICK = 2.0

# The usable backends by name (the first, or "qemu" when there, is the
# default) and, for every other one, why it is not usable here.
BackendChoice = tuple[dict[str, Backend], dict[str, str]]


def probe_backends(clan_interface: str = "") -> BackendChoice:
    """The real VMMs this machine can run (blocks: call it in a thread)."""
    from .cloudhv import CloudHypervisorBackend
    from .firecracker import FirecrackerBackend
    from .network import VmNetwork
    from .qemu import QemuBackend

    usable: dict[str, Backend] = {}
    unusable: dict[str, str] = {}
    # One network for all three: every backend's VMs get the same taps, clan
    # route and policy rules.
    network = VmNetwork(clan_interface=clan_interface)
    qemu = QemuBackend(network=network)
    if qemu.available():
        usable["qemu"] = qemu
    else:
        unusable["qemu"] = "no qemu-system-x86_64 on PATH (apt install qemu-system-x86)"
    for other in (FirecrackerBackend(network=network), CloudHypervisorBackend(network=network)):
        ok, why = other.available()
        if ok:
            usable[other.name] = other
        else:
            unusable[other.name] = why
    return usable, unusable


def _overlay_of(inv: Any, vm: str) -> str:
    """The VM's overlay address when the inventory puts it on the clan network, else ""."""
    if inv is None or CLAN_NETWORK not in inv.doc["vms"].get(vm, {}).get("networks", ()):
        return ""
    from ..mesh.overlay import vm_ip6

    return str(vm_ip6(inv.clan_id, vm))


class VmService:
    """This machine's VMs: `run` reconciles them, `serve_consoles` serves their consoles.

    `backends` returns the usable backends and why the others are not (it
    is called once, in a worker thread); `host_limits` what this machine
    can give a VM; `overlay6` our overlay address once the mesh has one
    (None: no mesh, or not yet); `run_sync` runs the file work (probe,
    run dirs, console logs, secrets) off the event loop -- a worker thread
    here, inline in the simulator, where a thread would let its MockClock
    jump while the work runs; `rng` jitters the status refresh (a seeded one
    makes a simulation repeatable)."""

    def __init__(
        self,
        ports: Ports,
        *,
        state_dir: str | os.PathLike[str],
        runtime_dir: str | os.PathLike[str],
        backends: Callable[[], BackendChoice] | None = None,
        host_limits: Callable[[], HostLimits] = HostLimits.probe,
        clan_interface: str = "",
        console_port: int = 0,
        wireguard: bool = False,
        overlay6: Callable[[], Any] | None = None,
        run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
        rng: random.Random | None = None,
    ) -> None:
        from .requests import REQUEST_KIND

        self.ports = ports
        self.base = Path(state_dir) / "vms"  # disks and logs: not a tmpfs
        self.runtime_dir = Path(runtime_dir)
        self._probe = backends or functools.partial(probe_backends, clan_interface)
        self._host_limits = host_limits
        self.console_port = console_port
        self.wireguard = wireguard
        self._overlay6 = overlay6
        self._run_sync = run_sync
        self._rng = rng or random.Random()
        self.reconciler = Reconciler()
        self.handles: dict[str, Any] = {}
        self.backend: Any = None  # the default backend ("auto")
        self.backends: dict[str, Any] = {}  # usable backends by name
        self.unusable: dict[str, str] = {}  # backend name -> why not
        self.backend_reason = "not started"
        self._wakeup = trio.Event()
        self._published: dict[str, dict] = {}
        self._refresh_due: dict[str, float] = {}  # VM -> when its status is republished
        self._errors: dict[str, str] = {}
        self._held: set[str] = set()  # stopped by an admin: not started again
        self._restarted: dict[str, int] = {}  # vm -> time of the restart request acted on
        self._overlay: dict[str, str] = {}  # vm -> its overlay address (clan network only)
        self._boot_times: dict[int, int] = {}  # pid -> unix time it started
        self._consoles: set[str] = set()  # VMs with an interactive console session open
        self._logs_answered: dict[str, float] = {}  # vm -> monotonic time of our last tail
        self.console_server: Any = None
        from .requests import NonceCache

        self.console_nonces = NonceCache()
        # What changes our share: an admin's order, someone asking for a tail,
        # a new inventory. (Other machines' vm-status records never do.)
        ports.bus.subscribe((REQUEST_KIND, LOGS_REQUEST_KIND), lambda _rec: self.wake())
        ports.inventory.subscribe(lambda _inv: self.wake())

    def wake(self) -> None:
        self._wakeup.set()

    def capability(self) -> Any:
        from ..capabilities import Capability

        if self.backend is None:
            return Capability("vms", False, self.backend_reason)
        accel, why = self.backend.accel()
        others = ", ".join(f"{k} unusable ({v})" for k, v in self.unusable.items())
        return Capability(
            "vms",
            True,
            f"{', '.join(self.backends)}; default {self.backend.name}, {accel} ({why})"
            + (f"; {others}" if others else ""),
        )

    # -- desired state ---------------------------------------------------------------

    def _placed_here(self) -> frozenset[str]:
        """The VMs the inventory places on this machine (running or not)."""
        inv = self.ports.inventory.inventory
        me = None if inv is None else inv.machine_by_node_key(self.ports.identity.public_key)
        return frozenset() if me is None else frozenset(inv.vms_on(me.name))

    def _desired(self) -> tuple[dict[str, VmSpec], dict[str, str]]:
        inv = self.ports.inventory.inventory
        if inv is None:
            return {}, {}
        me = inv.machine_by_node_key(self.ports.identity.public_key)
        if me is None:
            return {}, {}
        host = self._host_limits()
        specs: dict[str, VmSpec] = {}
        errors: dict[str, str] = {}
        for name in inv.vms_on(me.name):
            try:
                spec = VmSpec.from_inventory(
                    name, inv.doc["vms"][name], overlay_ip6=_overlay_of(inv, name)
                )
            except VmSpecError as exc:
                errors[name] = "; ".join(exc.problems)
                continue
            problems = check_spec(spec, host)
            backend, why = self._backend_for(spec)
            if why:
                problems.append(why)
            if problems:
                errors[name] = "; ".join(problems)
            else:
                specs[name] = spec
        return specs, errors

    def _backend_for(self, spec: VmSpec) -> tuple[Any, str]:
        """The backend a VM asks for ("auto": the default), or why it cannot have it."""
        if spec.backend in ("", "auto"):
            if self.backend is None:
                return None, self.backend_reason
            return self.backend, ""
        backend = self.backends.get(spec.backend)
        if backend is None:
            why = self.unusable.get(spec.backend, "unknown backend")
            return None, f"backend {spec.backend} is not usable here: {why}"
        return backend, ""

    def _of(self, handle: Any) -> Any:
        return self.backends.get(handle.backend, self.backend)

    # -- running ------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        usable, unusable = await self._run_sync(self._probe)
        self.backends, self.unusable = dict(usable), dict(unusable)
        if not self.backends:
            self.backend_reason = "; ".join(f"{k}: {v}" for k, v in self.unusable.items())
            task_status.started(self)
            return
        self.backend = self.backends.get("qemu") or next(iter(self.backends.values()))
        await self._run_sync(lambda: self.base.mkdir(parents=True, exist_ok=True))
        await self._adopt_all()
        task_status.started(self)
        while True:
            try:
                await self.step()
            except Exception as exc:  # the next tick tries again
                log.warning("VM round failed", extra=kv(error=exc))
            with trio.move_on_after(TICK):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    async def _adopt_all(self) -> None:
        now = self.ports.clock.now()
        for entry in sorted(await self._run_sync(os.listdir, self.base)):
            rundir = str(self.base / entry)
            handle = None
            for backend in self.backends.values():
                handle = await backend.adopt(rundir)
                if handle is not None:
                    break
            if handle is None:
                continue
            self.handles[entry] = handle
            self.reconciler.observe(entry, handle.fingerprint, now)
            log.info("adopted a running VM", extra=kv(vm=entry, pid=handle.pid))

    def _apply_requests(self, specs: dict[str, VmSpec]) -> list[str]:
        """Admin orders in force: hold stopped VMs; return VMs to restart now."""
        from .requests import REQUEST_KIND, in_force

        inv = self.ports.inventory.inventory
        if inv is None:
            return []
        admins = frozenset(inv.doc["clan"]["admins"])
        bodies = [r.body for r in self.ports.store.of_kind(REQUEST_KIND)]
        restart = []
        self._held = set()
        for name in specs:
            req = in_force(
                [b for b in bodies if isinstance(b, dict) and b.get("vm") == name], name, admins
            )
            if req is None:
                continue
            if req.action == "stop":
                self._held.add(name)
            elif req.action == "restart" and self._restarted.get(name, 0) < req.at:
                self._restarted[name] = req.at
                if name in self.handles:
                    restart.append(name)
        return restart

    async def step(self) -> None:
        now = self.ports.clock.now
        specs, errors = self._desired()
        self._errors = errors
        self._overlay = {n: s.overlay_ip6 for n, s in specs.items() if s.overlay_ip6}
        for name in self._apply_requests(specs):
            handle = self.handles.pop(name)
            how = await self._of(handle).stop(handle, 10)
            self.reconciler.handle(VmExited(name, f"restarted by an admin ({how})"), now())
            log.info("VM restarted on request", extra=kv(vm=name))
        specs = {n: s for n, s in specs.items() if n not in self._held}
        self.reconciler.set_desired(specs, errors)
        for name, h in list(self.handles.items()):
            st = await self._of(h).status(h)
            if not st.alive:
                del self.handles[name]
                reap = getattr(self._of(h), "reap", None)
                if reap is not None:
                    await reap(h)
                self.reconciler.handle(VmExited(name, st.detail), now())
                log.warning("VM exited", extra=kv(vm=name, detail=st.detail))
        for act in self.reconciler.poll(now()):
            await self._act(act)
        for h in self.handles.values():
            await self._run_sync(ConsoleLog(RunDir(h.rundir).console).maybe_rotate)
        await self._publish_status()
        await self._answer_log_requests()

    async def _act(self, act: Any) -> None:
        now = self.ports.clock.now
        if isinstance(act, (StartVm, RestartVm)):
            name = act.spec.name
            secrets = await self._run_sync(self._secrets_for, act.spec)
            backend, _ = self._backend_for(act.spec)
            try:
                self.handles[name] = await backend.start(
                    act.spec, str(self.base / name), secrets=secrets or None
                )
            except VmHostError as exc:
                self.reconciler.handle(VmStartFailed(name, str(exc)), now())
                log.warning("VM did not start", extra=kv(vm=name, error=exc))
            else:
                self.reconciler.handle(VmStarted(name), now())
                log.info("VM started", extra=kv(vm=name, accel=self.handles[name].accel))
        elif isinstance(act, StopVm):
            handle = self.handles.pop(act.name, None)
            if handle is not None:
                how = await self._of(handle).stop(handle, act.timeout)
                log.info("VM stopped", extra=kv(vm=act.name, how=how, reason=act.reason))
            self.reconciler.handle(VmStopped(act.name), now())
        elif isinstance(act, ReportError):
            log.warning("VM declaration cannot run here", extra=kv(vm=act.name, reason=act.reason))
        elif isinstance(act, AdoptVm):
            pass  # the handle is already ours

    def _secrets_for(self, spec: VmSpec) -> dict[str, bytes]:
        """The secret files this VM receives ("SERVICE/SECRET" from the declaration)."""
        out: dict[str, bytes] = {}
        root = self.runtime_dir / "secrets"
        for ref in spec.secrets:
            d = root / ref
            if d.is_dir():
                for f in d.iterdir():
                    if f.is_file() and not f.name.startswith("."):
                        out[f"{ref}/{f.name}"] = f.read_bytes()
        return out

    async def _publish_status(self) -> None:
        inv = self.ports.inventory.inventory
        if inv is None:
            return
        me = inv.machine_by_node_key(self.ports.identity.public_key)
        names = set(self.reconciler.names()) | set(self._errors)
        for name in sorted(names):
            h = self.handles.get(name)
            state = "failed" if name in self._errors else self.reconciler.state(name)
            if name in self._held and state == "stopped":
                state = "stopped (by an admin)"
            body = {
                "vm": name,
                "machine": me.name if me else "",
                "state": state,
                "reason": self._errors.get(name) or self.reconciler.reason(name),
                "accel": h.accel if h is not None else "",
                "pid": h.pid if h is not None else 0,
                "crashes": self.reconciler.crashes(name),
                # when the running VM's process started (boot time), 0 when not running
                "booted": self._booted(h) if state == "running" else 0,
                # Only while it runs: the other machines route this address to us
                # on its word (after checking it against the inventory).
                "overlay": self._overlay.get(name, "") if state == "running" else "",
            }
            now = self.ports.clock.now()
            # a soft kind: republished on a change, and before its TTL runs out
            changed = self._published.get(name) != body
            if changed or now >= self._refresh_due.get(name, now + 1):
                self._published[name] = body
                refresh = spec(VM_STATUS_KIND).refresh * (1 - 0.1 * self._rng.random())
                self._refresh_due[name] = now + refresh
                # an unchanged status only renews its TTL: anti-entropy carries it
                await self.ports.bus.publish(
                    VM_STATUS_KIND,
                    name,
                    {**body, "at": int(self.ports.clock.wall())},
                    push=changed,
                )

    def _booted(self, h: Any) -> int:
        if h is None:
            return 0
        if h.pid not in self._boot_times:
            live = {x.pid for x in self.handles.values()}
            self._boot_times = {p: t for p, t in self._boot_times.items() if p in live}
            self._boot_times[h.pid] = process_started_at(h.pid) or int(self.ports.clock.wall())
        return self._boot_times[h.pid]

    # -- console logs ---------------------------------------------------------------------

    def local_tail(self, name: str, max_bytes: int = LOG_TAIL) -> bytes | None:
        """The console tail of a VM whose run dir is on this machine, else None."""
        console = RunDir(str(self.base / name)).console
        if not os.path.exists(console):
            return None
        return ConsoleLog(console).tail(max_bytes)

    async def _answer_log_requests(self) -> None:
        """Publish the console tail of our VMs that someone asked for (newer than ours).

        A request's time counts only up to our clock, and the answer carries
        our clock: a request dated in the future can never make our answer
        stand for later requests (which would freeze the tail clan-wide).
        One answer per VM per LOGS_ANSWER_INTERVAL at most."""
        now = int(self.ports.clock.wall())
        asked: dict[str, int] = {}
        placed = self._placed_here()
        for rec in self.ports.store.of_kind(LOGS_REQUEST_KIND):
            if isinstance(rec.body, dict):
                at = rec.body.get("at")
                # ours to answer: running here, or placed here (stopped: the
                # last console log, or an empty tail) -- never left unanswered
                if type(at) is int and (rec.key in self.handles or rec.key in placed):
                    asked[rec.key] = max(asked.get(rec.key, 0), min(at, now))
        mono = self.ports.clock.now()
        for name, at in asked.items():
            held = self.ports.store.get(self.ports.identity.public_key, LOGS_KIND, name)
            if held is not None and isinstance(held.body, dict):
                held_at = held.body.get("at", 0)
                if type(held_at) is int and now >= held_at >= at:
                    continue
            if mono - self._logs_answered.get(name, -LOGS_ANSWER_INTERVAL) < LOGS_ANSWER_INTERVAL:
                continue
            tail = await self._run_sync(self.local_tail, name)
            if tail is None:
                if name not in placed:
                    continue
                tail = b""  # placed here, never run here yet
            self._logs_answered[name] = mono
            await self.ports.bus.publish(
                LOGS_KIND,
                name,
                {"at": now, "machine": self.my_machine(), "tail": tail[-LOG_TAIL:]},
            )

    # -- interactive consoles ---------------------------------------------------------------

    @asynccontextmanager
    async def console(self, name: str) -> AsyncIterator[Any]:
        """A byte stream to the serial console of a VM running here (one session at a time)."""
        h = self.handles.get(name)
        if h is None:
            raise VmHostLocalError(
                f"VM {name} is not running on this machine (see 'clanctl vm list')"
            )
        if h.backend != "qemu":
            raise VmHostLocalError(
                f"VM {name} runs on {h.backend}, whose console is log-only here; "
                f"use 'clanctl vm logs -f {name}'"
            )
        if name in self._consoles:
            raise VmHostLocalError(
                f"VM {name}'s console is in use by another session (one at a time); try later"
            )
        path = RunDir(h.rundir).console_sock
        if not os.path.exists(path):
            raise VmHostLocalError(
                f"VM {name} was started without an interactive console (by an older agent); "
                f"'clanctl vm restart {name}' gives it one"
            )
        self._consoles.add(name)
        try:
            try:
                stream = await trio.open_unix_socket(path)
            except OSError as exc:
                raise VmHostLocalError(f"cannot open VM {name}'s console: {exc}") from None
            async with stream:
                yield stream
        finally:
            self._consoles.discard(name)

    def my_machine(self) -> str:
        return self.ports.me() or ""

    async def authorize_console(self, hello: Any) -> str:
        """The VM a console request may open here; WireError/VmHostLocalError says why not."""
        from .requests import parse_console

        inv = self.ports.inventory.inventory
        if inv is None:
            raise VmHostLocalError("this machine has no inventory yet")
        req = parse_console(hello, frozenset(inv.doc["clan"]["admins"]))
        self.admit_console(req)
        return req.vm

    def admit_console(self, req: Any) -> None:
        """A verified console request may open here: our machine, fresh, nonce unused."""
        from ..wire import WireError

        me = self.my_machine()
        if req.machine != me:
            raise WireError(f"console request is for machine {req.machine}, this is {me}")
        self.console_nonces.check(req, int(self.ports.clock.wall()))

    async def serve_consoles(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve console sessions to other agents on our overlay address (inside WireGuard)."""
        from .attach import ConsoleServer

        port, overlay6 = self.console_port, self._overlay6
        task_status.started()
        if not port or overlay6 is None or self.backend is None or not self.wireguard:
            return
        while overlay6() is None:
            await trio.sleep(1)
        self.console_server = ConsoleServer(self.authorize_console, self.console)
        while True:  # never let the console server take the agent down
            try:
                await self.console_server.serve(str(overlay6()), port)
            except Exception as exc:
                log.warning(
                    "cannot serve VM consoles to other machines; retrying in 10 s",
                    extra=kv(error=repr(exc)),
                )
            await trio.sleep(10)

    # -- views --------------------------------------------------------------------------

    def clan_vms(self) -> list[dict[str, Any]]:
        """Every VM of the clan, from the status records every host publishes."""
        inv = self.ports.inventory.inventory
        placed: dict[str, list[str]] = {}
        if inv is not None:
            for vm in inv.doc["vms"]:
                placed[vm] = list(inv.placement(vm))
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in self.ports.store.of_kind(VM_STATUS_KIND):
            if not isinstance(rec.body, dict):
                continue
            b = rec.body
            key = (str(b.get("vm", "")), str(b.get("machine", "")))
            # Only a host's word about its own VM: signed by the machine the
            # body names, which the inventory places that VM on.
            signer = inv.machine_by_node_key(rec.origin) if inv is not None else None
            if signer is None or signer.name != key[1] or rec.key != key[0]:
                continue
            if key[0] in placed and key[1] in placed[key[0]]:
                rows[key] = {
                    k: b.get(k)
                    for k in (
                        "vm",
                        "machine",
                        "state",
                        "reason",
                        "accel",
                        "crashes",
                        "booted",
                        "at",
                    )
                }
                rows[key]["overlay"] = _overlay_of(inv, key[0])
        for vm, machines in placed.items():
            for m in machines:
                rows.setdefault(
                    (vm, m),
                    {
                        "vm": vm,
                        "machine": m,
                        "state": "unknown",
                        "reason": "no status from that machine yet",
                        "accel": "",
                        "crashes": 0,
                        "booted": None,
                        "at": None,
                        "overlay": _overlay_of(inv, vm),
                    },
                )
        return [rows[k] for k in sorted(rows)]
