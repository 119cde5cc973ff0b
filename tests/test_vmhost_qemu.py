"""The QEMU microvm backend: its command line, and (integration) real VMs under TCG.

The integration tests boot Debian's kernel (linux-image-amd64, uncompressed to
an ELF vmlinux for a fast PVH boot) with an initramfs built here from
busybox-static.  The guest's init prints VM_READY on the serial console, prints
the secrets it was given, and powers off when QEMU's ACPI power button is
pressed (busybox acpid + the button/evdev modules), so a graceful stop is a
real guest poweroff.  They skip with one line when qemu, the kernel or busybox
is missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import trio

from clanagent.vmhost.backend import Backend, RunDir
from clanagent.vmhost.console import ConsoleLog
from clanagent.vmhost.image import build_image, image_problem
from clanagent.vmhost.lifecycle import (
    AdoptVm,
    Backoff,
    Reconciler,
    ReportError,
    RestartVm,
    StartVm,
    StopVm,
    VmExited,
    VmStarted,
    VmStartFailed,
    VmStopped,
)
from clanagent.vmhost.network import Nic, VmNetwork, tap_name
from clanagent.vmhost.qemu import (
    QemuBackend,
    QemuStartError,
    build_command,
    host_tsc_khz,
    probe_kvm,
)
from clanagent.vmhost.spec import HostLimits, VmHostError, VmSpec, VmSpecError, validate_spec

# --- the command line -------------------------------------------------------------


def _argv(**kw):
    spec = VmSpec("web", "/boot/vmlinux", initrd="/img/initrd", vcpus=2, memory_mb=384, **kw)
    nics = [Nic("lan", "tap0")]
    return build_command(spec, RunDir("/run/vm/web"), "tcg", tsc_khz=2_600_000, nics=nics)


def _opt(argv, flag):
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_command_line_microvm_tcg():
    argv = _argv()
    assert argv[0] == "qemu-system-x86_64"
    assert _opt(argv, "-M") == ["microvm"] and _opt(argv, "-accel") == ["tcg"]
    assert {"-nodefaults", "-no-user-config", "-nographic", "-no-reboot"} <= set(argv)
    assert _opt(argv, "-m") == ["384M"] and _opt(argv, "-smp") == ["2"]
    assert _opt(argv, "-qmp") == ["unix:/run/vm/web/control.sock,server=on,wait=off"]
    assert _opt(argv, "-pidfile") == ["/run/vm/web/vmm.pid"]
    assert _opt(argv, "-chardev") == [
        "socket,id=console0,path=/run/vm/web/console.sock,server=on,wait=off,"
        "logfile=/run/vm/web/console.log,logappend=on"
    ]
    assert _opt(argv, "-serial") == ["chardev:console0"]
    assert _opt(argv, "-kernel") == ["/boot/vmlinux"] and _opt(argv, "-initrd") == ["/img/initrd"]
    append = _opt(argv, "-append")[0]
    assert append.startswith("console=ttyS0") and "tsc_early_khz=2600000" in append
    assert _opt(argv, "-netdev") == ["tap,id=net0,ifname=tap0,script=no,downscript=no"]
    assert "virtio-net-device,netdev=net0" in _opt(argv, "-device")


def test_command_line_kvm_rootfs_and_disk():
    spec = VmSpec("db", "/k", rootfs="/img/root.raw", disk_mb=64)
    argv = build_command(spec, RunDir("/r/db"), "kvm", tsc_khz=2_600_000)
    assert _opt(argv, "-accel") == ["kvm"] and _opt(argv, "-cpu") == ["host"]
    append = _opt(argv, "-append")[0]
    assert "tsc_early_khz" not in append and "root=/dev/vda ro" in append
    drives = _opt(argv, "-drive")
    assert drives[0] == "id=rootfs,file=/img/root.raw,format=raw,if=none,readonly=on"
    assert drives[1] == "id=disk,file=/r/db/disk.img,format=raw,if=none"
    assert "-initrd" not in argv and "-netdev" not in argv


def test_tap_names_fit_ifnamsiz_and_are_stable():
    assert tap_name("a-very-long-vm-name-indeed", 3) == tap_name("a-very-long-vm-name-indeed", 3)
    assert len(tap_name("a-very-long-vm-name-indeed", 12)) <= 15
    assert tap_name("a", 0) != tap_name("b", 0)


def test_disk_is_created_sparse_once_and_never_truncated(tmp_path):
    from clanagent.vmhost.qemu import _ensure_disk

    p = str(tmp_path / "disk.img")
    _ensure_disk(p, 64)
    assert os.path.getsize(p) == 64 << 20 and os.stat(p).st_blocks == 0
    with open(p, "r+b") as f:
        f.write(b"data")
    _ensure_disk(p, 8)  # a smaller declaration never destroys the disk
    assert os.path.getsize(p) == 64 << 20 and Path(p).read_bytes()[:4] == b"data"


def test_kvm_probe_says_why(tmp_path):
    accel, reason = probe_kvm(dev=str(tmp_path / "nokvm"))
    assert accel == "tcg" and "unusable" in reason
    accel, reason = probe_kvm()
    assert accel in ("kvm", "tcg") and reason


def test_tsc_khz_from_cpuinfo(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text("processor : 0\ncpu MHz\t\t: 2599.998\n")
    assert host_tsc_khz(str(p)) == 2599998
    p.write_text("processor : 0\n")
    assert host_tsc_khz(str(p)) is None


def test_qemu_backend_is_a_backend():
    assert isinstance(QemuBackend(accel="tcg"), Backend)
    assert QemuBackend(accel="tcg").accel() == ("tcg", "forced by configuration")
    with pytest.raises(VmHostError):
        QemuBackend(accel="xen")


async def test_adopt_never_takes_a_recycled_pid(tmp_path):
    run = RunDir(str(tmp_path / "vm"))
    run.ensure()
    # a live process that is not this VM's QEMU (pytest itself)
    Path(run.pidfile).write_text(f"{os.getpid()}\n")
    Path(run.control).write_text("")
    with trio.fail_after(5):
        assert await QemuBackend(accel="tcg").adopt(run.path) is None
    assert not os.path.exists(run.pidfile) and not os.path.exists(run.control)


# --- integration: real microvms under TCG -------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")
KERNELS = sorted(glob.glob("/boot/vmlinuz-*"))
BUSYBOX = shutil.which("busybox") or "/bin/busybox"


def _missing() -> str | None:
    if QEMU is None:
        return "needs qemu-system-x86_64 (apt qemu-system-x86)"
    if not KERNELS:
        return "needs a kernel in /boot (apt linux-image-amd64)"
    if not os.path.exists(BUSYBOX) or b"static" not in _file_kind(BUSYBOX):
        return "needs a static busybox (apt busybox-static)"
    return None


def _file_kind(path: str) -> bytes:
    # A dynamically linked ELF has a PT_INTERP (".interp" / ld-linux path).
    with open(path, "rb") as f:
        head = f.read(4096)
    return b"dynamic" if b"ld-linux" in head else b"static"


# The guest's init lives in clanagent/vmhost/image.py (INIT).


@pytest.fixture(scope="session")
def vm_assets(tmp_path_factory):
    """(vmlinux, initramfs) built once per session under tmp (the product's builder)."""
    why = _missing() or image_problem()
    if why:
        pytest.skip(why)
    return build_image(tmp_path_factory.mktemp("vmassets"))


@pytest.fixture
def vmdir(tmp_path_factory):
    # short paths: a unix socket path must fit in 108 bytes
    return str(tmp_path_factory.mktemp("vm"))


def _spec(assets, name="t1", **kw):
    vmlinux, initrd = assets
    return VmSpec(name, vmlinux, initrd=initrd, memory_mb=128, **kw)


async def _wait_console(rundir: str, marker: bytes, timeout: float = 20.0) -> float:
    log = ConsoleLog(RunDir(rundir).console)
    t0 = trio.current_time()
    with trio.fail_after(timeout):
        while not log.contains(marker):
            await trio.sleep(0.02)
    return trio.current_time() - t0


class Driver:
    """The trio shell around Reconciler + Backend, as the agent runs it (test copy)."""

    def __init__(self, backend, reconciler, base: str):
        self.backend, self.r, self.base = backend, reconciler, base
        self.handles: dict = {}
        self.actions: list = []

    async def step(self) -> None:
        now = trio.current_time()
        for name, h in list(self.handles.items()):
            st = await self.backend.status(h)
            if not st.alive:
                del self.handles[name]
                await self.backend.reap(h)
                self.r.handle(VmExited(name, st.detail), now)
        for act in self.r.poll(trio.current_time()):
            self.actions.append(act)
            if isinstance(act, (StartVm, RestartVm)):
                name = act.spec.name
                try:
                    self.handles[name] = await self.backend.start(
                        act.spec, os.path.join(self.base, name)
                    )
                except VmHostError as e:
                    self.r.handle(VmStartFailed(name, str(e)), trio.current_time())
                else:
                    self.r.handle(VmStarted(name), trio.current_time())
            elif isinstance(act, StopVm):
                await self.backend.stop(self.handles.pop(act.name), act.timeout)
                self.r.handle(VmStopped(act.name), trio.current_time())


@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_real_vm_boots_reports_ready_and_powers_off(vm_assets, vmdir):
    backend = QemuBackend(accel="tcg")
    rundir = os.path.join(vmdir, "t1")
    spec = _spec(vm_assets)
    with trio.fail_after(30):
        t0 = time.monotonic()
        h = await backend.start(spec, rundir, secrets={"svc/token": b"hunter2"})
        ready = await _wait_console(rundir, b"VM_READY")
        print(f"boot to VM_READY: {time.monotonic() - t0:.2f}s (after QMP: {ready:.2f}s)")
        run = RunDir(rundir)
        assert not os.path.exists(run.secrets_initrd)  # loaded, then removed from the host
        assert ConsoleLog(run.console).contains(b"SECRET /run/secrets/svc/token=hunter2")
        assert h.accel == "tcg" and h.fingerprint == spec.fingerprint()
        assert run.read_fingerprint() == spec.fingerprint()
        st = await backend.status(h)
        assert st.state == "running" and st.alive
        how = await backend.stop(h, timeout=10)
        assert how == "poweroff"
        assert ConsoleLog(run.console).contains(b"VM_POWEROFF")
        st = await backend.status(h)
        assert st.state == "exited" and st.exit_code == 0
        assert not os.path.exists(run.pidfile) and not os.path.exists(run.control)


@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_guest_ignoring_acpi_is_quit_after_timeout(vm_assets, vmdir):
    backend = QemuBackend(accel="tcg")
    rundir = os.path.join(vmdir, "t2")
    spec = _spec(vm_assets, "t2", cmdline="console=ttyS0 panic=-1 quiet vmtest.acpi=off")
    with trio.fail_after(30):
        h = await backend.start(spec, rundir)
        await _wait_console(rundir, b"VM_READY")
        t0 = trio.current_time()
        assert await backend.stop(h, timeout=0.5) == "quit"
        assert trio.current_time() - t0 < 5
        assert not (await backend.status(h)).alive


@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_hung_qemu_is_killed_after_the_timeouts(vm_assets, vmdir):
    backend = QemuBackend(accel="tcg", qmp_timeout=0.5)
    h = await backend.start(_spec(vm_assets, "hung"), os.path.join(vmdir, "hung"))
    os.kill(h.pid, signal.SIGSTOP)  # QEMU itself stops answering, even QMP
    with trio.fail_after(15):
        assert await backend.stop(h, timeout=0.2) == "killed"
    st = await backend.status(h)
    assert st.state == "exited" and st.exit_code == -signal.SIGKILL


@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_crash_is_noticed_and_restarted_with_backoff(vm_assets, vmdir):
    backend = QemuBackend(accel="tcg")
    r = Reconciler(Backoff(base=0.5, cap=4, stable_after=60))
    spec = _spec(vm_assets, "t3")
    r.set_desired({"t3": spec})
    d = Driver(backend, r, vmdir)
    with trio.fail_after(40):
        await d.step()
        assert d.actions == [StartVm(spec)] and r.state("t3") == "running"
        first = d.handles["t3"]
        await _wait_console(first.rundir, b"VM_READY")
        os.kill(first.pid, signal.SIGKILL)
        crashed_at = None
        while not any(isinstance(a, RestartVm) for a in d.actions):
            await d.step()
            if crashed_at is None and r.state("t3") == "crashed":
                crashed_at = trio.current_time()
                assert "-9" in r.reason("t3")
            await trio.sleep(0.05)
        restarted_at = trio.current_time()
        assert crashed_at is not None and restarted_at - crashed_at >= 0.45
        assert d.actions[-1] == RestartVm(spec, 1)
        second = d.handles["t3"]
        assert second.pid != first.pid and r.state("t3") == "running"
        # the restarted VM really boots again
        log = ConsoleLog(RunDir(second.rundir).console)
        before = log.tail().count(b"VM_READY")
        while log.tail().count(b"VM_READY") <= before:
            await trio.sleep(0.05)
        await backend.kill(second)


@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_agent_restart_adopts_the_running_vm(vm_assets, vmdir):
    spec = _spec(vm_assets, "t4")
    first = QemuBackend(accel="tcg")
    r1 = Reconciler()
    r1.set_desired({"t4": spec})
    d1 = Driver(first, r1, vmdir)
    with trio.fail_after(30):
        await d1.step()
        h1 = d1.handles["t4"]
        await _wait_console(h1.rundir, b"VM_READY")
        # "restart the agent": a fresh backend and reconciler, nothing shared
        second = QemuBackend(accel="tcg")
        assert await second.adopt(os.path.join(vmdir, "nothing-here")) is None
        h2 = await second.adopt(os.path.join(vmdir, "t4"))
        assert h2 is not None and h2.pid == h1.pid and h2.adopted
        assert h2.fingerprint == spec.fingerprint()
        r2 = Reconciler()
        r2.observe("t4", h2.fingerprint, trio.current_time())
        r2.set_desired({"t4": spec})
        d2 = Driver(second, r2, vmdir)
        d2.handles["t4"] = h2
        await d2.step()
        assert d2.actions == [AdoptVm("t4")]  # and no StartVm
        assert (await second.status(h2)).state == "running"
        # the adopted VM (not our child) can be stopped gracefully too
        assert await second.stop(h2, timeout=10) == "poweroff"
        await first.reap(h1)
        assert await second.adopt(os.path.join(vmdir, "t4")) is None


@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_bad_declarations_fail_clearly_and_the_good_vm_runs(vm_assets, vmdir, tmp_path):
    vmlinux, initrd = vm_assets
    host = HostLimits.probe()
    good = _spec(vm_assets, "good")
    missing = VmSpec("nokernel", str(tmp_path / "no-such-vmlinux"), initrd=initrd)
    huge = VmSpec("huge", vmlinux, initrd=initrd, memory_mb=host.memory_mb * 4)
    errors = {}
    specs = {}
    for s in (good, missing, huge):
        try:
            specs[s.name] = validate_spec(s, host)
        except VmSpecError as e:
            errors[s.name] = str(e)
    assert "kernel" in errors["nokernel"] and "does not exist" in errors["nokernel"]
    assert "exceeds this host's limit" in errors["huge"]
    # a kernel file that exists but is garbage: QEMU itself refuses, clearly
    junk = tmp_path / "junk-kernel"
    junk.write_bytes(b"not a kernel")
    bad_image = VmSpec("junk", str(junk), initrd=initrd, memory_mb=128)
    specs["junk"] = validate_spec(bad_image, host)
    r = Reconciler(Backoff(base=30))
    r.set_desired(specs, errors)
    d = Driver(QemuBackend(accel="tcg"), r, vmdir)
    with trio.fail_after(30):
        await d.step()
        reports = {a.name: a.reason for a in d.actions if isinstance(a, ReportError)}
        assert set(reports) == {"huge", "nokernel"}
        assert r.state("junk") == "crashed" and "exited with 1" in r.reason("junk")
        assert r.state("good") == "running"
        await _wait_console(d.handles["good"].rundir, b"VM_READY")
        await backend_stop(d, "good")


async def backend_stop(d: Driver, name: str) -> None:
    assert await d.backend.stop(d.handles.pop(name), timeout=10) == "poweroff"


@pytest.mark.integration
@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
async def test_start_failure_carries_qemu_stderr(vm_assets, vmdir, tmp_path):
    junk = tmp_path / "k"
    junk.write_bytes(b"nope")
    with trio.fail_after(10), pytest.raises(QemuStartError, match="exited with 1"):
        await QemuBackend(accel="tcg").start(VmSpec("j", str(junk), initrd="/dev/null"), vmdir)


def _netns_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespace and tap)"
    if shutil.which("ip") is None or not os.path.exists("/dev/net/tun"):
        return "needs iproute2 and /dev/net/tun"
    return _missing()


@pytest.mark.integration
@pytest.mark.root
@pytest.mark.skipif(_netns_reason() is not None, reason=_netns_reason() or "")
async def test_vm_gets_a_tap_in_its_netns_and_cleanup_removes_it(vm_assets, vmdir):
    import subprocess

    ns = f"vmt{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        backend = QemuBackend(accel="tcg", network=VmNetwork(netns=ns))
        spec = _spec(vm_assets, "t5", networks=("lan",))
        tap = tap_name("t5", 0)
        with trio.fail_after(30):
            h = await backend.start(spec, os.path.join(vmdir, "t5"))
            link = subprocess.run(
                ["ip", "-n", ns, "link", "show", tap], capture_output=True, text=True
            ).stdout
            assert "LOWER_UP" in link  # QEMU holds the tap open: carrier is up
            await _wait_console(h.rundir, b"VM_READY")
            # "agent restart" after the VM died behind its back: adopt cleans up
            os.kill(h.pid, signal.SIGKILL)
            while (await backend.status(h)).alive:
                await trio.sleep(0.02)
            other = QemuBackend(accel="tcg", network=VmNetwork(netns=ns))
            assert await other.adopt(h.rundir) is None
            gone = subprocess.run(["ip", "-n", ns, "link", "show", tap], capture_output=True)
            assert gone.returncode != 0
            assert not os.path.exists(RunDir(h.rundir).control)
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def vm_decl(kernel: str, initrd: str) -> dict:
    """An inventory `vms` entry: on m1, 1 vcpu, 128 MiB, no network."""
    return {
        "machines": ["m1"],
        "tags": [],
        "count": 1,
        "vcpus": 1,
        "memory_mb": 128,
        "kernel": kernel,
        "initrd": initrd,
        "rootfs": "",
        "disk_mb": 0,
        "networks": [],
        "secrets": [],
        "backend": "auto",
        "graphics": False,
    }
