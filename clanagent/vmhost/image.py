"""A minimal VM image from this host's packages: the kernel and a busybox initramfs.

Owns: extracting the uncompressed vmlinux (PVH-bootable, which skips about
2.5 s of in-guest decompression under TCG) from Debian's linux-image bzImage,
and an initramfs with a static busybox whose init prints `VM_READY`, shows
the secrets it received (their names), and powers off on the ACPI button.
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
while true; do sleep 3600; done
"""

_MODULES = (("button", "drivers/acpi/button.ko"), ("evdev", "drivers/input/evdev.ko"))


def _kernels() -> list[str]:
    return sorted(glob.glob("/boot/vmlinuz-*"))


def _busybox() -> str:
    return shutil.which("busybox") or "/bin/busybox"


def _is_static(path: str) -> bool:
    # A dynamically linked ELF names its interpreter (ld-linux) near the start.
    with open(path, "rb") as f:
        return b"ld-linux" not in f.read(4096)


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
    for _, rel in _MODULES:
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
    for name, rel in _MODULES:
        files[f"lib/modules/{name}.ko"] = Path(f"/lib/modules/{kver}/kernel/{rel}").read_bytes()
    initrd = out / "initramfs.cpio.gz"
    initrd.write_bytes(gzip.compress(newc_archive(files, mode=0o755), compresslevel=1))
    return str(vmlinux), str(initrd)
