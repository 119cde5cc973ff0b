"""What this machine can do, probed once at start and reported in status.

Owns: cheap, side-effect-free probes (files, PATH, /proc) that say whether a
part of the agent can run here, and why not.  Must never: change the system
(no test interfaces, no module loading), take more than a moment, or make the
agent fail: a missing capability is reported, and every other part runs on.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Capability", "probe_all"]

CAP_NET_ADMIN = 12


@dataclass(frozen=True, slots=True)
class Capability:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what provides it

    def to_wire(self) -> dict:
        return {"name": self.name, "available": self.available, "reason": self.reason}


def _effective_caps() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def has_net_admin() -> bool:
    return bool(_effective_caps() & (1 << CAP_NET_ADMIN))


def _net_admin() -> Capability:
    if has_net_admin():
        return Capability("net_admin", True, "CAP_NET_ADMIN held")
    return Capability(
        "net_admin",
        False,
        "no CAP_NET_ADMIN (run as root or under the systemd unit): WireGuard and VM taps need it",
    )


def _kernel_wireguard(sys_module: Path, modules: Path) -> str | None:
    """How the kernel offers WireGuard, or None: loaded (or built in), or a
    module on disk that creating the link autoloads."""
    if sys_module.exists():
        return "module loaded"
    try:
        if "/wireguard.ko" in (modules / "modules.builtin").read_text():
            return "built in"
    except OSError:
        pass
    if any(modules.glob("kernel/drivers/net/wireguard/wireguard.ko*")):
        return "module on disk"
    return None


def _wireguard(
    sys_module: Path = Path("/sys/module/wireguard"),
    modules: Path | None = None,
) -> Capability:
    # Only a hint: the mesh's real test is creating the link (mesh/wgchoice.py),
    # and `mesh.wireguard` says which backend it got and why.
    if not has_net_admin():
        return Capability("wireguard", False, "needs CAP_NET_ADMIN")
    kernel = _kernel_wireguard(sys_module, modules or Path("/lib/modules") / os.uname().release)
    if kernel is not None:
        return Capability("wireguard", True, f"kernel (netlink): {kernel}")
    if shutil.which("wireguard-go"):
        if not Path("/dev/net/tun").exists():
            return Capability("wireguard", False, "wireguard-go found but /dev/net/tun is missing")
        return Capability(
            "wireguard", True, "userspace (wireguard-go): no kernel module found (the mesh tries)"
        )
    return Capability(
        "wireguard",
        False,
        "no wireguard kernel module and no wireguard-go on PATH (apt install wireguard-go)",
    )


def _tor() -> Capability:
    if importlib.util.find_spec("stem") is None:
        return Capability("tor", False, "python package stem is not installed")
    path = shutil.which("tor")
    if path:
        return Capability("tor", True, f"tor at {path}")
    return Capability("tor", False, "no tor on PATH (apt install tor)")


def _kvm() -> Capability:
    dev = Path("/dev/kvm")
    if not dev.exists():
        return Capability("kvm", False, "no /dev/kvm: VMs fall back to software emulation (TCG)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return Capability("kvm", False, "/dev/kvm is not read/writable by this user (group kvm)")
    return Capability("kvm", True, "/dev/kvm is accessible")


def _qemu() -> Capability:
    path = shutil.which("qemu-system-x86_64")
    if path:
        return Capability("qemu", True, f"qemu at {path}")
    return Capability("qemu", False, "no qemu-system-x86_64 on PATH (apt install qemu-system-x86)")


def _mdns() -> Capability:
    if importlib.util.find_spec("zeroconf") is None:
        return Capability("mdns", False, "python package zeroconf is not installed")
    from .mesh.localaddrs import multicast_interfaces  # this netns, not /sys's

    names = multicast_interfaces()
    if not names:
        return Capability("mdns", False, "no interface that is up and multicast-capable")
    return Capability("mdns", True, "multicast on " + ",".join(sorted(names)))


def probe_all() -> list[Capability]:
    """All probes; each is a few file reads, safe to call from a worker thread."""
    return [_net_admin(), _wireguard(), _tor(), _mdns(), _kvm(), _qemu()]
