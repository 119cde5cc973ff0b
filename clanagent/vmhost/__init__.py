"""vmhost: micro VMs on this machine behind one small Backend interface.

`spec` (declarations checked against this host), `backend` (the interface
and run dirs), `qemu` (QEMU -M microvm, KVM or TCG) with `qmp`,
`firecracker` and `cloudhv` (their API sockets, via `http_unix`),
`network` (every backend's taps, clan route and policy rules),
`lifecycle` (the sans-IO reconciler with restart backoff and adoption),
`console` (rotated console logs) and `api` (the vm.* control methods).
"""

from .backend import Backend, RunDir, VmHandle, VmStatus
from .lifecycle import Backoff, Reconciler
from .spec import HostLimits, VmHostError, VmSpec, VmSpecError, check_spec

__all__ = [
    "Backend",
    "Backoff",
    "HostLimits",
    "Reconciler",
    "RunDir",
    "VmHandle",
    "VmHostError",
    "VmSpec",
    "VmSpecError",
    "VmStatus",
    "check_spec",
]
