"""One real clanagent for the guest scenario, its VMs on the in-memory backend.

Usage: python -m tests._kernel_guest.agent CONFIG

The agent is the product's, unchanged, except that the VM service is handed
tests/_fake_vm_backend.py instead of the real VMMs (the guest has no room to
boot VMs in it): a VM the inventory places here "runs" at once, and the VM
service publishes its real signed `vm-status` record, which is what the mesh
turns into a /128 in this machine's allowed-ips on every peer.
"""

from __future__ import annotations

import sys

from clanagent.cli.agent_main import main
from clanagent.vmhost import service as vm_service

from .._fake_vm_backend import FakeVmBackend

if __name__ == "__main__":
    # Named "qemu": the clan network is only offered on the qemu backend.
    fake = (
        {"qemu": FakeVmBackend(name="qemu")},
        {"firecracker": "guest", "cloud-hypervisor": "guest"},
    )
    vm_service.probe_backends = lambda clan_interface="": fake
    sys.exit(main(["run", "--config", sys.argv[1]]))
