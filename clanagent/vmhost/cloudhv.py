"""cloud-hypervisor backend.

Owns: starting ``cloud-hypervisor --api-socket path=RUNDIR/control.sock``
(its own log to ``RUNDIR/cloud-hypervisor.log``, the guest serial port to the
``RUNDIR/console.log`` through the VM config), the VmConfig built from a spec
(:func:`vm_config`) and the request sequence that creates and boots it
(:func:`boot_requests`), graceful stop (``vm.power-button``; if the guest has
not powered off within the timeout, ``vm.shutdown`` + ``vmm.shutdown``, then
SIGKILL), status from ``vm.info`` and adoption (shared with Firecracker, see
:class:`~clanagent.vmhost.firecracker.ApiVmmBackend`).

Must never: leave a VMM running after a failed create or boot, or report a VM
running that the API says is shut down.
"""

from __future__ import annotations

import logging
import os
from typing import Any, ClassVar

from clanagent.vmhost.backend import RunDir, VmHandle, VmStatus
from clanagent.vmhost.firecracker import ApiVmmBackend, LaunchConfig
from clanagent.vmhost.firecracker import available as _available
from clanagent.vmhost.http_unix import ApiError, ApiStatusError

__all__ = ["API_ROOT", "CloudHypervisorBackend", "available", "boot_requests", "vm_config"]

log = logging.getLogger("clanagent.vmhost.cloudhv")

API_ROOT = "/api/v1"
_MIB = 1024 * 1024
# After the guest ignored the power button: how long vmm.shutdown may take.
_VMM_SHUTDOWN_GRACE = 2.0


def available(binary: str = "cloud-hypervisor") -> tuple[bool, str]:
    """Whether cloud-hypervisor can run VMs here (binary on PATH, usable KVM), and why not."""
    return _available(binary)


def vm_config(spec: LaunchConfig) -> dict[str, Any]:
    """The ``VmConfig`` body of ``vm.create`` for ``spec`` (sizes in bytes, not MiB)."""
    payload: dict[str, Any] = {"kernel": str(spec.kernel), "cmdline": spec.cmdline}
    if spec.initrd:
        payload["initramfs"] = str(spec.initrd)
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpus},
        "memory": {"size": spec.memory_mb * _MIB},
        "payload": payload,
        # ttyS0 to a file; the virtio console stays off so "console=ttyS0" is the one.
        "serial": {"mode": "File", "file": str(spec.console_log)},
        "console": {"mode": "Off"},
    }
    disks = []
    if spec.rootfs:
        disks.append({"id": "rootfs", "path": str(spec.rootfs), "readonly": False})
    if spec.disk:
        disks.append({"id": "data", "path": str(spec.disk), "readonly": False})
    if disks:
        config["disks"] = disks
    nets = []
    for i, nic in enumerate(spec.nics):
        net: dict[str, Any] = {"id": f"net{i}", "tap": nic.tap}
        if nic.mac:
            net["mac"] = nic.mac
        nets.append(net)
    if nets:
        config["net"] = nets
    return config


def boot_requests(spec: LaunchConfig) -> list[tuple[str, str, dict[str, Any] | None]]:
    """The exact (method, path, body) sequence that creates and boots ``spec``."""
    return [
        ("PUT", f"{API_ROOT}/vm.create", vm_config(spec)),
        ("PUT", f"{API_ROOT}/vm.boot", None),
    ]


# VmInfo.state -> VmStatus.state ("Created": the VMM holds a VM it has not booted).
_CH_STATES = {
    "Running": "running",
    "Paused": "paused",
    "BreakPoint": "paused",
    "Created": "shutdown",
    "Shutdown": "shutdown",
}


class CloudHypervisorBackend(ApiVmmBackend):
    """cloud-hypervisor through its REST API (``/api/v1``)."""

    name: ClassVar[str] = "cloud-hypervisor"
    ready_path: ClassVar[str] = f"{API_ROOT}/vmm.ping"

    def __init__(self, binary: str = "cloud-hypervisor", **kwargs: Any) -> None:
        super().__init__(binary, **kwargs)

    def argv(self, api_socket: str) -> list[str]:
        return [self.binary, "--api-socket", f"path={api_socket}"]

    def log_path(self, run: RunDir) -> str:
        # The guest serial goes to console.log through the VM config; this is the VMM's own log.
        return os.path.join(run.path, "cloud-hypervisor.log")

    async def _boot(self, spec: LaunchConfig, handle: VmHandle) -> None:
        for method, path, body in boot_requests(spec):
            await self.api(handle, method, path, body)

    async def _graceful(self, handle: VmHandle, timeout: float) -> str | None:
        # ACPI power button: a guest that handles it powers off, and
        # cloud-hypervisor exits when its guest shuts down.
        try:
            await self.api(handle, "PUT", f"{API_ROOT}/vm.power-button")
        except ApiError as e:
            log.warning("cloud-hypervisor %s: power button failed: %s", handle.name, e)
        else:
            if await self.wait_exit(handle, timeout):
                return "poweroff"
        # The guest ignored it (no ACPI handling): stop the VM, then the VMM itself.
        for path in ("vm.shutdown", "vmm.shutdown"):
            try:
                await self.api(handle, "PUT", f"{API_ROOT}/{path}")
            except ApiError as e:
                log.warning("cloud-hypervisor %s: %s failed: %s", handle.name, path, e)
        return "quit" if await self.wait_exit(handle, _VMM_SHUTDOWN_GRACE) else None

    async def _api_status(self, handle: VmHandle) -> VmStatus:
        try:
            info = await self.api(handle, "GET", f"{API_ROOT}/vm.info")
        except ApiStatusError as e:
            if e.status == 404:
                return VmStatus("shutdown", "cloud-hypervisor: no VM created")
            raise
        state = info.get("state") if isinstance(info, dict) else None
        if isinstance(state, str) and state in _CH_STATES:
            return VmStatus(_CH_STATES[state], f"cloud-hypervisor: {state}")
        return VmStatus("running", f"cloud-hypervisor: unexpected vm.info {str(info)[:80]}")
