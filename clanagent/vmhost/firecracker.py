"""Firecracker backend, plus the process machinery shared by API-socket VMMs.

Owns: starting ``firecracker --api-sock RUNDIR/firecracker.sock`` with its
serial console (the process's stdout) going to the VM's console log, the
request sequence that configures and boots a VM from a VmSpec
(:func:`boot_requests`), graceful stop (``SendCtrlAltDel``, then SIGKILL after
the timeout), status from ``GET /``, and adopting a VMM that outlived the agent
through ``RUNDIR/vmm.pid`` and the API socket.

:class:`ApiVmmBackend` and :class:`VmmHandle` are the parts cloud-hypervisor
shares (they belong in a private module once the package layout allows one).

Must never: kill a process it cannot tie to this VM (a pid is trusted only
while ``/proc/PID/cmdline`` names our API socket), leave a half-configured
VMM running after a failed start, block the event loop, or assume KVM exists:
:func:`available` says why not instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import trio

from clanagent.vmhost.http_unix import ApiConnectError, ApiError, request
from clanagent.vmhost.spec import VmHostError, VmHostRemoteError

if TYPE_CHECKING:
    from clanagent.vmhost.spec import VmSpec

__all__ = [
    "STATE_RUNNING",
    "STATE_STARTING",
    "STATE_PAUSED",
    "STATE_STOPPED",
    "STATE_UNRESPONSIVE",
    "VmmError",
    "VmmStartError",
    "VmmHandle",
    "LaunchConfig",
    "Spawner",
    "spawn_process",
    "available",
    "ApiVmmBackend",
    "FirecrackerBackend",
    "boot_requests",
    "PIDFILE_NAME",
]

log = logging.getLogger("clanagent.vmhost.firecracker")

# What status() answers (plain strings so they go into status records as-is).
STATE_RUNNING = "running"
STATE_STARTING = "starting"  # VMM up, guest not booted yet
STATE_PAUSED = "paused"
STATE_STOPPED = "stopped"  # the VMM process is gone (or its VM shut down)
STATE_UNRESPONSIVE = "unresponsive"  # the process lives but its API does not answer

PIDFILE_NAME = "vmm.pid"
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


class VmmError(VmHostError):
    """Base of the API-socket VMM backend errors."""


class VmmStartError(VmmError, VmHostRemoteError):
    """The VMM could not be started, configured or booted (the process was killed)."""


@dataclass(frozen=True, slots=True)
class VmmHandle:
    """What identifies a running VMM process; enough to re-find it after a restart."""

    kind: str
    name: str
    pid: int
    rundir: Path
    api_socket: Path


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """Everything a VMM needs to boot one VM: the spec plus this host's runtime choices.

    The inventory's VmSpec says what the VM is; where its tap, data disk and
    console log live is decided at run time.  :meth:`resolve` takes either.
    """

    name: str
    vcpus: int
    memory_mb: int
    kernel: str
    cmdline: str
    console_log: Path
    initrd: str | None = None
    rootfs: str | None = None
    disk: str | None = None
    tap: str | None = None
    mac: str | None = None

    @classmethod
    def resolve(cls, spec: VmSpec | LaunchConfig, rundir: Path) -> LaunchConfig:
        if isinstance(spec, LaunchConfig):
            return spec

        def opt(attr: str) -> Any:
            return getattr(spec, attr, None) or None

        disk = opt("disk")
        if disk is None and getattr(spec, "disk_mb", 0) and (rundir / "disk.img").exists():
            # The runtime creates a spec's data disk (disk_mb) as RUNDIR/disk.img.
            disk = str(rundir / "disk.img")
        return cls(
            name=spec.name,
            vcpus=spec.vcpus,
            memory_mb=spec.memory_mb,
            kernel=str(spec.kernel),
            cmdline=spec.cmdline,
            console_log=Path(opt("console_log") or rundir / "console.log"),
            initrd=str(spec.initrd) if spec.initrd else None,
            rootfs=str(spec.rootfs) if spec.rootfs else None,
            disk=str(disk) if disk else None,
            tap=opt("tap"),
            mac=opt("mac"),
        )


# (argv, log path) -> a started process.  Tests swap in a fake VMM here.
Spawner = Callable[[Sequence[str], Path], Awaitable[trio.Process]]


async def spawn_process(argv: Sequence[str], log_path: Path) -> trio.Process:
    """Start a VMM in its own session, so the agent's signals and restarts spare it."""
    with open(log_path, "ab") as out:
        return await trio.lowlevel.open_process(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def available(binary: str = "firecracker") -> tuple[bool, str]:
    """Whether ``binary`` can run VMs here, and why not."""
    path = shutil.which(binary)
    if path is None:
        return False, f"no {binary} on PATH"
    kvm = Path("/dev/kvm")
    if not kvm.exists():
        return False, "no /dev/kvm (KVM missing or not exposed to this machine)"
    if not os.access(kvm, os.R_OK | os.W_OK):
        return False, "/dev/kvm is not readable and writable (join the kvm group)"
    return True, f"{binary} at {path} with /dev/kvm"


def _proc_matches(pid: int, needle: bytes) -> bool:
    """True if ``pid`` is a live (non-zombie) process whose argv contains ``needle``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2 :].split()
    if not fields or fields[0] in (b"Z", b"X"):
        return False
    return needle in cmdline


class ApiVmmBackend:
    """Process lifecycle for a VMM driven through an HTTP API on a unix socket.

    Subclasses say how to start the binary and how to talk to it; this class
    owns the pidfile, readiness wait, exit wait, kill and adopt.
    """

    kind: ClassVar[str] = ""
    socket_name: ClassVar[str] = ""
    ready_path: ClassVar[str] = "/"

    def __init__(
        self,
        binary: str,
        *,
        spawn: Spawner = spawn_process,
        api_timeout: float = 5.0,
        ready_timeout: float = 5.0,
        kill_timeout: float = 5.0,
        poll_interval: float = 0.02,
    ) -> None:
        self.binary = binary
        self._spawn = spawn
        self.api_timeout = api_timeout
        self.ready_timeout = ready_timeout
        self.kill_timeout = kill_timeout
        self.poll_interval = poll_interval
        # Processes we started ourselves must be reaped, or they linger as zombies.
        self._children: dict[int, trio.Process] = {}

    # -- to be provided by each product ------------------------------------------------

    def argv(self, api_socket: Path) -> list[str]:
        raise NotImplementedError

    def log_path(self, spec: LaunchConfig, rundir: Path) -> Path:
        raise NotImplementedError

    async def _boot(self, spec: LaunchConfig, handle: VmmHandle) -> None:
        raise NotImplementedError

    async def _graceful(self, handle: VmmHandle, timeout: float) -> bool:
        """Ask the guest to shut down; True once the process has exited."""
        raise NotImplementedError

    async def _api_state(self, handle: VmmHandle) -> str:
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------

    def available(self) -> tuple[bool, str]:
        return available(self.binary)

    async def api(self, handle: VmmHandle, method: str, path: str, body: Any = None) -> Any:
        _, value = await request(handle.api_socket, method, path, body, timeout=self.api_timeout)
        return value

    async def start(self, spec: VmSpec | LaunchConfig, rundir: Path) -> VmmHandle:
        rundir = Path(rundir)
        rundir.mkdir(parents=True, exist_ok=True)
        spec = LaunchConfig.resolve(spec, rundir)
        sock = rundir / self.socket_name
        if len(os.fsencode(sock)) > _SUN_PATH_MAX:
            raise VmmStartError(f"API socket path too long for a unix socket: {sock}")
        if await self.adopt(rundir) is not None:
            raise VmmStartError(f"{self.kind} for {spec.name} is already running in {rundir}")
        # A socket left by a dead VMM makes its successor's bind fail.
        sock.unlink(missing_ok=True)
        try:
            proc = await self._spawn(self.argv(sock), self.log_path(spec, rundir))
        except OSError as e:
            raise VmmStartError(f"cannot start {self.binary}: {e}") from None
        self._children[proc.pid] = proc
        handle = VmmHandle(self.kind, spec.name, proc.pid, rundir, sock)
        _write_pidfile(rundir / PIDFILE_NAME, proc.pid)
        try:
            await self._wait_ready(handle)
            await self._boot(spec, handle)
        except ApiError as e:
            with trio.CancelScope(shield=True):
                await self.kill(handle)
            raise VmmStartError(f"{self.kind} {spec.name}: {e}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.kill(handle)
            raise
        log.info("%s %s started (pid %d)", self.kind, spec.name, proc.pid)
        return handle

    async def _wait_ready(self, handle: VmmHandle) -> None:
        with trio.move_on_after(self.ready_timeout):
            while True:
                if not self.is_alive(handle):
                    raise VmmStartError(
                        f"{self.kind} {handle.name} exited before its API came up"
                        f" (see {handle.rundir})"
                    )
                try:
                    await request(handle.api_socket, "GET", self.ready_path, timeout=1.0)
                    return
                except ApiConnectError:
                    pass  # not listening yet
                await trio.sleep(self.poll_interval)
        raise VmmStartError(
            f"{self.kind} {handle.name}: API socket not ready after {self.ready_timeout:g}s"
        )

    def is_alive(self, handle: VmmHandle) -> bool:
        proc = self._children.get(handle.pid)
        if proc is not None:
            if proc.poll() is None:
                return True
            del self._children[handle.pid]
            return False
        return _proc_matches(handle.pid, os.fsencode(handle.api_socket))

    async def wait_exit(self, handle: VmmHandle, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self.is_alive(handle):
                await trio.sleep(self.poll_interval)
            return True
        return not self.is_alive(handle)

    async def stop(self, handle: VmmHandle, timeout: float) -> None:
        """Graceful shutdown within ``timeout`` seconds, else SIGKILL."""
        if self.is_alive(handle) and await self._graceful(handle, timeout):
            log.info("%s %s stopped gracefully", self.kind, handle.name)
            self._cleanup(handle)
            return
        await self.kill(handle)

    async def kill(self, handle: VmmHandle) -> None:
        if self.is_alive(handle):
            log.warning("%s %s: sending SIGKILL to pid %d", self.kind, handle.name, handle.pid)
            try:
                os.kill(handle.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not await self.wait_exit(handle, self.kill_timeout):
                raise VmmError(f"{self.kind} {handle.name}: pid {handle.pid} survived SIGKILL")
        self._cleanup(handle)

    def _cleanup(self, handle: VmmHandle) -> None:
        for path in (
            handle.api_socket,
            Path(f"{handle.api_socket}.lock"),  # cloud-hypervisor's socket lock
            handle.rundir / PIDFILE_NAME,
        ):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot remove %s: %s", path, e)

    async def status(self, handle: VmmHandle) -> str:
        if not self.is_alive(handle):
            return STATE_STOPPED
        try:
            return await self._api_state(handle)
        except ApiError as e:
            log.warning("%s %s: status query failed: %s", self.kind, handle.name, e)
            return STATE_UNRESPONSIVE

    async def adopt(self, rundir: Path) -> VmmHandle | None:
        """The VMM still running in ``rundir`` from an earlier agent, if any."""
        rundir = Path(rundir)
        pid = _read_pidfile(rundir / PIDFILE_NAME)
        if pid is None:
            return None
        handle = VmmHandle(self.kind, rundir.name, pid, rundir, rundir / self.socket_name)
        # The cmdline check guards against a recycled pid now owned by someone else.
        if not _proc_matches(pid, os.fsencode(handle.api_socket)):
            return None
        try:
            await request(handle.api_socket, "GET", self.ready_path, timeout=self.api_timeout)
        except ApiError as e:
            # Still ours (the pid and argv match), just unwell: status() will say so.
            log.warning("%s %s: adopted pid %d, API not answering: %s", self.kind, rundir, pid, e)
        return handle


def _write_pidfile(path: Path, pid: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, path)


def _read_pidfile(path: Path) -> int | None:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 10 or int(text) <= 1:
        return None
    return int(text)


# -- Firecracker ------------------------------------------------------------------------


def boot_requests(spec: LaunchConfig) -> list[tuple[str, str, dict[str, Any]]]:
    """The exact (method, path, body) sequence that configures and boots ``spec``.

    Every PUT before ``InstanceStart`` is pre-boot only in Firecracker's API, and
    the order among them is free; machine config first makes a memory or vCPU
    error surface before any device is set up.
    """
    seq: list[tuple[str, str, dict[str, Any]]] = [
        ("PUT", "/machine-config", {"vcpu_count": spec.vcpus, "mem_size_mib": spec.memory_mb}),
    ]
    boot: dict[str, Any] = {"kernel_image_path": str(spec.kernel), "boot_args": spec.cmdline}
    if spec.initrd:
        boot["initrd_path"] = str(spec.initrd)
    seq.append(("PUT", "/boot-source", boot))
    if spec.rootfs:
        seq.append(
            (
                "PUT",
                "/drives/rootfs",
                {
                    "drive_id": "rootfs",
                    "path_on_host": str(spec.rootfs),
                    "is_root_device": True,
                    "is_read_only": False,
                },
            )
        )
    if spec.disk:
        seq.append(
            (
                "PUT",
                "/drives/data",
                {
                    "drive_id": "data",
                    "path_on_host": str(spec.disk),
                    "is_root_device": False,
                    "is_read_only": False,
                },
            )
        )
    if spec.tap:
        net: dict[str, Any] = {"iface_id": "eth0", "host_dev_name": spec.tap}
        if spec.mac:
            net["guest_mac"] = spec.mac
        seq.append(("PUT", "/network-interfaces/eth0", net))
    seq.append(("PUT", "/actions", {"action_type": "InstanceStart"}))
    return seq


_FC_STATES = {"Running": STATE_RUNNING, "Not started": STATE_STARTING, "Paused": STATE_PAUSED}


class FirecrackerBackend(ApiVmmBackend):
    """Firecracker through its REST API (needs an uncompressed vmlinux on x86_64)."""

    kind: ClassVar[str] = "firecracker"
    socket_name: ClassVar[str] = "firecracker.sock"
    ready_path: ClassVar[str] = "/"

    def __init__(self, binary: str = "firecracker", **kwargs: Any) -> None:
        super().__init__(binary, **kwargs)

    def argv(self, api_socket: Path) -> list[str]:
        return [self.binary, "--api-sock", str(api_socket)]

    def log_path(self, spec: LaunchConfig, rundir: Path) -> Path:
        # Firecracker writes the guest's serial port to its stdout.
        return spec.console_log

    async def _boot(self, spec: LaunchConfig, handle: VmmHandle) -> None:
        for method, path, body in boot_requests(spec):
            await self.api(handle, method, path, body)

    async def _graceful(self, handle: VmmHandle, timeout: float) -> bool:
        # Ctrl+Alt+Del through the i8042 device: the guest reboots, and Firecracker
        # exits on a guest reboot. x86_64 only; elsewhere this fails and we kill.
        try:
            await self.api(handle, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        except ApiError as e:
            log.warning("firecracker %s: SendCtrlAltDel failed: %s", handle.name, e)
            return not self.is_alive(handle)
        return await self.wait_exit(handle, timeout)

    async def _api_state(self, handle: VmmHandle) -> str:
        info = await self.api(handle, "GET", "/")
        state = info.get("state") if isinstance(info, dict) else None
        return (
            _FC_STATES.get(state, STATE_UNRESPONSIVE)
            if isinstance(state, str)
            else STATE_UNRESPONSIVE
        )
