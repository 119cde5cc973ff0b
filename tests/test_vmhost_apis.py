"""Firecracker and cloud-hypervisor backends against fake API servers.

Neither VMM runs here (no usable KVM), so each fake serves the product's
documented API on the real unix socket (firecracker.yaml / cloud-hypervisor.yaml):
it checks method, path, required fields, types and unknown fields the way the
real server rejects them, records every request, and answers like the real
one (micro_http framing, 204/200, Firecracker's ``fault_message`` and
cloud-hypervisor's list-of-messages error bodies).  The "VMM process" is a
real, sleeping Python process whose command line carries the real argv, so
pidfiles, /proc checks, SIGKILL and adoption are exercised for real.

Real clock with short timeouts (a child process cannot follow a mock clock);
every test has a fail_after guard.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from clanagent.mesh.overlay import vm_ip6
from clanagent.vmhost.backend import Backend, RunDir, VmHandle
from clanagent.vmhost.cloudhv import CloudHypervisorBackend
from clanagent.vmhost.cloudhv import available as ch_available
from clanagent.vmhost.firecracker import (
    FirecrackerBackend,
    LaunchConfig,
    VmmSetupError,
    VmmStartError,
    available,
    kvm_problem,
)
from clanagent.vmhost.network import Nic, VmNetwork, tap_name
from clanagent.vmhost.spec import VmSpec, clan_cmdline, clan_mac

# Starts real (sleeping) processes as stand-in VMMs.
pytestmark = pytest.mark.integration

# -- a schema checker, as strict as serde's deny_unknown_fields ------------------------

S = str
I = int  # noqa: E741
B = bool


def check(body: Any, schema: dict[str, Any], required: tuple[str, ...], where: str) -> str | None:
    """The first problem with ``body`` (None: valid).  schema: field -> type or (schema, req)."""
    if not isinstance(body, dict):
        return f"{where}: expected an object"
    for name in required:
        if name not in body:
            return f"{where}: missing field `{name}`"
    for name, value in body.items():
        if name not in schema:
            return f"{where}: unknown field `{name}`"
        want = schema[name]
        if isinstance(want, tuple):  # nested object
            problem = check(value, want[0], want[1], f"{where}.{name}")
            if problem:
                return problem
        elif isinstance(want, list):  # array of objects
            if not isinstance(value, list):
                return f"{where}.{name}: expected an array"
            for i, item in enumerate(value):
                problem = check(item, want[0][0], want[0][1], f"{where}.{name}[{i}]")
                if problem:
                    return problem
        elif want is I and (isinstance(value, bool) or not isinstance(value, int)):
            return f"{where}.{name}: expected an integer"
        elif want is not I and not isinstance(value, want):
            return f"{where}.{name}: expected {want.__name__}"
    return None


# -- the fake servers ------------------------------------------------------------------


def _frame(status: int, body: Any = None, server: str = "Firecracker API") -> bytes:
    """micro_http's framing: keep-alive, a length on everything but 204."""
    head = f"HTTP/1.1 {status} \r\nServer: {server}\r\nConnection: keep-alive\r\n"
    if status == 204:
        return (head + "\r\n").encode()
    payload = b"" if body is None else json.dumps(body).encode()
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


@dataclass
class FakeVmm:
    """Common plumbing: one socket, request log, injected faults, the 'process'."""

    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    # (method, path) -> (status, body): answer this instead of the real behaviour
    faults: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    hang: set[tuple[str, str]] = field(default_factory=set)
    guest_obeys: bool = True  # does the guest shut down when asked
    proc: trio.Process | None = None
    server = "Firecracker API"

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        raise NotImplementedError

    def guest_exits(self) -> None:
        # The VMM process ends when its guest shuts down.
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)

    async def serve(self, path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(16)
        async with trio.open_nursery() as nursery, trio.SocketListener(sock) as listener:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        async with stream:
            buf = b""
            try:
                while True:  # keep-alive: several requests may come on one connection
                    while b"\r\n\r\n" not in buf:
                        chunk = await stream.receive_some(65536)
                        if not chunk:
                            return
                        buf += chunk
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    lines = head.decode().split("\r\n")
                    method, path, version = lines[0].split(" ")
                    assert version == "HTTP/1.1"
                    headers = dict(line.split(": ", 1) for line in lines[1:])
                    length = int(headers.get("Content-Length", "0"))
                    if method == "GET":
                        assert "Content-Length" not in headers, "GET must carry no body headers"
                    while len(buf) < length:
                        buf += await stream.receive_some(65536)
                    raw, buf = buf[:length], buf[length:]
                    body = json.loads(raw) if raw else None
                    if body is not None:
                        assert headers.get("Content-Type") == "application/json"
                    self.calls.append((method, path, body))
                    if (method, path) in self.hang:
                        await trio.sleep_forever()
                    if (method, path) in self.faults:
                        status, answer = self.faults[(method, path)]
                    else:
                        status, answer = self.route(method, path, body)
                    await stream.send_all(_frame(status, answer, self.server))
            except trio.BrokenResourceError:
                return


class FakeFirecracker(FakeVmm):
    """firecracker.yaml: the pre-boot PUTs, /actions and GET /."""

    DRIVE = {
        "drive_id": S,
        "path_on_host": S,
        "is_root_device": B,
        "is_read_only": B,
        "partuuid": S,
        "cache_type": S,
        "io_engine": S,
    }
    NET = {"iface_id": S, "host_dev_name": S, "guest_mac": S, "mtu": I}

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.state = "Not started"
        self.configured: dict[str, Any] = {}

    def fault(self, msg: str) -> tuple[int, Any]:
        return 400, {"fault_message": msg}

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if (method, path) == ("GET", "/"):
            return 200, {
                "app_name": "Firecracker",
                "id": "anonymous-instance",
                "state": self.state,
                "vmm_version": "1.7.0",
            }
        if method != "PUT":
            return self.fault(f"Invalid request method and/or path: {method} {path}.")
        if path == "/actions":
            problem = check(body, {"action_type": S}, ("action_type",), "InstanceActionInfo")
            if problem:
                return self.fault(problem)
            action = body["action_type"]
            if action == "InstanceStart":
                if self.state != "Not started":
                    return self.fault(
                        "The requested operation is not supported after starting the microVM."
                    )
                if "boot-source" not in self.configured:
                    return self.fault("Cannot start microvm without kernel configuration.")
                self.state = "Running"
                return 204, None
            if action == "SendCtrlAltDel":
                if self.state != "Running":
                    return self.fault(
                        "The requested operation is not supported before starting the microVM."
                    )
                if self.guest_obeys:
                    self.guest_exits()
                return 204, None
            return self.fault(f"unknown variant `{action}`")
        if self.state != "Not started":
            return self.fault(
                "The requested operation is not supported after starting the microVM."
            )
        if path == "/machine-config":
            schema = {
                "vcpu_count": I,
                "mem_size_mib": I,
                "smt": B,
                "track_dirty_pages": B,
                "cpu_template": S,
                "huge_pages": S,
            }
            problem = check(body, schema, ("vcpu_count", "mem_size_mib"), "MachineConfiguration")
            if problem is None and not 1 <= body["vcpu_count"] <= 32:
                problem = "The vCPU number is invalid!"
        elif path == "/boot-source":
            schema = {"kernel_image_path": S, "boot_args": S, "initrd_path": S}
            problem = check(body, schema, ("kernel_image_path",), "BootSource")
        elif path.startswith("/drives/"):
            problem = check(body, self.DRIVE, ("drive_id", "is_root_device"), "Drive")
            if problem is None and body["drive_id"] != path.removeprefix("/drives/"):
                problem = "The id from the path does not match the id from the body!"
        elif path.startswith("/network-interfaces/"):
            problem = check(body, self.NET, ("iface_id", "host_dev_name"), "NetworkInterface")
            if problem is None and body["iface_id"] != path.removeprefix("/network-interfaces/"):
                problem = "The id from the path does not match the id from the body!"
        else:
            return self.fault(f"Invalid request method and/or path: {method} {path}.")
        if problem:
            return self.fault(problem)
        self.configured[path.strip("/")] = body
        return 204, None


class FakeCloudHypervisor(FakeVmm):
    """cloud-hypervisor.yaml: vmm.ping, vm.create/boot/info/power-button/shutdown, vmm.shutdown."""

    server = "Cloud Hypervisor API"
    CONSOLE = ({"mode": S, "file": S, "socket": S}, ("mode",))
    VMCONFIG = {
        "cpus": ({"boot_vcpus": I, "max_vcpus": I}, ("boot_vcpus", "max_vcpus")),
        "memory": ({"size": I, "shared": B, "hugepages": B}, ("size",)),
        "payload": ({"kernel": S, "cmdline": S, "initramfs": S, "firmware": S}, ()),
        "disks": [({"path": S, "readonly": B, "direct": B, "id": S}, ())],
        "net": [({"tap": S, "mac": S, "ip": S, "mask": S, "id": S}, ())],
        "serial": CONSOLE,
        "console": CONSOLE,
    }

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.state: str | None = None  # no VM created
        self.config: dict[str, Any] | None = None
        self.vmm_obeys = True

    @staticmethod
    def error(status: int, *msgs: str) -> tuple[int, Any]:
        return status, ["Error from API", *msgs]

    def route(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        if not path.startswith("/api/v1/"):
            return 404, ["Not Found"]
        op = path.removeprefix("/api/v1/")
        gets = {"vmm.ping", "vm.info"}
        if (method == "GET") != (op in gets) or method not in ("GET", "PUT"):
            return 400, ["Bad Request"]
        if op == "vmm.ping":
            return 200, {"build_version": "v40.0", "version": "40.0.0", "pid": 1, "features": []}
        if op == "vm.info":
            if self.state is None:
                return self.error(404, "The VM info is not available", "VM is not created")
            return 200, {"config": self.config, "state": self.state}
        if op == "vm.create":
            problem = check(body, self.VMCONFIG, ("payload",), "VmConfig")
            if problem:
                return 400, ["Failed to deserialize JSON", problem]
            if self.state is not None:
                return self.error(500, "The VM could not be created", "VM is already created")
            self.state, self.config = "Created", body
            return 204, None
        if body is not None:
            return 400, ["Bad Request"]
        if self.state is None and op in ("vm.boot", "vm.power-button", "vm.shutdown"):
            return self.error(404, f"The {op} action failed", "VM is not created")
        if op == "vm.boot":
            self.state = "Running"
            return 204, None
        if op == "vm.power-button":
            if self.state != "Running":
                return self.error(500, "The VM could not be powered off", "VM is not running")
            if self.guest_obeys:
                self.state = "Shutdown"
                self.guest_exits()
            return 204, None
        if op == "vm.shutdown":
            self.state = "Shutdown"
            return 204, None
        if op == "vmm.shutdown":
            if self.vmm_obeys:
                self.guest_exits()
            return 204, None
        return 404, ["Not Found"]


# -- fixtures --------------------------------------------------------------------------

SLEEPER = "import time; time.sleep(600)"


class Harness:
    """Plays the VMM binary: a real sleeping process plus a fake API on its socket."""

    def __init__(self, nursery: trio.Nursery, fake: FakeVmm) -> None:
        self.nursery = nursery
        self.fake = fake
        self.argvs: list[list[str]] = []
        self.procs: list[trio.Process] = []

    async def spawn(self, argv, log_path) -> trio.Process:
        self.argvs.append(list(argv))
        sock = argv[-1].removeprefix("path=")
        with open(log_path, "ab") as out:
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-c", SLEEPER, *argv], stdout=out, stderr=out
            )
        self.procs.append(proc)
        self.fake.proc = proc
        await self.nursery.start(self.fake.serve, sock)
        return proc

    def cleanup(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.kill()


@pytest.fixture
def rundir():
    d = tempfile.mkdtemp(prefix="vmapi-", dir="/tmp")  # short: sun_path is 108 bytes
    yield os.path.join(d, "web")
    shutil.rmtree(d, ignore_errors=True)


def launch(rundir: str, **kw: Any) -> LaunchConfig:
    base = dict(
        name="web",
        vcpus=2,
        memory_mb=256,
        kernel="/k/vmlinux",
        cmdline="console=ttyS0 panic=-1",
        console_log=os.path.join(rundir, "console.log"),
    )
    base.update(kw)
    return LaunchConfig(**base)


FULL = dict(
    initrd="/k/initrd.img",
    rootfs="/k/root.ext4",
    disk="/k/data.img",
    nics=(Nic("lan", "tapweb0", "02:00:00:00:00:01"),),
)

FAST = dict(api_timeout=1.0, ready_timeout=5.0, kill_timeout=5.0, poll_interval=0.01)


def _pid_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


# -- Firecracker -----------------------------------------------------------------------


async def test_firecracker_full_boot_sequence(rundir):
    fake = FakeFirecracker()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = FirecrackerBackend("/opt/fc/firecracker", spawn=h.spawn, **FAST)
            handle = await be.start(launch(rundir, **FULL), rundir)
            sock = os.path.join(rundir, "control.sock")
            assert h.argvs == [["/opt/fc/firecracker", "--api-sock", sock]]
            assert fake.calls[0] == ("GET", "/", None)  # readiness probe
            assert fake.calls[1:] == [
                ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}),
                (
                    "PUT",
                    "/boot-source",
                    {
                        "kernel_image_path": "/k/vmlinux",
                        "boot_args": "console=ttyS0 panic=-1",
                        "initrd_path": "/k/initrd.img",
                    },
                ),
                (
                    "PUT",
                    "/drives/rootfs",
                    {
                        "drive_id": "rootfs",
                        "path_on_host": "/k/root.ext4",
                        "is_root_device": True,
                        "is_read_only": False,
                    },
                ),
                (
                    "PUT",
                    "/drives/data",
                    {
                        "drive_id": "data",
                        "path_on_host": "/k/data.img",
                        "is_root_device": False,
                        "is_read_only": False,
                    },
                ),
                (
                    "PUT",
                    "/network-interfaces/eth0",
                    {
                        "iface_id": "eth0",
                        "host_dev_name": "tapweb0",
                        "guest_mac": "02:00:00:00:00:01",
                    },
                ),
                ("PUT", "/actions", {"action_type": "InstanceStart"}),
            ]
            assert handle == VmHandle("web", rundir, h.procs[0].pid, "firecracker", "kvm", "")
            assert Path(RunDir(rundir).pidfile).read_text() == f"{handle.pid}\n"
            status = await be.status(handle)
            assert (status.state, status.alive) == ("running", True)
            await be.kill(handle)
            assert h.procs[0].returncode == -signal.SIGKILL
            assert not os.path.exists(sock) and not os.path.exists(RunDir(rundir).pidfile)
            assert (await be.status(handle)).state == "exited"
            n.cancel_scope.cancel()


async def test_firecracker_minimal_sequence_without_tap_disk_initrd(rundir):
    fake = FakeFirecracker()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = FirecrackerBackend(spawn=h.spawn, **FAST)
            handle = await be.start(launch(rundir, rootfs="/k/root.ext4"), rundir)
            assert fake.calls[1:] == [
                ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}),
                (
                    "PUT",
                    "/boot-source",
                    {"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0 panic=-1"},
                ),
                (
                    "PUT",
                    "/drives/rootfs",
                    {
                        "drive_id": "rootfs",
                        "path_on_host": "/k/root.ext4",
                        "is_root_device": True,
                        "is_read_only": False,
                    },
                ),
                ("PUT", "/actions", {"action_type": "InstanceStart"}),
            ]
            await be.kill(handle)
            h.cleanup()
            n.cancel_scope.cancel()


async def test_firecracker_400_fault_surfaces_and_nothing_is_left_running(rundir):
    fake = FakeFirecracker()
    fake.faults[("PUT", "/boot-source")] = (
        400,
        {"fault_message": "Invalid kernel path: /k/vmlinux (No such file or directory)"},
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = FirecrackerBackend(spawn=h.spawn, **FAST)
            with pytest.raises(VmmStartError) as info:
                await be.start(launch(rundir), rundir)
            msg = str(info.value)
            assert "PUT /boot-source -> 400" in msg
            assert "Invalid kernel path: /k/vmlinux (No such file or directory)" in msg
            # The half-configured VMM was killed and its runtime files removed.
            assert h.procs[0].returncode == -signal.SIGKILL
            assert not os.path.exists(RunDir(rundir).pidfile)
            assert not os.path.exists(RunDir(rundir).control)
            assert [c[1] for c in fake.calls] == ["/", "/machine-config", "/boot-source"]
            n.cancel_scope.cancel()


async def test_firecracker_hanging_api_times_out_and_kills(rundir):
    fake = FakeFirecracker()
    fake.hang.add(("PUT", "/machine-config"))
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = FirecrackerBackend(spawn=h.spawn, **{**FAST, "api_timeout": 0.3})
            with pytest.raises(VmmStartError, match="no response within 0.3s"):
                await be.start(launch(rundir), rundir)
            assert h.procs[0].returncode == -signal.SIGKILL
            n.cancel_scope.cancel()


async def test_firecracker_that_dies_before_its_api_is_a_start_error(rundir):
    async def dying(argv, log_path):
        return await trio.lowlevel.open_process([sys.executable, "-c", "raise SystemExit(3)"])

    be = FirecrackerBackend(spawn=dying, **FAST)
    with trio.fail_after(20), pytest.raises(VmmStartError, match="exited before its API"):
        await be.start(launch(rundir), rundir)
    assert not os.path.exists(RunDir(rundir).pidfile)


async def test_firecracker_missing_binary_is_a_start_error(rundir):
    be = FirecrackerBackend("/nonexistent/firecracker", **FAST)
    with trio.fail_after(20), pytest.raises(VmmStartError, match="cannot start"):
        await be.start(launch(rundir), rundir)


@pytest.mark.parametrize("obeys", [True, False])
async def test_firecracker_stop_ctrl_alt_del_then_kill(rundir, obeys):
    fake = FakeFirecracker(guest_obeys=obeys)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = FirecrackerBackend(spawn=h.spawn, **FAST)
            handle = await be.start(launch(rundir), rundir)
            before = trio.current_time()
            how = await be.stop(handle, timeout=0.5)
            took = trio.current_time() - before
            assert fake.calls[-1] == ("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
            if obeys:
                assert how == "poweroff" and took < 0.5
                assert h.procs[0].returncode == -signal.SIGTERM
            else:
                assert how == "killed" and took >= 0.5
                assert h.procs[0].returncode == -signal.SIGKILL
            assert not os.path.exists(RunDir(rundir).pidfile)
            # Stopping what is already gone is not a kill.
            assert await be.stop(handle, timeout=0.5) == "poweroff"
            n.cancel_scope.cancel()


async def test_firecracker_adopt_after_agent_restart_and_kill_the_adopted(rundir):
    fake = FakeFirecracker()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            first = FirecrackerBackend(spawn=h.spawn, **FAST)
            started = await first.start(launch(rundir), rundir)
            # A new agent: no memory of the child, only the runtime dir.
            second = FirecrackerBackend(spawn=h.spawn, **FAST)
            adopted = await second.adopt(rundir)
            assert adopted is not None and adopted.adopted
            assert (adopted.pid, adopted.rundir, adopted.backend) == (
                started.pid,
                rundir,
                "firecracker",
            )
            assert (await second.status(adopted)).state == "running"
            # Starting again over a live VMM is refused, not doubled.
            with pytest.raises(VmmSetupError, match="already running"):
                await second.start(launch(rundir), rundir)
            await second.kill(adopted)
            await h.procs[0].wait()
            assert h.procs[0].returncode == -signal.SIGKILL
            assert await second.adopt(rundir) is None
            n.cancel_scope.cancel()


async def test_adopt_refuses_a_pidfile_naming_someone_else(rundir):
    run = RunDir(rundir)
    run.ensure()
    be = FirecrackerBackend(**FAST)
    assert await be.adopt(rundir) is None  # no pidfile at all
    # Our own pid is alive but its command line does not name this VM's socket.
    with open(run.pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")
    open(run.control, "w").close()
    assert await be.adopt(rundir) is None
    assert not os.path.exists(run.pidfile) and not os.path.exists(run.control)
    assert _pid_state(os.getpid()) is not None  # and nobody was killed


async def test_firecracker_adopt_with_a_deaf_api_still_adopts_and_reports_it(rundir):
    fake = FakeFirecracker()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = FirecrackerBackend(spawn=h.spawn, **{**FAST, "api_timeout": 0.2})
            handle = await be.start(launch(rundir), rundir)
            fake.hang.add(("GET", "/"))
            other = FirecrackerBackend(**{**FAST, "api_timeout": 0.2})
            adopted = await other.adopt(rundir)
            assert adopted is not None and adopted.pid == handle.pid
            status = await other.status(adopted)
            assert status.state == "running" and "API not answering" in status.detail
            await be.kill(handle)
            n.cancel_scope.cancel()


async def test_firecracker_from_a_vmspec_with_disk_and_secrets(rundir, tmp_path):
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"BASE-INITRD")
    spec = VmSpec(name="web", kernel="/k/vmlinux", initrd=str(initrd), disk_mb=8, memory_mb=128)
    fake = FakeFirecracker()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = FirecrackerBackend(spawn=h.spawn, **FAST)
            seen_initrd: list[bytes] = []
            real_route = fake.route

            def route(method, path, body):
                if path == "/boot-source":
                    seen_initrd.append(Path(body["initrd_path"]).read_bytes())
                return real_route(method, path, body)

            fake.route = route
            handle = await be.start(spec, rundir, secrets={"db/password": b"hunter2"})
            run = RunDir(rundir)
            boot = fake.configured["boot-source"]
            assert boot["initrd_path"] == run.secrets_initrd
            assert seen_initrd[0].startswith(b"BASE-INITRD") and b"hunter2" in seen_initrd[0]
            assert not os.path.exists(run.secrets_initrd)  # gone once the VMM has it
            assert fake.configured["drives/data"]["path_on_host"] == run.disk
            assert os.path.getsize(run.disk) == 8 * 1024 * 1024
            assert handle.fingerprint == spec.fingerprint() == run.read_fingerprint()
            assert fake.configured["machine-config"] == {"vcpu_count": 1, "mem_size_mib": 128}
            await be.kill(handle)
            n.cancel_scope.cancel()


def test_available_reports_why_not(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert available("firecracker") == (False, "no firecracker on PATH")
    assert FirecrackerBackend().accel() == ("none", "no firecracker on PATH")
    assert ch_available() == (False, "no cloud-hypervisor on PATH")
    tool = tmp_path / "firecracker"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    ok, why = available("firecracker")
    problem = kvm_problem()
    assert (ok, why) == (
        (True, f"firecracker at {tool} with /dev/kvm") if problem is None else (False, problem)
    )


def test_kvm_problem_reasons(tmp_path):
    kvm = tmp_path / "kvm"
    assert "no " in kvm_problem(str(kvm))
    kvm.write_text("")
    kvm.chmod(0o600)
    cpu = tmp_path / "cpuinfo"
    cpu.write_text("processor\t: 0\nflags\t\t: fpu vme vmx sse2\n")
    if platform.machine() == "x86_64":
        assert kvm_problem(str(kvm), str(cpu)) is None
        cpu.write_text("processor\t: 0\nflags\t\t: fpu vme sse2 hypervisor\n")
        assert "no vmx/svm" in kvm_problem(str(kvm), str(cpu))


# -- cloud-hypervisor ------------------------------------------------------------------


async def test_cloud_hypervisor_full_boot_sequence(rundir):
    fake = FakeCloudHypervisor()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = CloudHypervisorBackend("/opt/ch/cloud-hypervisor", spawn=h.spawn, **FAST)
            handle = await be.start(launch(rundir, **FULL), rundir)
            sock = os.path.join(rundir, "control.sock")
            assert h.argvs == [["/opt/ch/cloud-hypervisor", "--api-socket", f"path={sock}"]]
            assert fake.calls == [
                ("GET", "/api/v1/vmm.ping", None),
                (
                    "PUT",
                    "/api/v1/vm.create",
                    {
                        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                        "memory": {"size": 256 * 1024 * 1024},
                        "payload": {
                            "kernel": "/k/vmlinux",
                            "cmdline": "console=ttyS0 panic=-1",
                            "initramfs": "/k/initrd.img",
                        },
                        "serial": {"mode": "File", "file": os.path.join(rundir, "console.log")},
                        "console": {"mode": "Off"},
                        "disks": [
                            {"id": "rootfs", "path": "/k/root.ext4", "readonly": False},
                            {"id": "data", "path": "/k/data.img", "readonly": False},
                        ],
                        "net": [{"id": "net0", "tap": "tapweb0", "mac": "02:00:00:00:00:01"}],
                    },
                ),
                ("PUT", "/api/v1/vm.boot", None),
            ]
            assert handle.backend == "cloud-hypervisor" and handle.pid == h.procs[0].pid
            assert (await be.status(handle)).state == "running"
            await be.kill(handle)
            assert not os.path.exists(sock)
            n.cancel_scope.cancel()


async def test_cloud_hypervisor_minimal_sequence(rundir):
    fake = FakeCloudHypervisor()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = CloudHypervisorBackend(spawn=h.spawn, **FAST)
            handle = await be.start(launch(rundir, vcpus=1, memory_mb=64), rundir)
            assert fake.calls[1:] == [
                (
                    "PUT",
                    "/api/v1/vm.create",
                    {
                        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
                        "memory": {"size": 64 * 1024 * 1024},
                        "payload": {"kernel": "/k/vmlinux", "cmdline": "console=ttyS0 panic=-1"},
                        "serial": {"mode": "File", "file": os.path.join(rundir, "console.log")},
                        "console": {"mode": "Off"},
                    },
                ),
                ("PUT", "/api/v1/vm.boot", None),
            ]
            await be.kill(handle)
            n.cancel_scope.cancel()


async def test_cloud_hypervisor_error_list_surfaces(rundir):
    fake = FakeCloudHypervisor()
    fake.faults[("PUT", "/api/v1/vm.boot")] = (
        500,
        ["Error from API", "The VM could not boot", "Error booting VM: KVM_CREATE_VM failed"],
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = CloudHypervisorBackend(spawn=h.spawn, **FAST)
            with pytest.raises(VmmStartError) as info:
                await be.start(launch(rundir), rundir)
            assert (
                "PUT /api/v1/vm.boot -> 500: Error from API: The VM could not boot: "
                "Error booting VM: KVM_CREATE_VM failed"
            ) in str(info.value)
            assert h.procs[0].returncode == -signal.SIGKILL
            n.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("guest_obeys", "vmm_obeys", "how", "tail"),
    [
        (True, True, "poweroff", ["vm.power-button"]),
        (False, True, "quit", ["vm.power-button", "vm.shutdown", "vmm.shutdown"]),
        (False, False, "killed", ["vm.power-button", "vm.shutdown", "vmm.shutdown"]),
    ],
)
async def test_cloud_hypervisor_stop_escalates(rundir, guest_obeys, vmm_obeys, how, tail):
    fake = FakeCloudHypervisor(guest_obeys=guest_obeys)
    fake.vmm_obeys = vmm_obeys
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = CloudHypervisorBackend(spawn=h.spawn, **FAST)
            handle = await be.start(launch(rundir), rundir)
            booted = len(fake.calls)
            assert await be.stop(handle, timeout=0.3) == how
            assert [p.removeprefix("/api/v1/") for _, p, _ in fake.calls[booted:]] == tail
            want = -signal.SIGKILL if how == "killed" else -signal.SIGTERM
            assert h.procs[0].returncode == want
            assert not os.path.exists(RunDir(rundir).pidfile)
            n.cancel_scope.cancel()


async def test_cloud_hypervisor_status_follows_vm_info(rundir):
    fake = FakeCloudHypervisor()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = CloudHypervisorBackend(spawn=h.spawn, **FAST)
            handle = await be.start(launch(rundir), rundir)
            assert (await be.status(handle)).state == "running"
            fake.state = "Paused"
            assert (await be.status(handle)).state == "paused"
            fake.state = "Shutdown"  # the VM is down but the VMM process lives
            status = await be.status(handle)
            assert (status.state, status.alive) == ("shutdown", True)
            fake.state = None
            assert (await be.status(handle)).state == "shutdown"  # vm.info 404
            adopted = await CloudHypervisorBackend(**FAST).adopt(rundir)
            assert adopted is not None and adopted.pid == handle.pid
            await be.kill(handle)
            assert (await be.status(handle)).state == "exited"
            n.cancel_scope.cancel()


def test_fake_schema_checker_rejects_what_the_real_api_rejects():
    # Guard the guard: the fakes would let a malformed request through otherwise.
    schema = FakeFirecracker.DRIVE
    assert (
        check(
            {"drive_id": "a", "is_root_device": True}, schema, ("drive_id", "is_root_device"), "D"
        )
        is None
    )
    assert "missing field `is_root_device`" in check(
        {"drive_id": "a"}, schema, ("drive_id", "is_root_device"), "D"
    )
    assert "unknown field `readonly`" in check(
        {"drive_id": "a", "is_root_device": True, "readonly": True}, schema, ("drive_id",), "D"
    )
    assert "expected an integer" in check({"vcpu_count": True}, {"vcpu_count": I}, (), "M")


async def test_status_survives_odd_answers(rundir):
    fake = FakeFirecracker()
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            be = FirecrackerBackend(spawn=h.spawn, **FAST)
            handle = await be.start(launch(rundir), rundir)
            fake.faults[("GET", "/")] = (200, ["not", "an", "object"])
            status = await be.status(handle)
            assert status.state == "running" and "unexpected instance info" in status.detail
            fake.faults[("GET", "/")] = (500, {"fault_message": "internal"})
            status = await be.status(handle)
            assert status.state == "running" and "GET / -> 500: internal" in status.detail
            fake.faults.clear()
            fake.state = "Paused"
            assert (await be.status(handle)).state == "paused"
            await be.kill(handle)
            n.cancel_scope.cancel()


def test_both_backends_satisfy_the_backend_protocol():
    for be in (FirecrackerBackend(), CloudHypervisorBackend()):
        assert isinstance(be, Backend)
    assert (FirecrackerBackend.name, CloudHypervisorBackend.name) == (
        "firecracker",
        "cloud-hypervisor",
    )


# -- the clan NIC (root: real taps in a throwaway namespace) ---------------------------


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace and tap)"
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        return "needs iproute2 and /dev/net/tun"
    return None


@pytest.fixture
def netns():
    ns = f"vma{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    yield ns
    subprocess.run(["ip", "netns", "del", ns])


def _ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True).stdout


CLAN_ADDR = str(vm_ip6(b"clan-one", "web"))


def _nic_in_config(fake: FakeVmm) -> tuple[dict[str, Any], str]:
    """(the NIC the VMM was given, the kernel command line)."""
    if isinstance(fake, FakeFirecracker):
        return fake.configured["network-interfaces/eth0"], fake.configured["boot-source"][
            "boot_args"
        ]
    assert fake.config is not None
    (net,) = fake.config["net"]
    return net, fake.config["payload"]["cmdline"]


@pytest.mark.root
@pytest.mark.skipif(_netns_missing() is not None, reason=_netns_missing() or "")
@pytest.mark.parametrize("kind", ["firecracker", "cloud-hypervisor"])
async def test_clan_vm_gets_its_tap_and_mac_and_stop_removes_them(rundir, netns, kind):
    fake: FakeVmm = FakeFirecracker() if kind == "firecracker" else FakeCloudHypervisor()
    cls = FirecrackerBackend if kind == "firecracker" else CloudHypervisorBackend
    spec = VmSpec(
        "web", "/k/vmlinux", initrd="/k/initrd", networks=("clan",), overlay_ip6=CLAN_ADDR
    )
    tap = tap_name("web", 0)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            h = Harness(n, fake)
            network = VmNetwork(netns=netns, clan_interface="wg0")
            be = cls(f"/opt/{kind}", spawn=h.spawn, network=network, **FAST)
            handle = await be.start(spec, rundir)
            # the VMM runs where its tap is
            assert h.argvs[0][:5] == ["ip", "netns", "exec", netns, f"/opt/{kind}"]
            nic, cmdline = _nic_in_config(fake)
            if kind == "firecracker":
                assert nic == {
                    "iface_id": "eth0",
                    "host_dev_name": tap,
                    "guest_mac": clan_mac("web"),
                }
            else:
                assert nic == {"id": "net0", "tap": tap, "mac": clan_mac("web")}
            assert cmdline == f"{spec.cmdline} {clan_cmdline(spec)}"
            assert ",UP" in _ip(netns, "link", "show", tap)
            assert _ip(netns, "-6", "route", "show", CLAN_ADDR).startswith(f"{CLAN_ADDR} dev {tap}")
            assert f"from {CLAN_ADDR} iif {tap} lookup main" in _ip(netns, "-6", "rule", "show")
            assert await be.stop(handle, timeout=1.0) == "poweroff"
            assert _ip(netns, "link", "show", tap) == ""
            assert "3010" not in _ip(netns, "-6", "rule", "show")
            n.cancel_scope.cancel()


@pytest.mark.root
@pytest.mark.skipif(_netns_missing() is not None, reason=_netns_missing() or "")
async def test_taps_go_after_a_failed_start_a_crash_and_an_adopted_corpse(rundir, netns):
    spec = VmSpec("web", "/k/vmlinux", networks=("lan", "clan"), overlay_ip6=CLAN_ADDR)
    taps = [tap_name("web", 0), tap_name("web", 1)]

    def links() -> list[str]:
        return [t for t in taps if _ip(netns, "link", "show", t)]

    network = VmNetwork(netns=netns)
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            # a boot the VMM refuses: killed, and its taps removed
            fake = FakeFirecracker()
            fake.faults[("PUT", "/actions")] = (400, {"fault_message": "no KVM"})
            h = Harness(n, fake)
            be = FirecrackerBackend(spawn=h.spawn, network=network, **FAST)
            with pytest.raises(VmmStartError, match="no KVM"):
                await be.start(spec, rundir)
            assert [c[1] for c in fake.calls if c[1].startswith("/network")] == [
                "/network-interfaces/eth0",
                "/network-interfaces/eth1",
            ]
            assert links() == []
            # the guest crashes (the VMM exits on its own): reap removes the taps
            fake = FakeFirecracker()
            h = Harness(n, fake)
            be = FirecrackerBackend(spawn=h.spawn, network=network, **FAST)
            handle = await be.start(spec, rundir)
            assert links() == taps
            h.procs[-1].kill()
            await h.procs[-1].wait()
            assert not (await be.status(handle)).alive
            await be.reap(handle)
            assert links() == []
            # a VMM that died while no agent ran: the next agent's adopt cleans up
            h = Harness(n, FakeFirecracker())
            be = FirecrackerBackend(spawn=h.spawn, network=network, **FAST)
            await be.start(spec, rundir)
            assert links() == taps
            h.procs[-1].kill()
            await h.procs[-1].wait()
            later = FirecrackerBackend(network=VmNetwork(netns=netns), **FAST)
            assert await later.adopt(rundir) is None
            assert links() == []
            h.cleanup()
            n.cancel_scope.cancel()
