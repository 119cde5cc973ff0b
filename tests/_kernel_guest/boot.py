"""Host side of the kernel-WireGuard QEMU guest: what it needs, and one boot.

Owns: finding a kernel in /boot whose modules include wireguard.ko, the
tiny initramfs (`init.sh`, a static busybox, the virtio + 9p modules), and
one TCG boot of that kernel with the host's root shared read-only over 9p,
running `guest.sh`, which runs the Python module named by `module` inside
the guest; its `KGUEST_RESULT {json}` line comes back on the serial console.
Used by tests/test_mesh_kernel_vm.py (module `tests._kernel_guest.scenario`)
and bench/mesh_kernel.py (module `bench.mesh_kernel`).

Must never: write into the host's root (the guest mounts it read-only; only
`out` is written, and the tree is byte-compiled before the boot), or leave a
QEMU process behind (a boot that overruns `timeout` is killed).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from clanagent.vmhost.backend import newc_archive

HERE = Path(__file__).resolve().parent
TREE = HERE.parent.parent
QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
# Loaded by the initramfs in this order (dependencies first).
MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
]
# The kernel runs /sbin/modprobe in the initramfs' root when it autoloads a
# module (e.g. creating a WireGuard link); hand that to the host's modprobe.
MODPROBE = b'#!/bin/busybox sh\nexec /bin/busybox chroot /host /sbin/modprobe "$@"\n'
BOOT_TIMEOUT = 420


def kernel() -> tuple[str, str] | None:
    """(vmlinuz, version) of a kernel in /boot whose modules include wireguard.ko."""
    for bz in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        ver = bz.removeprefix("/boot/vmlinuz-")
        if glob.glob(f"/lib/modules/{ver}/kernel/drivers/net/wireguard/wireguard.ko*"):
            return bz, ver
    return None


def _module_path(ver: str, name: str) -> str | None:
    found = glob.glob(f"/lib/modules/{ver}/kernel/**/{name}.ko", recursive=True)
    return found[0] if found else None


def missing() -> str | None:
    """None, or one line saying what this machine lacks to boot the guest."""
    if QEMU is None:
        return "needs qemu-system-x86_64 (apt install qemu-system-x86)"
    if os.geteuid() != 0:
        return "needs root (network namespaces in the guest, 9p root with security_model=none)"
    k = kernel()
    if k is None:
        return "needs a kernel in /boot with wireguard.ko (apt install linux-image-amd64)"
    for m in MODULES:
        if _module_path(k[1], m) is None:
            return f"needs {m}.ko for /boot/vmlinuz-{k[1]} (plain .ko, apt linux-image-amd64)"
    if not os.path.exists(BUSYBOX):
        return "needs a static busybox (apt install busybox-static)"
    with open(BUSYBOX, "rb") as f:
        if b"ld-linux" in f.read(4096):
            return "needs a static busybox (apt install busybox-static)"
    for tool in ("ip", "wg", "ping"):
        if shutil.which(tool) is None:
            return f"needs {tool} on PATH (apt install iproute2 wireguard-tools iputils-ping)"
    for what, path in (("the checkout", HERE), ("the Python", Path(sys.executable))):
        # The guest mounts its own tmpfs over /tmp and /run (its only writable
        # places), so it cannot see files of the host's there.
        if any(Path(path).resolve().is_relative_to(d) for d in ("/tmp", "/run")):
            return f"needs {what} outside /tmp and /run (the guest mounts tmpfs there)"
    return None


def build_initramfs(
    out: Path, ver: str, init: Path = HERE / "init.sh", modules: list[str] = MODULES
) -> Path:
    files = {
        "init": init.read_bytes(),
        "bin/busybox": Path(BUSYBOX).read_bytes(),
        "sbin/modprobe": MODPROBE,
        "mods/order": ("\n".join(modules) + "\n").encode(),
    }
    for m in modules:
        files[f"mods/{m}.ko"] = Path(_module_path(ver, m) or "").read_bytes()
    path = out / "initrd.gz"
    path.write_bytes(gzip.compress(newc_archive(files, mode=0o755), compresslevel=1))
    return path


def accel() -> str:
    want = os.environ.get("CLANAGENT_KGUEST_ACCEL", "tcg")
    if want == "kvm" and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    return "tcg"


def boot(
    out: Path,
    module: str = "tests._kernel_guest.scenario",
    *,
    timeout: float = BOOT_TIMEOUT,
    env: dict[str, str] | None = None,
    compile_dirs: tuple[str, ...] = ("clanagent", "tests"),
    init: Path = HERE / "init.sh",
    modules: list[str] = MODULES,
    script: Path = HERE / "guest.sh",
) -> tuple[dict, str, float]:
    """Boot the guest once, running MODULE in it: (result, console text, wall
    seconds).  ENV: more KEY=VALUE words for the kernel command line (they
    reach the guest's processes as environment variables; no spaces).
    INIT, MODULES and SCRIPT: another initramfs /init, the modules it loads
    and the host file it runs (tests/_systemd_guest boots systemd with them)."""
    k = kernel()
    assert k is not None
    bz, ver = k
    initrd = build_initramfs(out, ver, init, modules)
    # The guest's root is read-only: byte-compile here what it imports, or every
    # Python start in it compiles the package again (seconds under TCG).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *(str(TREE / d) for d in compile_dirs)],
        capture_output=True,
        timeout=300,
    )
    console = out / "console.log"
    extra = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    append = (
        "console=ttyS0 quiet panic=-1 tsc_early_khz=2000 "
        f"guest_script={script} KGUEST_PYTHON={sys.executable} KGUEST_TREE={TREE} "
        f"KGUEST_MODULE={module} {extra}"
    ).strip()
    argv = [
        QEMU or "qemu-system-x86_64",
        *("-M", "q35", "-accel", accel(), "-m", "1536", "-smp", "2"),
        *("-nographic", "-no-reboot", "-nodefaults", "-serial", f"file:{console}"),
        *("-kernel", bz, "-initrd", str(initrd), "-append", append),
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ]
    t0 = time.monotonic()
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pass  # subprocess.run killed QEMU; the console says how far it got
    wall = time.monotonic() - t0
    text = console.read_text(errors="replace") if console.exists() else ""
    result: dict = {}
    for line in text.splitlines():
        if line.startswith("KGUEST_RESULT "):
            result = json.loads(line.removeprefix("KGUEST_RESULT "))
    return result, text, wall
