"""A minimal VM image from this host's packages: the kernel and a busybox initramfs.

Owns: extracting the uncompressed vmlinux (PVH-bootable, which skips about
2.5 s of in-guest decompression under TCG) from Debian's linux-image bzImage,
and an initramfs with a static busybox whose init prints `VM_READY`, shows
the secrets it received (their names), and powers off on the ACPI button.
With `clan.ip6=` on the kernel cmdline (a VM on the "clan" network, see
spec.clan_cmdline) it first loads the virtio-mmio network drivers, puts the
address on the NIC whose MAC is `clan.mac=` (no DAD: the address is the VM's
own by construction), routes the clan /48 via the host's `clan.gw=` and
prints `VM_NET_READY ADDR`.
Used by `make demo` and the tests; `clanagent vm-image DIR` builds one.
Must never: write outside the directory it is given.
"""

from __future__ import annotations

import glob
import gzip
import lzma
import os
import shutil
from pathlib import Path

from .backend import newc_archive
from .spec import VmHostLocalError

__all__ = ["INIT", "image_problem", "build_image"]

INIT = b"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /etc/acpi/PWRF
/bin/busybox --install -s /bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
for f in /run/secrets/*/*; do [ -f "$f" ] && echo "SECRET $f=$(cat $f)"; done
for a in $(cat /proc/cmdline); do
  case $a in
    clan.ip6=*) CIP=${a#clan.ip6=} ;;
    clan.net=*) CNET=${a#clan.net=} ;;
    clan.gw=*) CGW=${a#clan.gw=} ;;
    clan.mac=*) CMAC=${a#clan.mac=} ;;
  esac
done
if [ -n "$CIP" ]; then
  for m in virtio_ring virtio virtio_mmio failover net_failover virtio_net; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko
  done
  IF=; n=0
  while [ -z "$IF" ] && [ $n -lt 100 ]; do
    for d in /sys/class/net/*; do
      [ "$(cat $d/address)" = "$CMAC" ] && IF=${d##*/}
    done
    [ -z "$IF" ] && sleep 0.05
    n=$((n+1))
  done
  if [ -n "$IF" ]; then
    ip link set lo up
    echo 0 > /proc/sys/net/ipv6/conf/$IF/accept_dad
    ip link set $IF up
    ip -6 addr add $CIP/128 dev $IF
    ip -6 route add $CNET via $CGW dev $IF
    echo "VM_NET_READY $CIP"
  else
    echo "VM_NET_FAILED no NIC with MAC $CMAC"
  fi
fi
case "$(cat /proc/cmdline)" in
  *vmtest.acpi=off*) ;;
  *)
    insmod /lib/modules/button.ko
    insmod /lib/modules/evdev.ko
    printf '#!/bin/sh\\necho VM_POWEROFF >/dev/console\\npoweroff -f\\n' > /etc/acpi/PWRF/00000080
    chmod +x /etc/acpi/PWRF/00000080
    echo 'PWRF PWRF/00000080' > /etc/acpid.conf
    while [ ! -e /dev/input/event0 ]; do sleep 0.05; done
    acpid -d -c /etc/acpi -a /etc/acpid.conf -l /dev/null >/dev/null 2>&1 &
    # READY only once acpid holds the power button open, or a stop could be missed
    while ! ls -l /proc/$!/fd 2>/dev/null | grep -q event; do sleep 0.05; done
    ;;
esac
echo VM_READY
# a shell on the serial console for `clanctl vm console` (respawned on exit)
while true; do setsid cttyhack sh; sleep 0.2; done
"""

_MODULES = (("button", "drivers/acpi/button.ko"), ("evdev", "drivers/input/evdev.ko"))
# virtio-mmio networking for the clan NIC, in load order (dependencies first).
# Debian builds them all as modules; one that a kernel has built in is skipped.
_NET_MODULES = (
    ("virtio_ring", "drivers/virtio/virtio_ring.ko"),
    ("virtio", "drivers/virtio/virtio.ko"),
    ("virtio_mmio", "drivers/virtio/virtio_mmio.ko"),
    ("failover", "net/core/failover.ko"),
    ("net_failover", "drivers/net/net_failover.ko"),
    ("virtio_net", "drivers/net/virtio_net.ko"),
)


def _kernels() -> list[str]:
    return sorted(glob.glob("/boot/vmlinuz-*"))


def _busybox() -> str:
    return shutil.which("busybox") or "/bin/busybox"


def _is_static(path: str) -> bool:
    # A dynamically linked ELF names its interpreter (ld-linux) near the start.
    with open(path, "rb") as f:
        return b"ld-linux" not in f.read(4096)


def _builtin(kver: str) -> set[str]:
    try:
        with open(f"/lib/modules/{kver}/modules.builtin") as f:
            return {line.strip().removeprefix("kernel/") for line in f}
    except OSError:
        return set()


def _modules(kver: str) -> list[tuple[str, str]]:
    """The (name, path under kernel/) the image needs as .ko files on this kernel."""
    builtin = _builtin(kver)
    return [*_MODULES, *((n, rel) for n, rel in _NET_MODULES if rel not in builtin)]


def image_problem() -> str | None:
    """Why no image can be built here (one line with the fix), or None."""
    if shutil.which("qemu-system-x86_64") is None:
        return "needs qemu-system-x86_64 (apt install qemu-system-x86)"
    if not _kernels():
        return "needs a kernel in /boot (apt install linux-image-amd64)"
    bb = _busybox()
    if not os.path.exists(bb) or not _is_static(bb):
        return "needs a static busybox (apt install busybox-static)"
    kver = _kernels()[-1].removeprefix("/boot/vmlinuz-")
    for _, rel in _modules(kver):
        if not os.path.exists(f"/lib/modules/{kver}/kernel/{rel}"):
            return f"needs /lib/modules/{kver}/kernel/{rel} (apt install linux-image-amd64)"
    return None


def build_image(out_dir: str | Path) -> tuple[str, str]:
    """(vmlinux, initramfs.cpio.gz) under `out_dir`; VmHostLocalError with the fix if not."""
    why = image_problem()
    if why:
        raise VmHostLocalError(why)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bz = _kernels()[-1]
    kver = bz.removeprefix("/boot/vmlinuz-")
    vmlinux = out / "vmlinux"
    data = Path(bz).read_bytes()
    off = data.find(b"\xfd7zXZ\x00")
    while off != -1:
        try:
            elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data[off:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            vmlinux.write_bytes(elf)
            break
        off = data.find(b"\xfd7zXZ\x00", off + 1)
    else:
        raise VmHostLocalError(f"no xz-compressed ELF kernel inside {bz}")
    files = {"init": INIT, "bin/busybox": Path(_busybox()).read_bytes()}
    for name, rel in _modules(kver):
        files[f"lib/modules/{name}.ko"] = Path(f"/lib/modules/{kver}/kernel/{rel}").read_bytes()
    initrd = out / "initramfs.cpio.gz"
    initrd.write_bytes(gzip.compress(newc_archive(files, mode=0o755), compresslevel=1))
    return str(vmlinux), str(initrd)
