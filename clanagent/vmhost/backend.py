"""The Backend protocol every VMM implements, and the runtime-dir helpers they share.

Owns: the `Backend` interface (start / stop / kill / status / adopt / accel),
the handle and status types, the layout of a VM's runtime dir (pidfile,
control socket, console log, spec fingerprint, secrets initrd), process
liveness checks that survive an agent restart, and the secrets initramfs
(a newc cpio archive appended to the VM's initrd).  The lifecycle never
knows which backend it has; a backend must never decide *whether* a VM
should run (that is lifecycle.py) and must never kill a VM it cannot prove
it started (the pidfile's process must name the VM's runtime dir).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from clanagent.durable import atomic_write
from clanagent.vmhost.spec import VmSpec

__all__ = [
    "Backend",
    "RunDir",
    "SECRETS_DIR_IN_GUEST",
    "VmHandle",
    "VmStatus",
    "newc_archive",
    "pid_alive",
    "process_mentions",
    "read_pidfile",
    "write_secrets_initrd",
]

# Where the guest finds its secrets: files in the initramfs root, 0400.
SECRETS_DIR_IN_GUEST = "run/secrets"


@dataclass(frozen=True)
class RunDir:
    """The files of one VM's runtime dir; every backend uses the same names."""

    path: str

    @property
    def pidfile(self) -> str:
        return os.path.join(self.path, "vmm.pid")

    @property
    def control(self) -> str:
        return os.path.join(self.path, "control.sock")

    @property
    def console(self) -> str:
        return os.path.join(self.path, "console.log")

    @property
    def console_sock(self) -> str:
        """The interactive serial console (QEMU: a socket chardev; one client)."""
        return os.path.join(self.path, "console.sock")

    @property
    def fingerprint(self) -> str:
        return os.path.join(self.path, "spec.fingerprint")

    @property
    def secrets_initrd(self) -> str:
        return os.path.join(self.path, "initrd-with-secrets.img")

    @property
    def disk(self) -> str:
        return os.path.join(self.path, "disk.img")

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def ensure(self) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)

    def read_fingerprint(self) -> str:
        try:
            with open(self.fingerprint) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""

    def write_fingerprint(self, value: str) -> None:
        # Atomic, not fsynced: after a power cut no VM it describes is running.
        atomic_write(self.fingerprint, (value + "\n").encode(), mode=0o644, sync=False)

    def remove_stale(self) -> list[str]:
        """Delete what a dead VMM left behind (never the console log or the disk)."""
        removed = []
        for p in (self.pidfile, self.control, self.console_sock, self.secrets_initrd):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                removed.append(p)
        return removed


@dataclass(frozen=True)
class VmHandle:
    """A VM a backend started or adopted."""

    name: str
    rundir: str
    pid: int
    backend: str
    accel: str
    fingerprint: str
    adopted: bool = False


@dataclass(frozen=True)
class VmStatus:
    """What a backend sees. state: running | paused | shutdown | exited."""

    state: str
    detail: str = ""
    exit_code: int | None = None

    @property
    def alive(self) -> bool:
        return self.state != "exited"


@runtime_checkable
class Backend(Protocol):
    """One VMM.  All methods but `accel` may block on the VMM, so they are async."""

    name: str

    def accel(self) -> tuple[str, str]:
        """(accelerator in use, why): ("kvm", ...) or ("tcg", "no usable KVM: ...")."""
        ...

    async def start(
        self, spec: VmSpec, rundir: str, secrets: Mapping[str, bytes] | None = None
    ) -> VmHandle:
        """Start the VM detached from the agent (its own session); return once its
        control socket answers.  `secrets` maps "service/secret" to bytes."""
        ...

    async def stop(self, handle: VmHandle, timeout: float) -> str:
        """Graceful shutdown (ACPI / API), then kill after `timeout`.
        Returns how it ended: "poweroff", "quit" or "killed"."""
        ...

    async def kill(self, handle: VmHandle) -> None:
        """SIGKILL the VMM and clean its runtime dir."""
        ...

    async def status(self, handle: VmHandle) -> VmStatus: ...

    async def adopt(self, rundir: str) -> VmHandle | None:
        """The VM still running from `rundir` (pidfile + control socket), or None
        after removing what a dead one left behind."""
        ...


def read_pidfile(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except (FileNotFoundError, PermissionError):
        return None
    return int(text) if text.isdigit() else None


def pid_alive(pid: int) -> bool:
    """True for a live process that is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # field 3, after the parenthesised comm (which may contain spaces)
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def process_started_at(pid: int) -> int | None:
    """Unix time a process started (from /proc: works for adopted VMs too), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name may hold spaces or parentheses: count from the last ')'
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        ticks = int(fields[19])  # field 22 of stat(5), counted after pid and comm
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks // os.sysconf("SC_CLK_TCK")


def process_mentions(pid: int, needle: str) -> bool:
    """Whether process `pid`'s command line contains `needle`: a recycled pid
    belongs to some other program and must never be adopted or killed."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle.encode() in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


def _newc_entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    raw = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(raw), 0)
    head = b"070701" + b"".join(b"%08X" % v for v in fields)
    out = head + raw
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def newc_archive(files: Mapping[str, bytes], mode: int = 0o400) -> bytes:
    """An uncompressed newc cpio archive holding `files` (relative paths) and
    their parent directories.  The kernel unpacks archives appended to the
    initrd one after the other, so this adds files to any initramfs."""
    dirs: set[str] = set()
    for path in files:
        if path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"bad path in archive: {path!r}")
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    out = bytearray()
    ino = 1
    for d in sorted(dirs):
        out += _newc_entry(d, stat.S_IFDIR | 0o700, b"", ino)
        ino += 1
    for path in sorted(files):
        out += _newc_entry(path, stat.S_IFREG | mode, files[path], ino)
        ino += 1
    out += _newc_entry("TRAILER!!!", 0, b"", 0)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


def write_secrets_initrd(run: RunDir, base_initrd: str, secrets: Mapping[str, bytes]) -> str:
    """Write base initrd + a cpio of `secrets` under /run/secrets/, 0600, in the rundir.

    The backend deletes it once the VMM has loaded it, so secrets are not left
    on the host's disk outside the secrets part's own store.
    """
    files = {f"{SECRETS_DIR_IN_GUEST}/{ref}": value for ref, value in secrets.items()}
    fd = os.open(run.secrets_initrd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out, open(base_initrd, "rb") as base:
        while chunk := base.read(1 << 20):
            out.write(chunk)
        # each archive must start 4-byte aligned
        pad = -out.tell() % 4
        out.write(b"\0" * pad + newc_archive(files))
    return run.secrets_initrd
