"""Firecracker backend, plus the process machinery shared by API-socket VMMs.

Owns: starting ``firecracker --api-sock RUNDIR/control.sock`` with its serial
console (the process's stdout) going to ``RUNDIR/console.log``, the request
sequence that configures and boots a VM (:func:`boot_requests`), graceful
stop (``SendCtrlAltDel``, then SIGKILL after the timeout), status from
``GET /``, and adopting a VMM that outlived the agent through the pidfile and
the API socket.

:class:`ApiVmmBackend` and :class:`LaunchConfig` are shared with
cloud-hypervisor (they belong in a private module once the layout allows one).

Taps and the clan route come from :class:`~clanagent.vmhost.network.VmNetwork`
(the same as QEMU's); a VmSpec on the clan network gets its NIC with the clan
MAC and the guest's ``clan.*`` kernel arguments.

Must never: kill or adopt a process it cannot tie to this VM (a pid counts
only while its command line names the VM's API socket), leave a
half-configured VMM running after a failed start, leave the secrets initrd on
disk after boot, block the event loop, or assume KVM exists: :func:`available`
says why not instead.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import trio

from clanagent.durable import atomic_write
from clanagent.vmhost.backend import (
    RunDir,
    VmHandle,
    VmStatus,
    pid_alive,
    process_mentions,
    read_pidfile,
    write_secrets_initrd,
)
from clanagent.vmhost.http_unix import ApiConnectError, ApiError, request
from clanagent.vmhost.network import Nic, VmNetwork
from clanagent.vmhost.spec import (
    VmHostError,
    VmHostLocalError,
    VmHostRemoteError,
    VmSpec,
    clan_cmdline,
)

__all__ = [
    "ApiVmmBackend",
    "FirecrackerBackend",
    "LaunchConfig",
    "Spawner",
    "VmmError",
    "VmmSetupError",
    "VmmStartError",
    "available",
    "kvm_problem",
    "boot_requests",
    "spawn_process",
]

log = logging.getLogger("clanagent.vmhost.firecracker")

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


class VmmError(VmHostError):
    """Base of the API-socket VMM backend errors."""


class VmmStartError(VmmError, VmHostRemoteError):
    """The VMM could not be started, configured or booted (the process was killed)."""


class VmmSetupError(VmmError, VmHostLocalError):
    """We cannot even try: the runtime dir or the spec does not fit this backend."""


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """Everything a VMM needs to boot one VM: the spec plus this host's runtime choices.

    VmSpec says what the VM is; its disk image, console log and NICs (taps
    made by network.VmNetwork) are decided at run time.  :meth:`resolve`
    builds one from a VmSpec, the runtime dir and the NICs.
    """

    name: str
    vcpus: int
    memory_mb: int
    kernel: str
    cmdline: str
    console_log: str
    initrd: str | None = None
    rootfs: str | None = None
    disk: str | None = None
    nics: tuple[Nic, ...] = ()

    @classmethod
    def resolve(
        cls, spec: VmSpec | LaunchConfig, run: RunDir, nics: tuple[Nic, ...] = ()
    ) -> LaunchConfig:
        if isinstance(spec, LaunchConfig):
            return spec
        disk = run.disk if spec.disk_mb > 0 else None
        cmdline = spec.cmdline
        if any(n.clan for n in nics):
            cmdline += " " + clan_cmdline(spec)
        return cls(
            name=spec.name,
            vcpus=spec.vcpus,
            memory_mb=spec.memory_mb,
            kernel=spec.kernel,
            cmdline=cmdline.strip(),
            console_log=run.console,
            initrd=spec.initrd or None,
            rootfs=spec.rootfs or None,
            disk=disk,
            nics=nics,
        )


# (argv, log path) -> a started process.  Tests swap in a fake VMM here.
Spawner = Callable[[Sequence[str], str], Awaitable[trio.Process]]


async def spawn_process(argv: Sequence[str], log_path: str) -> trio.Process:
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
    problem = kvm_problem()
    if problem:
        return False, problem
    return True, f"{binary} at {path} with /dev/kvm"


def kvm_problem(kvm: str = "/dev/kvm", cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """Why KVM cannot run a stock guest kernel here (None: it can, as far as we can tell)."""
    if not os.path.exists(kvm):
        return f"no {kvm} (KVM missing or not exposed to this machine)"
    if not os.access(kvm, os.R_OK | os.W_OK):
        return f"{kvm} is not readable and writable (join the kvm group)"
    if platform.machine() in ("x86_64", "i686"):
        try:
            with open(cpuinfo) as f:
                flags = next(
                    (ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []
                )
        except OSError:
            return None
        if "vmx" not in flags and "svm" not in flags:
            # e.g. a paravirtual KVM (kvm_pvm) inside a VM: /dev/kvm exists, but
            # stock guest kernels hang or die on it.
            return f"{kvm} exists but the CPU has no vmx/svm flag (nested or paravirtual KVM)"
    return None


class ApiVmmBackend:
    """Process lifecycle for a VMM driven through an HTTP API on a unix socket.

    Subclasses say how to start the binary and how to talk to it; this class
    owns the runtime dir, pidfile, readiness wait, exit wait, kill and adopt.
    """

    name: ClassVar[str] = ""
    ready_path: ClassVar[str] = "/"

    def __init__(
        self,
        binary: str,
        *,
        spawn: Spawner = spawn_process,
        network: VmNetwork | None = None,
        api_timeout: float = 5.0,
        ready_timeout: float = 5.0,
        kill_timeout: float = 5.0,
        poll_interval: float = 0.02,
    ) -> None:
        self.binary = binary
        self._spawn = spawn
        # Taps, routes and rules; the VMM runs in the namespace its taps are in.
        self.network = network or VmNetwork()
        self.api_timeout = api_timeout
        self.ready_timeout = ready_timeout
        self.kill_timeout = kill_timeout
        self.poll_interval = poll_interval
        # Processes we started ourselves must be reaped, or they linger as zombies.
        self._children: dict[int, trio.Process] = {}

    # -- provided by each product -----------------------------------------------------

    def argv(self, api_socket: str) -> list[str]:
        raise NotImplementedError

    def log_path(self, run: RunDir) -> str:
        raise NotImplementedError

    async def _boot(self, spec: LaunchConfig, handle: VmHandle) -> None:
        raise NotImplementedError

    async def _graceful(self, handle: VmHandle, timeout: float) -> str | None:
        """Ask the guest to shut down: how it ended ("poweroff"/"quit"), or None."""
        raise NotImplementedError

    async def _api_status(self, handle: VmHandle) -> VmStatus:
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------

    def available(self) -> tuple[bool, str]:
        return available(self.binary)

    def accel(self) -> tuple[str, str]:
        ok, why = self.available()
        # Neither VMM has a software fallback: without KVM there is no accelerator.
        return ("kvm", why) if ok else ("none", why)

    async def api(self, handle: VmHandle, method: str, path: str, body: Any = None) -> Any:
        sock = RunDir(handle.rundir).control
        _, value = await request(sock, method, path, body, timeout=self.api_timeout)
        return value

    async def start(
        self,
        spec: VmSpec | LaunchConfig,
        rundir: str,
        secrets: Mapping[str, bytes] | None = None,
    ) -> VmHandle:
        run = RunDir(os.fspath(rundir))
        if len(os.fsencode(run.control)) > _SUN_PATH_MAX:
            raise VmmSetupError(f"API socket path too long for a unix socket: {run.control}")
        if secrets and not spec.initrd:
            raise VmmSetupError(f"vm {spec.name}: secrets need an initrd")
        run.ensure()
        if await self.adopt(run.path) is not None:
            raise VmmSetupError(f"{self.name} for {spec.name} is already running in {run.path}")
        # A LaunchConfig names taps its caller made; a VmSpec gets them here.
        nics = await self.network.setup(spec, run) if isinstance(spec, VmSpec) else ()
        try:
            return await self._start(spec, run, nics, secrets)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.network.teardown(run)
            raise

    async def _start(
        self,
        spec: VmSpec | LaunchConfig,
        run: RunDir,
        nics: tuple[Nic, ...],
        secrets: Mapping[str, bytes] | None,
    ) -> VmHandle:
        cfg = LaunchConfig.resolve(spec, run, nics)
        if cfg.disk == run.disk and not os.path.exists(run.disk):
            # A sparse file: costs nothing until the guest writes to it.
            with open(run.disk, "wb") as f:
                f.truncate(spec.disk_mb * 1024 * 1024)
        if secrets:
            initrd = write_secrets_initrd(run, str(cfg.initrd), secrets)
            cfg = replace(cfg, initrd=initrd)
        fingerprint = spec.fingerprint() if isinstance(spec, VmSpec) else ""
        try:
            argv = [*self.network.exec_prefix(), *self.argv(run.control)]
            proc = await self._spawn(argv, self.log_path(run))
        except OSError as e:
            run.remove_stale()
            raise VmmStartError(f"cannot start {self.binary}: {e}") from None
        self._children[proc.pid] = proc
        handle = VmHandle(cfg.name, run.path, proc.pid, self.name, "kvm", fingerprint)
        _write_pidfile(run.pidfile, proc.pid)
        try:
            await self._wait_ready(handle)
            await self._boot(cfg, handle)
        except ApiError as e:
            with trio.CancelScope(shield=True):
                await self.kill(handle)
            raise VmmStartError(f"{self.name} {cfg.name}: {e}") from None
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.kill(handle)
            raise
        finally:
            # The VMM has read the initrd by now (or is dead): no secrets left on disk.
            if secrets:
                _unlink(run.secrets_initrd)
        if fingerprint:
            run.write_fingerprint(fingerprint)
        log.info("%s %s started (pid %d)", self.name, cfg.name, proc.pid)
        return handle

    async def _wait_ready(self, handle: VmHandle) -> None:
        sock = RunDir(handle.rundir).control
        with trio.move_on_after(self.ready_timeout):
            while True:
                if not self.is_alive(handle):
                    raise VmmStartError(
                        f"{self.name} {handle.name} exited before its API came up"
                        f" (see the logs in {handle.rundir})"
                    )
                try:
                    await request(sock, "GET", self.ready_path, timeout=1.0)
                    return
                except ApiConnectError:
                    pass  # not listening yet
                await trio.sleep(self.poll_interval)
        raise VmmStartError(
            f"{self.name} {handle.name}: API socket not ready after {self.ready_timeout:g}s"
        )

    def is_alive(self, handle: VmHandle) -> bool:
        proc = self._children.get(handle.pid)
        if proc is not None:
            return proc.poll() is None
        return pid_alive(handle.pid) and process_mentions(handle.pid, RunDir(handle.rundir).control)

    async def wait_exit(self, handle: VmHandle, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self.is_alive(handle):
                await trio.sleep(self.poll_interval)
            return True
        return not self.is_alive(handle)

    async def stop(self, handle: VmHandle, timeout: float) -> str:
        """Graceful shutdown within ``timeout`` seconds, else SIGKILL.

        Returns "poweroff" (the guest shut down), "quit" (the VMM was told to
        exit) or "killed".
        """
        # Already gone: the guest powered off (or crashed) on its own.
        how: str | None = "poweroff"
        if self.is_alive(handle):
            how = await self._graceful(handle, timeout)
        if how is None:
            await self.kill(handle)
            return "killed"
        log.info("%s %s stopped (%s)", self.name, handle.name, how)
        await self._cleanup(handle)
        return how

    async def kill(self, handle: VmHandle) -> None:
        """SIGKILL the VMM (only if it is provably this VM's) and clean its runtime dir."""
        if self.is_alive(handle):
            log.warning("%s %s: sending SIGKILL to pid %d", self.name, handle.name, handle.pid)
            try:
                os.kill(handle.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if not await self.wait_exit(handle, self.kill_timeout):
                raise VmmError(f"{self.name} {handle.name}: pid {handle.pid} survived SIGKILL")
        await self._cleanup(handle)

    async def reap(self, handle: VmHandle) -> None:
        """Forget a VMM that exited on its own and remove what it left (taps too)."""
        if not self.is_alive(handle):
            await self._cleanup(handle)

    async def _cleanup(self, handle: VmHandle) -> None:
        self._children.pop(handle.pid, None)
        await self._remove_leftovers(RunDir(handle.rundir))

    async def _remove_leftovers(self, run: RunDir) -> None:
        run.remove_stale()
        _unlink(run.control + ".lock")  # cloud-hypervisor's socket lock
        await self.network.teardown(run)

    async def status(self, handle: VmHandle) -> VmStatus:
        proc = self._children.get(handle.pid)
        if not self.is_alive(handle):
            code = proc.returncode if proc is not None else None
            return VmStatus("exited", f"{self.name} process {handle.pid} is gone", code)
        try:
            return await self._api_status(handle)
        except ApiError as e:
            # Alive but deaf: the lifecycle decides whether to wait or kill.
            return VmStatus("running", f"API not answering: {e}")

    async def adopt(self, rundir: str) -> VmHandle | None:
        """The VMM still running in ``rundir`` from an earlier agent, or None after
        removing what a dead one left behind."""
        run = RunDir(os.fspath(rundir))
        pid = read_pidfile(run.pidfile)
        # The command-line check guards against a recycled pid now owned by another program.
        if pid is None or not (pid_alive(pid) and process_mentions(pid, run.control)):
            await self._remove_leftovers(run)
            return None
        handle = VmHandle(
            run.name, run.path, pid, self.name, "kvm", run.read_fingerprint(), adopted=True
        )
        try:
            await request(run.control, "GET", self.ready_path, timeout=self.api_timeout)
        except ApiError as e:
            # Still ours (the pid and argv match), just unwell: status() will say so.
            log.warning("%s %s: adopted pid %d, API not answering: %s", self.name, run.path, pid, e)
        return handle


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("cannot remove %s: %s", path, e)


def _write_pidfile(path: str, pid: int) -> None:
    # Atomic, not fsynced: after a power cut the process it names is gone.
    atomic_write(path, f"{pid}\n".encode(), mode=0o644, sync=False)


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
    for i, nic in enumerate(spec.nics):
        net: dict[str, Any] = {"iface_id": f"eth{i}", "host_dev_name": nic.tap}
        if nic.mac:
            net["guest_mac"] = nic.mac
        seq.append(("PUT", f"/network-interfaces/eth{i}", net))
    seq.append(("PUT", "/actions", {"action_type": "InstanceStart"}))
    return seq


_FC_STATES = {"Running": "running", "Paused": "paused", "Not started": "shutdown"}


class FirecrackerBackend(ApiVmmBackend):
    """Firecracker through its REST API (needs an uncompressed vmlinux on x86_64)."""

    name: ClassVar[str] = "firecracker"
    ready_path: ClassVar[str] = "/"

    def __init__(self, binary: str = "firecracker", **kwargs: Any) -> None:
        super().__init__(binary, **kwargs)

    def argv(self, api_socket: str) -> list[str]:
        return [self.binary, "--api-sock", api_socket]

    def log_path(self, run: RunDir) -> str:
        # Firecracker writes the guest's serial port (and its own log) to stdout.
        return run.console

    async def _boot(self, spec: LaunchConfig, handle: VmHandle) -> None:
        for method, path, body in boot_requests(spec):
            await self.api(handle, method, path, body)

    async def _graceful(self, handle: VmHandle, timeout: float) -> str | None:
        # Ctrl+Alt+Del through the i8042 device: the guest reboots, and Firecracker
        # exits on a guest reboot. x86_64 only; elsewhere this fails and we kill.
        try:
            await self.api(handle, "PUT", "/actions", {"action_type": "SendCtrlAltDel"})
        except ApiError as e:
            log.warning("firecracker %s: SendCtrlAltDel failed: %s", handle.name, e)
            return None
        return "poweroff" if await self.wait_exit(handle, timeout) else None

    async def _api_status(self, handle: VmHandle) -> VmStatus:
        info = await self.api(handle, "GET", "/")
        state = info.get("state") if isinstance(info, dict) else None
        if isinstance(state, str) and state in _FC_STATES:
            return VmStatus(_FC_STATES[state], f"firecracker: {state}")
        return VmStatus("running", f"firecracker: unexpected instance info {str(info)[:80]}")
