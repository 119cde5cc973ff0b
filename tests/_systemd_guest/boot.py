"""Host side of the systemd guest: what it needs, the wheel and one boot.

Owns: `missing` (one line saying what this machine lacks, or None) and
`boot`: the project's wheel and the list of its runtime dependencies' files
in this venv as one tar (tests/_wheel.py; the guest unpacks it into the
README's venv: it has no network), then one TCG boot through tests/_kernel_guest/boot.py with
this directory's init.sh: systemd as PID 1 over the host's root, running
guest.py, whose `KGUEST_RESULT {json}` line comes back on the serial
console.  Used by tests/test_systemd_guest.py.

Must never: write into the host's root outside `out` (the guest's root is a
tmpfs overlay over the read-only 9p mount), or leave a QEMU process behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from tests import _wheel
from tests._kernel_guest import boot as kguest

HERE = Path(__file__).resolve().parent
TREE = HERE.parent.parent
MODULES = [*kguest.MODULES, "overlay"]
BOOT_TIMEOUT = 420


def missing() -> str | None:
    """None, or one line saying what this machine lacks to boot the guest."""
    why = kguest.missing()
    if why is not None and "outside /tmp and /run" not in why:
        return why
    k = kguest.kernel()
    assert k is not None
    if kguest._module_path(k[1], "overlay") is None:
        return f"needs overlay.ko for /boot/vmlinuz-{k[1]} (apt linux-image-amd64)"
    if not os.path.exists("/lib/systemd/systemd"):
        return "needs systemd (apt install systemd)"
    r = subprocess.run(
        ["/usr/bin/python3", "-c", "import venv, sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if r.returncode != 0:
        return "needs /usr/bin/python3 with venv (apt install python3 python3-venv)"
    if r.stdout.split() != [str(v) for v in sys.version_info[:2]]:
        # The guest's venv gets this venv's dependencies (compiled for this python).
        return f"needs /usr/bin/python3 of this venv's version {sys.version_info[:2]}"
    for tool in ("useradd", "runuser", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt install passwd util-linux)"
    return _wheel.missing()


def boot(out: Path, *, timeout: float = BOOT_TIMEOUT) -> tuple[dict, str, float]:
    (wheel,) = _wheel.build_dists(out)
    # One tar file: 9p under TCG pays per file, and these are thousands.
    deps = out / "deps.tar"
    with tarfile.open(deps, "w") as tar:
        for p in _wheel.runtime_files():
            tar.add(p, arcname=p.name)
    return kguest.boot(
        out,
        timeout=timeout,
        init=HERE / "init.sh",
        modules=MODULES,
        script=HERE / "guest.py",
        compile_dirs=("clanagent", "tests/_systemd_guest"),
        env={
            "systemd.show_status": "0",
            "SYSD_TREE": str(TREE),
            "SYSD_WHEEL": str(wheel),
            "SYSD_DEPS": str(deps),
        },
    )
