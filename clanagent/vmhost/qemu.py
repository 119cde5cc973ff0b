"""The QEMU `-M microvm` backend: command line, KVM probe, start/stop/adopt over QMP.

Owns: building the qemu-system-x86_64 argv from a VmSpec, choosing KVM or TCG
(and saying why), starting QEMU in its own session so it outlives the agent,
and driving it through QMP.  It must never decide whether a VM should run
(lifecycle.py does) and never signals a pid whose command line does not name
the VM's runtime dir.

Decisions worth knowing:
- KVM is used only when /dev/kvm opens, reports API 12, and the CPU has vmx or
  svm.  A nested "PVM" host (kvm_pvm, no vmx flag) exposes a /dev/kvm that
  cannot run stock guest kernels, so it falls back to TCG.
- Under TCG the guest is told the TSC rate (`tsc_early_khz=`): microvm has no
  HPET/PM timer and PIT calibration under TCG hangs about one boot in ten.
- The serial console goes to `console.log` through a file chardev with
  append=on; the agent rotates it by copy-truncate (console.py).  A pipe to the
  agent would lose the console, or block the guest, while the agent restarts.
- `-no-reboot`: a guest reboot or panic ends the process, so the lifecycle
  sees it and restarts with backoff instead of QEMU looping silently.
- Taps, the clan route and its policy rules are network.py's, shared with
  the other backends; with a namespace QEMU runs inside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence

import trio

from clanagent.vmhost.backend import (
    RunDir,
    VmHandle,
    VmStatus,
    pid_alive,
    process_mentions,
    read_pidfile,
    write_secrets_initrd,
)
from clanagent.vmhost.network import Nic, VmNetwork
from clanagent.vmhost.qmp import QmpDisconnected, QmpProtocolError, open_qmp
from clanagent.vmhost.spec import VmHostLocalError, VmHostRemoteError, VmSpec, clan_cmdline

__all__ = [
    "QEMU_BINARY",
    "QemuBackend",
    "QemuStartError",
    "build_command",
    "host_tsc_khz",
    "probe_kvm",
]

QEMU_BINARY = "qemu-system-x86_64"
_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO=0xAE, 0x00)


class QemuStartError(VmHostRemoteError):
    """QEMU exited or never answered QMP while starting; carries its stderr tail."""


def probe_kvm(dev: str = "/dev/kvm", cpuinfo: str = "/proc/cpuinfo") -> tuple[str, str]:
    """("kvm", reason) when KVM can run a stock guest here, else ("tcg", reason)."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return "tcg", f"{dev} unusable: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as e:
        return "tcg", f"{dev} ioctl failed: {e.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return "tcg", f"{dev} has KVM API {version}, need 12"
    flags: set[str] = set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if not flags & {"vmx", "svm"}:
        pvm = (
            " (kvm_pvm: needs a PVM guest kernel)" if os.path.exists("/sys/module/kvm_pvm") else ""
        )
        return "tcg", f"{dev} present but the CPU has no vmx/svm{pvm}"
    return "kvm", f"{dev} works and the CPU has {'vmx' if 'vmx' in flags else 'svm'}"


def host_tsc_khz(cpuinfo: str = "/proc/cpuinfo") -> int | None:
    """The host CPU clock in kHz from /proc/cpuinfo ("cpu MHz"), or None."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("cpu MHz"):
                    return int(float(line.split(":", 1)[1]) * 1000)
    except (OSError, ValueError):
        pass
    return None


def build_command(
    spec: VmSpec,
    run: RunDir,
    accel: str,
    *,
    tsc_khz: int | None = None,
    initrd: str | None = None,
    nics: Sequence[Nic] = (),
    binary: str = QEMU_BINARY,
) -> list[str]:
    """The argv for QEMU microvm.  `initrd` overrides spec.initrd (secrets initrd);
    `nics` are network.plan_nics(spec) (their taps made by network.VmNetwork)."""
    argv = [binary, "-name", f"{spec.name},process=qemu-vm-{spec.name}"]
    argv += ["-M", "microvm"]
    if accel == "kvm":
        argv += ["-accel", "kvm", "-cpu", "host"]
    else:
        argv += ["-accel", "tcg"]
    argv += ["-m", f"{spec.memory_mb}M", "-smp", str(spec.vcpus)]
    argv += ["-nodefaults", "-no-user-config", "-no-reboot"]
    if spec.graphics:
        # microvm has no display device: a graphics VM still runs headless
        # here (its console is the serial log); only the flag is kept.
        argv += ["-display", "none"]
    else:
        argv += ["-nographic"]
    # The serial console is a socket an agent can attach to (`clanctl vm
    # console`); QEMU itself appends everything the guest prints to the log,
    # whether or not anyone is attached.
    argv += [
        "-chardev",
        f"socket,id=console0,path={run.console_sock},server=on,wait=off,"
        f"logfile={run.console},logappend=on",
    ]
    argv += ["-serial", "chardev:console0"]
    argv += ["-qmp", f"unix:{run.control},server=on,wait=off"]
    argv += ["-pidfile", run.pidfile]
    argv += ["-kernel", spec.kernel]
    rd = spec.initrd if initrd is None else initrd
    if rd:
        argv += ["-initrd", rd]
    append = spec.cmdline
    if spec.rootfs:
        append += " root=/dev/vda ro"
    if accel != "kvm" and tsc_khz:
        append += f" tsc_early_khz={tsc_khz}"
    clan = clan_cmdline(spec) if any(n.clan for n in nics) else ""
    if clan:
        append += " " + clan
    argv += ["-append", append.strip()]
    if spec.rootfs:
        argv += ["-drive", f"id=rootfs,file={spec.rootfs},format=raw,if=none,readonly=on"]
        argv += ["-device", "virtio-blk-device,drive=rootfs"]
    if spec.disk_mb:
        argv += ["-drive", f"id=disk,file={run.disk},format=raw,if=none"]
        argv += ["-device", "virtio-blk-device,drive=disk"]
    for i, nic in enumerate(nics):
        argv += ["-netdev", f"tap,id=net{i},ifname={nic.tap},script=no,downscript=no"]
        mac = f",mac={nic.mac}" if nic.mac else ""
        argv += ["-device", f"virtio-net-device,netdev=net{i}{mac}"]
    return argv


def _ensure_disk(path: str, size_mb: int) -> None:
    # Never shrink or recreate: the writable disk is the VM's only state.
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.truncate(size_mb << 20)


class QemuBackend:
    """QEMU microvm.  `accel`: "auto" probes KVM, "kvm"/"tcg" force one."""

    name = "qemu"

    def __init__(
        self,
        *,
        binary: str | None = None,
        accel: str = "auto",
        start_timeout: float = 10.0,
        network: VmNetwork | None = None,
        qmp_timeout: float = 2.0,
    ) -> None:
        self.binary = binary or shutil.which(QEMU_BINARY) or QEMU_BINARY
        if accel == "auto":
            self._accel = probe_kvm()
        elif accel in ("kvm", "tcg"):
            self._accel = (accel, "forced by configuration")
        else:
            raise VmHostLocalError(f"unknown accel {accel!r}")
        self.tsc_khz = host_tsc_khz()
        self.start_timeout = start_timeout
        # How long a QMP exchange may take before QEMU counts as hung; also the
        # wait for QEMU to exit after `quit`.
        self.qmp_timeout = qmp_timeout
        # Taps, routes and rules; QEMU runs in the namespace its taps are in.
        self.network = network or VmNetwork()
        # Our own children, so exits are reaped and their codes known; adopted
        # VMs are someone else's children and only their pid is watched.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._exit_codes: dict[int, int] = {}

    def accel(self) -> tuple[str, str]:
        return self._accel

    def available(self) -> bool:
        return shutil.which(self.binary) is not None or os.path.exists(self.binary)

    async def start(
        self, spec: VmSpec, rundir: str, secrets: Mapping[str, bytes] | None = None
    ) -> VmHandle:
        run = RunDir(os.path.abspath(rundir))
        run.ensure()
        old = read_pidfile(run.pidfile)
        if old and pid_alive(old) and process_mentions(old, run.path):
            raise VmHostLocalError(f"vm {spec.name} already runs as pid {old}")
        run.remove_stale()
        initrd = None
        if secrets:
            initrd = write_secrets_initrd(run, spec.initrd, secrets)
        if spec.disk_mb:
            _ensure_disk(run.disk, spec.disk_mb)
        nics = await self.network.setup(spec, run)
        argv = build_command(
            spec,
            run,
            self._accel[0],
            tsc_khz=self.tsc_khz,
            initrd=initrd,
            nics=nics,
            binary=self.binary,
        )
        run.write_fingerprint(spec.fingerprint())
        argv = [*self.network.exec_prefix(), *argv]
        errlog = open(os.path.join(run.path, "qemu.stderr"), "wb")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=errlog,
                stderr=errlog,
                start_new_session=True,  # survives the agent's process group and signals
                close_fds=True,
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._remove_leftovers, run)
            raise
        finally:
            errlog.close()
        self._children[proc.pid] = proc
        handle = VmHandle(
            name=spec.name,
            rundir=run.path,
            pid=proc.pid,
            backend=self.name,
            accel=self._accel[0],
            fingerprint=spec.fingerprint(),
        )
        try:
            await self._wait_for_qmp(handle)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            # shielded: a cancelled start must still reap QEMU and remove its taps
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(proc.wait)
                await self._cleanup(handle)
            raise
        finally:
            # QEMU read the initrd into guest memory at startup; drop the copy.
            if initrd:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(initrd)
        return handle

    async def _wait_for_qmp(self, handle: VmHandle) -> None:
        run = RunDir(handle.rundir)
        deadline = trio.current_time() + self.start_timeout
        while True:
            proc = self._children.get(handle.pid)
            if proc is not None and proc.poll() is not None:
                raise QemuStartError(
                    f"qemu for {handle.name} exited with {proc.returncode}: {self._stderr_tail(run)}"
                )
            if os.path.exists(run.control):
                try:
                    async with open_qmp(run.control, timeout=self.qmp_timeout) as q:
                        await q.query_status()
                    return
                except (QmpDisconnected, QmpProtocolError):
                    pass
            if trio.current_time() > deadline:
                raise QemuStartError(f"qemu for {handle.name}: no QMP in {self.start_timeout}s")
            await trio.sleep(0.02)

    @staticmethod
    def _stderr_tail(run: RunDir) -> str:
        try:
            with open(os.path.join(run.path, "qemu.stderr"), "rb") as f:
                return f.read()[-500:].decode(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def _alive(self, handle: VmHandle) -> bool:
        proc = self._children.get(handle.pid)
        if proc is not None:
            return proc.poll() is None
        return pid_alive(handle.pid) and process_mentions(handle.pid, handle.rundir)

    async def _wait_exit(self, handle: VmHandle, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self._alive(handle):
                await trio.sleep(0.02)
            return True
        return False

    async def status(self, handle: VmHandle) -> VmStatus:
        if not self._alive(handle):
            proc = self._children.get(handle.pid)
            code = proc.returncode if proc is not None else self._exit_codes.get(handle.pid)
            return VmStatus("exited", f"qemu exited ({code})", code)
        try:
            async with open_qmp(RunDir(handle.rundir).control, timeout=self.qmp_timeout) as q:
                state = await q.query_status()
        except (QmpDisconnected, QmpProtocolError) as e:
            if not self._alive(handle):
                return await self.status(handle)
            return VmStatus("running", f"alive, QMP unanswered: {e}")
        return VmStatus(state)

    async def stop(self, handle: VmHandle, timeout: float) -> str:
        how = "killed"
        try:
            async with open_qmp(RunDir(handle.rundir).control, timeout=self.qmp_timeout) as q:
                await q.system_powerdown()
        except (QmpDisconnected, QmpProtocolError):
            pass
        if await self._wait_exit(handle, timeout):
            how = "poweroff"
        else:
            # The guest ignored ACPI: QEMU's own quit is still an orderly exit
            # (disks flushed), only then SIGKILL.
            try:
                async with open_qmp(RunDir(handle.rundir).control, timeout=self.qmp_timeout) as q:
                    await q.quit()
            except (QmpDisconnected, QmpProtocolError):
                pass
            if await self._wait_exit(handle, self.qmp_timeout):
                how = "quit"
            else:
                await self.kill(handle)
        await self._cleanup(handle)
        return how

    async def kill(self, handle: VmHandle) -> None:
        if self._alive(handle):
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.pid, signal.SIGKILL)
        await self._wait_exit(handle, 5.0)
        await self._cleanup(handle)

    async def _cleanup(self, handle: VmHandle) -> None:
        proc = self._children.pop(handle.pid, None)
        if proc is not None and proc.poll() is not None:
            self._exit_codes[handle.pid] = proc.returncode
            while len(self._exit_codes) > 256:  # bounded: only recent exits matter
                del self._exit_codes[next(iter(self._exit_codes))]
        await trio.to_thread.run_sync(self._remove_leftovers, RunDir(handle.rundir))

    def _remove_leftovers(self, run: RunDir) -> None:
        run.remove_stale()
        self.network.teardown_sync(run)

    async def reap(self, handle: VmHandle) -> None:
        """Forget an exited VM and remove its stale socket, pidfile and taps."""
        if not self._alive(handle):
            await self._cleanup(handle)

    async def adopt(self, rundir: str) -> VmHandle | None:
        run = RunDir(os.path.abspath(rundir))
        pid = read_pidfile(run.pidfile)
        if pid is None or not pid_alive(pid) or not process_mentions(pid, run.path):
            await trio.to_thread.run_sync(self._remove_leftovers, run)
            return None
        try:
            async with open_qmp(run.control, timeout=self.qmp_timeout) as q:
                await q.query_status()
        except (QmpDisconnected, QmpProtocolError):
            # Alive but deaf: the caller may kill it; adopting it would hide it.
            return None
        accel = "tcg"
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"\0kvm\0" in f.read():
                accel = "kvm"
        return VmHandle(
            name=run.name,
            rundir=run.path,
            pid=pid,
            backend=self.name,
            accel=accel,
            fingerprint=run.read_fingerprint(),
            adopted=True,
        )
