"""An in-memory VM backend: "boots" at once, reports status, never starts a process.

Owns: `FakeHost` (the VMs "running" on one simulated machine: they outlive
the agent that started them, so a restarted VmService adopts them, as it
does real VMMs) and `FakeVmBackend`, which implements the real
`clanagent.vmhost.backend.Backend` interface over it, so VmService and its
lifecycle reconciler run unchanged (the whole-agent simulator uses it).
Must never: write anything but the VM's (empty) run dir -- VmService finds
VMs to adopt by their run dirs, as with the real VMMs --, start a process,
or hand out a pid a real process could have (fake pids start above Linux's
largest pid_max, so `/proc` never names them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clanagent.vmhost.backend import RunDir, VmHandle, VmStatus
from clanagent.vmhost.service import BackendChoice
from clanagent.vmhost.spec import VmHostError, VmSpec

__all__ = ["FakeHost", "FakeVmBackend", "fake_backends", "inline"]

FIRST_PID = 2**22 + 1  # above PID_MAX_LIMIT: no real process has it


@dataclass
class FakeHost:
    """The VMs of one simulated machine, by run dir, and what happened to them."""

    running: dict[str, VmHandle] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)  # VM names, in start order
    stopped: list[tuple[str, str]] = field(default_factory=list)  # (VM name, how)
    fail: dict[str, str] = field(default_factory=dict)  # VM name -> why start fails
    secrets: dict[str, dict[str, bytes]] = field(default_factory=dict)  # VM -> last secrets
    next_pid: int = FIRST_PID
    listeners: list[Callable[[], None]] = field(default_factory=list)  # after every change

    def changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    def crash(self, name: str) -> None:
        """The VM's process dies on its own (the reconciler sees it exit)."""
        for rundir, h in list(self.running.items()):
            if h.name == name:
                del self.running[rundir]
        self.changed()


class FakeVmBackend:
    """The Backend protocol over a FakeHost (clanagent.vmhost.backend.Backend)."""

    def __init__(self, host: FakeHost | None = None, name: str = "fake") -> None:
        self.host = host if host is not None else FakeHost()
        self.name = name

    def accel(self) -> tuple[str, str]:
        return "fake", "an in-memory backend for tests"

    async def start(
        self, spec: VmSpec, rundir: str, secrets: Mapping[str, bytes] | None = None
    ) -> VmHandle:
        why = self.host.fail.get(spec.name)
        if why is not None:
            raise VmHostError(why)
        RunDir(rundir).ensure()  # one mkdir: real backends make it too (adoption finds it)
        handle = VmHandle(
            name=spec.name,
            rundir=rundir,
            pid=self.host.next_pid,
            backend=self.name,
            accel="fake",
            fingerprint=spec.fingerprint(),
        )
        self.host.next_pid += 1
        self.host.running[rundir] = handle
        self.host.started.append(spec.name)
        self.host.secrets[spec.name] = dict(secrets or {})
        self.host.changed()
        return handle

    async def stop(self, handle: VmHandle, timeout: float) -> str:
        self.host.running.pop(handle.rundir, None)
        self.host.stopped.append((handle.name, "poweroff"))
        self.host.changed()
        return "poweroff"

    async def kill(self, handle: VmHandle) -> None:
        self.host.running.pop(handle.rundir, None)
        self.host.stopped.append((handle.name, "killed"))
        self.host.changed()

    async def status(self, handle: VmHandle) -> VmStatus:
        if self.host.running.get(handle.rundir) == handle:
            return VmStatus("running")
        return VmStatus("exited", "the fake VM is gone")

    async def adopt(self, rundir: str) -> VmHandle | None:
        handle = self.host.running.get(rundir)
        if handle is None:
            return None
        adopted = VmHandle(
            name=RunDir(rundir).name,
            rundir=rundir,
            pid=handle.pid,
            backend=self.name,
            accel=handle.accel,
            fingerprint=handle.fingerprint,
            adopted=True,
        )
        self.host.running[rundir] = adopted
        return adopted


def fake_backends(host: FakeHost | None = None) -> BackendChoice:
    """A `backends=` answer for VmService: the fake alone, the real VMMs unusable."""
    return (
        {"fake": FakeVmBackend(host)},
        {
            "qemu": "simulated machine",
            "firecracker": "simulated machine",
            "cloud-hypervisor": "simulated machine",
        },
    )


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    """VmService's `run_sync=` on a MockClock: the (small) file work runs in
    the task, so the virtual clock cannot jump while a worker thread runs."""
    return fn(*args)
