"""Integration: the kernel WireGuard backend, for real, inside a QEMU guest.

The machines that run these tests have no WireGuard module in their own
kernel, so the guest boots Debian's kernel (`linux-image-amd64` ships
`wireguard.ko`) with a tiny initramfs (`_kernel_guest/init.sh`, busybox and
the virtio + 9p modules) that mounts the host's root read-only over 9p and
runs `_kernel_guest/guest.sh` in it.  There `_kernel_guest/scenario.py`
starts three real agents in network namespaces and checks, with the stock
`ip`, `ping` and `wg`, that they build the mesh through pyroute2's WireGuard
netlink API: backend choice, pings, `wg show` against the desired state,
VM /128 routes, an endpoint change, a restart that adopts the interface
without a flap, and a machine removed from the inventory.  The guest prints
one JSON line on the serial console; each test below asserts one property
of it.  The guest boots once per module (about 2 minutes under TCG).

Skips with one line where QEMU, the kernel image, its wireguard.ko or a static
busybox is missing.  It runs under TCG, as in CI (CLANAGENT_KGUEST_ACCEL=kvm
asks for KVM; on the nested-virtualisation machine it was written on, a KVM
guest hung before its kernel printed anything).
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

import pytest

from clanagent.vmhost.backend import newc_archive

HERE = Path(__file__).parent / "_kernel_guest"
TREE = Path(__file__).resolve().parent.parent
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


def _kernel() -> tuple[str, str] | None:
    """(vmlinuz, version) of a kernel in /boot whose modules include wireguard.ko."""
    for bz in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True):
        ver = bz.removeprefix("/boot/vmlinuz-")
        if glob.glob(f"/lib/modules/{ver}/kernel/drivers/net/wireguard/wireguard.ko*"):
            return bz, ver
    return None


def _module_path(ver: str, name: str) -> str | None:
    found = glob.glob(f"/lib/modules/{ver}/kernel/**/{name}.ko", recursive=True)
    return found[0] if found else None


def _missing() -> str | None:
    if QEMU is None:
        return "needs qemu-system-x86_64 (apt install qemu-system-x86)"
    if os.geteuid() != 0:
        return "needs root (network namespaces in the guest, 9p root with security_model=none)"
    k = _kernel()
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
    return None


REASON = _missing()
pytestmark = [
    pytest.mark.root,
    pytest.mark.integration,
    pytest.mark.skipif(REASON is not None, reason=REASON or ""),
]


def build_initramfs(out: Path, ver: str) -> Path:
    files = {
        "init": (HERE / "init.sh").read_bytes(),
        "bin/busybox": Path(BUSYBOX).read_bytes(),
        "sbin/modprobe": MODPROBE,
        "mods/order": ("\n".join(MODULES) + "\n").encode(),
    }
    for m in MODULES:
        files[f"mods/{m}.ko"] = Path(_module_path(ver, m) or "").read_bytes()
    path = out / "initrd.gz"
    path.write_bytes(gzip.compress(newc_archive(files, mode=0o755), compresslevel=1))
    return path


def _accel() -> str:
    want = os.environ.get("CLANAGENT_KGUEST_ACCEL", "tcg")
    if want == "kvm" and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "kvm"
    return "tcg"


def boot(out: Path) -> tuple[dict, str, float]:
    """Boot the guest once: (result, console text, wall seconds)."""
    k = _kernel()
    assert k is not None
    bz, ver = k
    initrd = build_initramfs(out, ver)
    # The guest's root is read-only: byte-compile here what it imports, or every
    # agent start in it compiles the package again (seconds under TCG).
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(TREE / "clanagent"), str(TREE / "tests")],
        capture_output=True,
        timeout=300,
    )
    console = out / "console.log"
    accel = _accel()
    append = (
        "console=ttyS0 quiet panic=-1 tsc_early_khz=2000 "
        f"guest_script={HERE / 'guest.sh'} KGUEST_PYTHON={sys.executable} KGUEST_TREE={TREE}"
    )
    argv = [
        QEMU or "qemu-system-x86_64",
        *("-M", "q35", "-accel", accel, "-m", "1536", "-smp", "2"),
        *("-nographic", "-no-reboot", "-nodefaults", "-serial", f"file:{console}"),
        *("-kernel", bz, "-initrd", str(initrd), "-append", append),
        "-virtfs",
        "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
    ]
    t0 = time.monotonic()
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=BOOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    wall = time.monotonic() - t0
    text = console.read_text(errors="replace") if console.exists() else ""
    result: dict = {}
    for line in text.splitlines():
        if line.startswith("KGUEST_RESULT "):
            result = json.loads(line.removeprefix("KGUEST_RESULT "))
    return result, text, wall


@pytest.fixture(scope="module")
def guest(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("kguest")
    result, text, wall = boot(out)
    print(f"\nkernel WireGuard guest ({_accel()}): {wall:.1f} s wall, boot to power-off")
    if not result:
        pytest.fail("the guest printed no KGUEST_RESULT; console tail:\n" + text[-6000:])
    if result.get("error"):
        print("guest error:", result["error"], "\nconsole tail:\n" + text[-6000:])
    result["_wall"] = wall
    return result


def _check(guest: dict, name: str):
    """The guest's (ok, detail) for one property; a property it never reached fails."""
    got = guest.get("checks", {}).get(name)
    assert got is not None, f"the guest did not get to {name!r}: {guest.get('error')}"
    return got


def test_module_autoloaded_by_creating_the_link(guest) -> None:
    ok, detail = _check(guest, "module_autoloaded")
    assert ok, detail


def test_agents_choose_the_kernel_backend(guest) -> None:
    ok, detail = _check(guest, "backend_kernel")
    assert ok, detail


def test_interfaces_are_kernel_wireguard_links(guest) -> None:
    ok, detail = _check(guest, "links_are_kernel_wireguard")
    assert ok, detail


def test_everyone_pings_everyone_over_the_overlay(guest) -> None:
    ok, detail = _check(guest, "pings")
    assert ok, detail


def test_wg_show_agrees_with_the_desired_state(guest) -> None:
    ok, detail = _check(guest, "wg_show_matches_desired")
    assert ok, detail


def test_vm_route_in_allowed_ips(guest) -> None:
    ok, detail = _check(guest, "vm_route_in_allowed_ips")
    assert ok, detail


def test_restart_adopts_the_interface_without_a_flap(guest) -> None:
    ok, detail = _check(guest, "restart_adopts_without_flap")
    assert ok, detail


def test_changed_endpoint_is_applied(guest) -> None:
    ok, detail = _check(guest, "endpoint_change_applied")
    assert ok, detail


def test_removed_machine_leaves_every_peer_list(guest) -> None:
    ok, detail = _check(guest, "removed_machine_gone")
    assert ok, detail


def test_guest_finished_within_budget(guest) -> None:
    # Boot, three agents, every step and power-off; the scenario's own timings
    # are in guest["timings"] (printed with -s).
    print("guest timings:", json.dumps(guest.get("timings", {})))
    print("guest notes:", json.dumps(guest.get("notes", {})))
    assert guest["_wall"] < BOOT_TIMEOUT and not guest.get("error"), guest.get("error")
