"""The VM lifecycle reconciler: desired specs vs observed VMs -> actions.  Sans-IO.

Owns: each local VM's state (starting / running / stopping / stopped /
crashed / failed), the restart policy (exponential backoff after crashes,
reset once a VM stayed up long enough), adoption of VMs found running after
an agent restart, and which errors to report.  It takes events and `now` and
returns actions; it must never import trio, start a process, read a clock or
know which backend runs the VM.  A reconciler never assumes its last action
worked: every action is answered by an event from the shell.

Flow: `set_desired()` with the checked specs (and the declaration errors),
`observe()` for each VM found running at startup, then `poll(now)` for
actions; feed back `handle(event, now)` as actions complete or VMs exit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from clanagent.vmhost.spec import VmHostLocalError, VmSpec

__all__ = [
    "Action",
    "AdoptVm",
    "Backoff",
    "CRASHED",
    "Event",
    "FAILED",
    "LifecycleMisuse",
    "RUNNING",
    "Reconciler",
    "ReportError",
    "RestartVm",
    "STARTING",
    "STOPPED",
    "STOPPING",
    "StartVm",
    "StopVm",
    "TRANSITIONS",
    "VmExited",
    "VmStartFailed",
    "VmStarted",
    "VmStopped",
]

STARTING, RUNNING, STOPPING, STOPPED, CRASHED, FAILED = (
    "starting", "running", "stopping", "stopped", "crashed", "failed",
)  # fmt: skip

# ---------------------------------------------------------------------------
# The transition table: (state, event kind) -> new state.  Every state change
# of a VM goes through this table and nothing else; a pair missing here is a
# misuse (an event the shell should not have sent in that state).
# ---------------------------------------------------------------------------
TRANSITIONS: dict[tuple[str, str], str] = {
    (STOPPED, "start"): STARTING,
    (CRASHED, "start"): STARTING,
    (FAILED, "start"): STARTING,
    (STOPPED, "adopt"): RUNNING,
    (STARTING, "started"): RUNNING,
    (STARTING, "start_failed"): CRASHED,
    (STARTING, "exited"): CRASHED,
    (RUNNING, "exited"): CRASHED,
    (RUNNING, "stop"): STOPPING,
    (STARTING, "stop"): STOPPING,
    (STOPPING, "stopped"): STOPPED,
    (STOPPING, "exited"): STOPPED,
    (STOPPED, "declaration_error"): FAILED,
    (CRASHED, "declaration_error"): FAILED,
    (FAILED, "declaration_error"): FAILED,
    (FAILED, "declaration_ok"): STOPPED,
}


class LifecycleMisuse(VmHostLocalError):
    """An event arrived that the VM's state does not allow."""


# --- events (shell -> reconciler) ---------------------------------------------
@dataclass(frozen=True)
class VmStarted:
    name: str


@dataclass(frozen=True)
class VmStartFailed:
    name: str
    reason: str


@dataclass(frozen=True)
class VmExited:
    """The VMM process is gone (crash, guest poweroff, kill -9)."""

    name: str
    reason: str = ""


@dataclass(frozen=True)
class VmStopped:
    name: str


# --- actions (reconciler -> shell) --------------------------------------------
@dataclass(frozen=True)
class StartVm:
    spec: VmSpec


@dataclass(frozen=True)
class RestartVm:
    """Start again after a crash; `attempt` counts consecutive crashes."""

    spec: VmSpec
    attempt: int


@dataclass(frozen=True)
class StopVm:
    name: str
    timeout: float
    reason: str


@dataclass(frozen=True)
class AdoptVm:
    """Keep the VM found running (its handle is the shell's); nothing to start."""

    name: str


@dataclass(frozen=True)
class ReportError:
    name: str
    reason: str


Action = StartVm | RestartVm | StopVm | AdoptVm | ReportError
Event = VmStarted | VmStartFailed | VmExited | VmStopped


@dataclass(frozen=True)
class Backoff:
    """Restart delays: base * 2**(crashes-1), capped; reset after `stable_after` s up."""

    base: float = 1.0
    cap: float = 60.0
    stable_after: float = 30.0

    def delay(self, crashes: int) -> float:
        if crashes <= 0:
            return 0.0
        return min(self.cap, self.base * 2.0 ** min(crashes - 1, 62))


@dataclass
class _Vm:
    name: str
    state: str = STOPPED
    spec: VmSpec | None = None
    running_fingerprint: str = ""
    crashes: int = 0
    started_at: float | None = None
    restart_at: float | None = None
    reason: str = ""
    reported: str = ""
    history: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, backoff: Backoff | None = None, stop_timeout: float = 10.0) -> None:
        self.backoff = backoff or Backoff()
        self.stop_timeout = stop_timeout
        self._vms: dict[str, _Vm] = {}
        self._desired: dict[str, VmSpec] = {}
        self._errors: dict[str, str] = {}

    # --- inputs ---------------------------------------------------------------
    def set_desired(
        self, specs: Mapping[str, VmSpec], errors: Mapping[str, str] | None = None
    ) -> None:
        """The VMs that should run here (checked specs), and the declarations that
        cannot (name -> reason).  A name in both is treated as an error."""
        self._errors = dict(errors or {})
        self._desired = {n: s for n, s in specs.items() if n not in self._errors}
        for name in (*self._desired, *self._errors):
            self._vms.setdefault(name, _Vm(name))

    def observe(self, name: str, fingerprint: str, now: float) -> None:
        """A VM found running at startup (the shell adopted its handle)."""
        vm = self._vms.setdefault(name, _Vm(name))
        if vm.state != STOPPED:
            raise LifecycleMisuse(f"vm {name} observed while {vm.state}")
        self._move(vm, "adopt")
        vm.running_fingerprint = fingerprint
        vm.started_at = now

    def handle(self, event: Event, now: float) -> None:
        vm = self._vms.get(event.name)
        if vm is None:
            raise LifecycleMisuse(f"event for unknown vm {event.name}")
        if isinstance(event, VmStarted):
            self._move(vm, "started")
            vm.started_at = now
            vm.reason = ""
        elif isinstance(event, VmStartFailed):
            self._move(vm, "start_failed")
            self._crashed(vm, now, f"start failed: {event.reason}")
        elif isinstance(event, VmExited):
            was = vm.state
            self._move(vm, "exited")
            if was != STOPPING:
                self._crashed(vm, now, event.reason or "exited")
        elif isinstance(event, VmStopped):
            self._move(vm, "stopped")
            vm.started_at = None

    # --- outputs --------------------------------------------------------------
    def poll(self, now: float) -> list[Action]:
        """Actions due at `now`, in name order.  Call again after each event."""
        actions: list[Action] = []
        for name in sorted(self._vms):
            vm = self._vms[name]
            if name in self._errors:
                actions += self._poll_error(vm, self._errors[name])
                continue
            spec = self._desired.get(name)
            if vm.state == FAILED:
                self._move(vm, "declaration_ok")
                vm.reported = ""
            if spec is None:
                if vm.state in (RUNNING, STARTING):
                    self._move(vm, "stop")
                    actions.append(StopVm(name, self.stop_timeout, "no longer placed here"))
                elif vm.state in (STOPPED, CRASHED):
                    del self._vms[name]
                continue
            if vm.state == RUNNING and vm.running_fingerprint != spec.fingerprint():
                self._move(vm, "stop")
                actions.append(StopVm(name, self.stop_timeout, "declaration changed"))
            elif vm.state == RUNNING and vm.running_fingerprint == spec.fingerprint():
                if vm.spec is None:
                    vm.spec = spec
                    actions.append(AdoptVm(name))
            elif vm.state == STOPPED or self._restart_due(vm, now):
                actions.append(self._start(vm, spec))
        return actions

    def next_deadline(self) -> float | None:
        """When poll() will next have something to do without any event."""
        times = [
            vm.restart_at
            for vm in self._vms.values()
            if vm.state == CRASHED and vm.restart_at is not None and vm.name in self._desired
        ]
        return min(times) if times else None

    # --- queries --------------------------------------------------------------
    def state(self, name: str) -> str:
        vm = self._vms.get(name)
        return vm.state if vm else STOPPED

    def reason(self, name: str) -> str:
        vm = self._vms.get(name)
        return vm.reason if vm else ""

    def crashes(self, name: str) -> int:
        vm = self._vms.get(name)
        return vm.crashes if vm else 0

    def history(self, name: str) -> list[str]:
        vm = self._vms.get(name)
        return list(vm.history) if vm else []

    def names(self) -> list[str]:
        return sorted(self._vms)

    # --- internals ------------------------------------------------------------
    def _move(self, vm: _Vm, kind: str) -> None:
        new = TRANSITIONS.get((vm.state, kind))
        if new is None:
            raise LifecycleMisuse(f"vm {vm.name}: {kind} not allowed while {vm.state}")
        vm.state = new
        vm.history.append(new)

    @staticmethod
    def _restart_due(vm: _Vm, now: float) -> bool:
        return vm.state == CRASHED and vm.restart_at is not None and now >= vm.restart_at

    def _start(self, vm: _Vm, spec: VmSpec) -> Action:
        restart = vm.state == CRASHED
        self._move(vm, "start")
        vm.spec = spec
        vm.running_fingerprint = spec.fingerprint()
        vm.restart_at = None
        return RestartVm(spec, vm.crashes) if restart else StartVm(spec)

    def _crashed(self, vm: _Vm, now: float, reason: str) -> None:
        if vm.started_at is not None and now - vm.started_at >= self.backoff.stable_after:
            vm.crashes = 0  # it ran long enough: this is a new problem, not a loop
        vm.crashes += 1
        vm.started_at = None
        vm.reason = reason
        vm.restart_at = now + self.backoff.delay(vm.crashes)

    def _poll_error(self, vm: _Vm, reason: str) -> list[Action]:
        actions: list[Action] = []
        if vm.state in (RUNNING, STARTING):
            # The running VM stays until stopped; then the error takes over.
            self._move(vm, "stop")
            return [StopVm(vm.name, self.stop_timeout, f"declaration invalid: {reason}")]
        if vm.state == STOPPING:
            return []
        if vm.state != FAILED or vm.reason != reason:
            self._move(vm, "declaration_error")
            vm.reason = reason
        if vm.reported != reason:
            vm.reported = reason
            actions.append(ReportError(vm.name, reason))
        return actions
