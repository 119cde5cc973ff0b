"""VM specs: one inventory `vms` entry turned into a checked, immutable VmSpec.

Owns: the VmSpec dataclass, the host limits it is checked against (host RAM and
CPUs), the list of problems a declaration has on *this* host, and the error
base of the vmhost part.  It must never start a process, open a socket or touch
a VM's runtime dir: a bad declaration is reported, never half-started.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "BACKENDS",
    "CLAN_GATEWAY",
    "CLAN_NETWORK",
    "DEFAULT_CMDLINE",
    "HostLimits",
    "VmHostError",
    "VmHostLocalError",
    "VmHostRemoteError",
    "VmSpec",
    "VmSpecError",
    "check_spec",
    "clan_cmdline",
    "clan_mac",
    "validate_spec",
]

BACKENDS = ("auto", "qemu", "cloud-hypervisor", "firecracker")
# The guest console is the first serial port; panic=-1 reboots at once and the
# backends run with "no reboot" so a panicking guest shows up as a crash.
DEFAULT_CMDLINE = "console=ttyS0 panic=-1 quiet"
# The network name that means "a NIC on the clan overlay" (other names: a bare
# tap).  The host side of that NIC is the guest's gateway at a fixed
# link-local address, so the guest needs no discovery (no RA, no DHCP).
CLAN_NETWORK = "clan"
CLAN_GATEWAY = "fe80::1"

# Host memory a VM may never take: the agent, the page cache and the VMM
# processes themselves need room, and an OOM-killed agent stops every part.
HOST_RESERVE_MB = 512
HOST_MEMORY_FRACTION = 0.8


class VmHostError(Exception):
    """Base of every vmhost error."""


class VmHostLocalError(VmHostError):
    """Our side is wrong: a bad declaration, a missing binary, a misused API."""


class VmHostRemoteError(VmHostError):
    """The VMM (QEMU, cloud-hypervisor, Firecracker) answered badly or died."""


class VmSpecError(VmHostLocalError, ValueError):
    """A VM declaration cannot run on this host; `problems` lists every reason."""

    def __init__(self, name: str, problems: list[str]) -> None:
        self.name = name
        self.problems = list(problems)
        super().__init__(f"vm {name}: " + "; ".join(problems))


@dataclass(frozen=True)
class VmSpec:
    """What one VM instance on this machine should look like."""

    name: str
    kernel: str
    vcpus: int = 1
    memory_mb: int = 256
    initrd: str = ""
    rootfs: str = ""
    disk_mb: int = 0
    networks: tuple[str, ...] = ()
    secrets: tuple[str, ...] = ()
    backend: str = "auto"
    graphics: bool = False
    cmdline: str = DEFAULT_CMDLINE
    extra: tuple[tuple[str, str], ...] = field(default=())
    # The VM's address on the clan overlay (mesh.overlay.vm_ip6), set by the
    # VM service when `networks` has CLAN_NETWORK; "" otherwise.
    overlay_ip6: str = ""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise VmSpecError(self.name or "?", ["name must be a plain, non-empty name"])
        if self.backend not in BACKENDS:
            raise VmSpecError(self.name, [f"unknown backend {self.backend!r}"])
        if self.vcpus < 1 or self.memory_mb < 16 or self.disk_mb < 0:
            raise VmSpecError(self.name, ["vcpus >= 1, memory_mb >= 16 and disk_mb >= 0"])
        if self.overlay_ip6:
            try:
                ipaddress.IPv6Address(self.overlay_ip6)
            except ValueError:
                raise VmSpecError(
                    self.name, [f"bad overlay address {self.overlay_ip6!r}"]
                ) from None

    @classmethod
    def from_inventory(
        cls, name: str, entry: Mapping[str, Any], cmdline: str = "", overlay_ip6: str = ""
    ) -> VmSpec:
        """Build from a parsed inventory `vms.NAME` entry (parse.py already typed it)."""
        try:
            return cls(
                name=name,
                kernel=str(entry["kernel"]),
                vcpus=int(entry.get("vcpus", 1)),
                memory_mb=int(entry.get("memory_mb", 256)),
                initrd=str(entry.get("initrd", "")),
                rootfs=str(entry.get("rootfs", "")),
                disk_mb=int(entry.get("disk_mb", 0)),
                networks=tuple(entry.get("networks", ())),
                secrets=tuple(entry.get("secrets", ())),
                backend=str(entry.get("backend", "auto")),
                graphics=bool(entry.get("graphics", False)),
                cmdline=cmdline or DEFAULT_CMDLINE,
                overlay_ip6=overlay_ip6,
            )
        except KeyError as e:
            raise VmSpecError(name, [f"missing field {e.args[0]}"]) from None

    def fingerprint(self) -> str:
        """A stable digest: a running VM whose fingerprint differs must be restarted.

        An empty `overlay_ip6` is left out, so VMs without the clan network keep
        the digest they had before the field existed (no restart on upgrade); a
        changed overlay address does restart the VM (its kernel cmdline changes).
        """
        fields = asdict(self)
        if not fields["overlay_ip6"]:
            del fields["overlay_ip6"]
        blob = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def clan_mac(vm: str) -> str:
    """The clan NIC's MAC: locally administered, unicast, stable per VM name.

    The guest finds its clan NIC by this MAC (passed as `clan.mac=`), so the
    NIC's position among the VM's other NICs does not matter."""
    h = hashlib.blake2b(vm.encode(), digest_size=5, person=b"clan-vm-mac").digest()
    return ":".join(f"{b:02x}" for b in b"\x02" + h)


def clan_cmdline(spec: VmSpec) -> str:
    """Kernel cmdline words that configure the guest's clan NIC ("" if it has none).

    `clan.ip6` is the VM's /128, `clan.net` the clan's /48 (routed via the
    host), `clan.gw` the host end of the tap, `clan.mac` the NIC to configure."""
    if not spec.overlay_ip6 or CLAN_NETWORK not in spec.networks:
        return ""
    addr = ipaddress.IPv6Address(spec.overlay_ip6)
    net = ipaddress.IPv6Network((int(addr), 48), strict=False)
    return f"clan.ip6={addr} clan.net={net} clan.gw={CLAN_GATEWAY} clan.mac={clan_mac(spec.name)}"


@dataclass(frozen=True)
class HostLimits:
    """What this host can give to VMs."""

    cpus: int
    memory_mb: int
    max_vm_memory_mb: int

    @classmethod
    def probe(cls, meminfo: str = "/proc/meminfo") -> HostLimits:
        total_mb = 0
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total_mb = int(line.split()[1]) // 1024
                    break
        return cls.from_totals(os.cpu_count() or 1, total_mb)

    @classmethod
    def from_totals(cls, cpus: int, memory_mb: int) -> HostLimits:
        limit = min(int(memory_mb * HOST_MEMORY_FRACTION), memory_mb - HOST_RESERVE_MB)
        return cls(cpus=cpus, memory_mb=memory_mb, max_vm_memory_mb=max(0, limit))


def _readable_file(what: str, path: str) -> str | None:
    if not os.path.isabs(path):
        return f"{what} {path!r} must be an absolute path"
    if not os.path.exists(path):
        return f"{what} {path} does not exist"
    if not os.path.isfile(path):
        return f"{what} {path} is not a regular file"
    if not os.access(path, os.R_OK):
        return f"{what} {path} is not readable"
    return None


def check_spec(spec: VmSpec, host: HostLimits) -> list[str]:
    """Every reason `spec` cannot run here, as clear one-line messages (empty: fine)."""
    problems: list[str] = []
    for what, path, required in (
        ("kernel", spec.kernel, True),
        ("initrd", spec.initrd, False),
        ("rootfs", spec.rootfs, False),
    ):
        if not path:
            if required:
                problems.append(f"{what} is not set")
            continue
        msg = _readable_file(what, path)
        if msg:
            problems.append(msg)
    if spec.memory_mb > host.max_vm_memory_mb:
        problems.append(
            f"memory_mb {spec.memory_mb} exceeds this host's limit of {host.max_vm_memory_mb} MiB "
            f"(host has {host.memory_mb} MiB)"
        )
    if spec.vcpus > host.cpus:
        problems.append(f"vcpus {spec.vcpus} exceeds this host's {host.cpus} cpus")
    if spec.secrets and not spec.initrd:
        # Secrets travel as an extra initramfs appended to the initrd.
        problems.append("secrets need an initrd (they are delivered as an appended initramfs)")
    if not spec.initrd and not spec.rootfs:
        problems.append("neither initrd nor rootfs is set: the guest has nothing to run")
    return problems


def validate_spec(spec: VmSpec, host: HostLimits) -> VmSpec:
    """Return `spec` if it can run here, else raise VmSpecError listing every problem."""
    problems = check_spec(spec, host)
    if problems:
        raise VmSpecError(spec.name, problems)
    return spec
