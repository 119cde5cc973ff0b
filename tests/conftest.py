"""Shared test fixtures and capability checks."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import settings

# Hypothesis checks what decoders do, not how fast: on a shared, loaded
# machine one example can take longer than its 200 ms default deadline
# (seen on test_mesh_tor's key decoder), which failed as "flaky". Speed is
# measured in bench/, never in tests.
settings.register_profile("clanagent", deadline=None)
settings.load_profile("clanagent")


def have_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not have_root(), reason="needs root")


def requires_binary(name: str):
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"needs {name} on PATH")


def _vmm_processes_under(path: str) -> list[int]:
    """Pids of VMM processes (QEMU, Firecracker, cloud-hypervisor) whose
    command line names something under `path`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        exe = os.path.basename(argv[0]).decode(errors="replace") if argv else ""
        if exe.startswith(("qemu-system", "firecracker", "cloud-hypervisor")) and any(
            path.encode() in a for a in argv
        ):
            pids.append(int(entry))
    return pids


@pytest.fixture(autouse=True)
def _no_vm_outlives_its_test(request):
    """VMs outlive their agent on purpose (a restarted agent adopts them), so a
    test whose agents ran a VM and stopped leaves the VMM running: it would
    burn a core for the rest of the suite (seen: ten TCG guests left by one
    test file starving a 100-agent benchmark). After each test that had a
    tmp_path, kill the VMMs started under it."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    import signal

    path = str(request.getfixturevalue("tmp_path"))
    yield
    for pid in _vmm_processes_under(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
