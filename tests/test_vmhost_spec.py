"""VmSpec from inventory entries, and the per-host checks that reject bad declarations."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import pytest

from clanagent.vmhost.backend import RunDir, newc_archive, write_secrets_initrd
from clanagent.vmhost.console import ConsoleLog
from clanagent.vmhost.spec import (
    DEFAULT_CMDLINE,
    HostLimits,
    VmSpec,
    VmSpecError,
    check_spec,
    validate_spec,
)

HOST = HostLimits.from_totals(cpus=4, memory_mb=8192)


@pytest.fixture
def files(tmp_path):
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\x7fELF")
    rd = tmp_path / "initrd"
    rd.write_bytes(b"initrd")
    return str(k), str(rd)


def entry(**kw):
    base = {
        "machines": ["a"], "tags": [], "count": 1, "vcpus": 1, "memory_mb": 256,
        "kernel": "/k", "initrd": "", "rootfs": "", "disk_mb": 0, "networks": [],
        "secrets": [], "backend": "auto", "graphics": False,
    }  # fmt: skip
    base.update(kw)
    return base


def test_from_inventory_copies_fields():
    s = VmSpec.from_inventory(
        "web", entry(vcpus=2, memory_mb=512, networks=["lan"], secrets=["svc/key"])
    )
    assert (s.name, s.vcpus, s.memory_mb, s.networks, s.secrets) == (
        "web", 2, 512, ("lan",), ("svc/key",),
    )  # fmt: skip
    assert s.cmdline == DEFAULT_CMDLINE


def test_from_inventory_missing_kernel_is_a_spec_error():
    e = entry()
    del e["kernel"]
    with pytest.raises(VmSpecError, match="missing field kernel"):
        VmSpec.from_inventory("web", e)


def test_fingerprint_changes_with_any_field(files):
    k, rd = files
    a = VmSpec("web", k, initrd=rd)
    assert a.fingerprint() == VmSpec("web", k, initrd=rd).fingerprint()
    assert a.fingerprint() != VmSpec("web", k, initrd=rd, memory_mb=300).fingerprint()
    assert a.fingerprint() != VmSpec("web", k, initrd=rd, cmdline="x").fingerprint()


def test_good_spec_has_no_problems(files):
    k, rd = files
    assert check_spec(VmSpec("web", k, initrd=rd, vcpus=4, memory_mb=1024), HOST) == []


def test_every_problem_is_listed_clearly(tmp_path, files):
    _, rd = files
    spec = VmSpec("web", str(tmp_path / "nope"), initrd=rd, vcpus=8, memory_mb=100_000)
    with pytest.raises(VmSpecError) as ei:
        validate_spec(spec, HOST)
    msg = str(ei.value)
    assert ei.value.name == "web"
    assert len(ei.value.problems) == 3
    assert f"kernel {tmp_path / 'nope'} does not exist" in msg
    assert "memory_mb 100000 exceeds this host's limit of" in msg
    assert "vcpus 8 exceeds this host's 4 cpus" in msg


def test_unreadable_and_relative_and_directory_paths(tmp_path, files):
    k, _ = files
    problems = check_spec(VmSpec("web", k, initrd="relative.img", rootfs=str(tmp_path)), HOST)
    assert any("must be an absolute path" in p for p in problems)
    assert any("is not a regular file" in p for p in problems)
    if os.geteuid() != 0:  # root reads anything
        os.chmod(k, 0)
        assert any("not readable" in p for p in check_spec(VmSpec("web", k, initrd=k), HOST))


def test_secrets_need_an_initrd_and_something_to_run(files):
    k, _ = files
    problems = check_spec(VmSpec("web", k, secrets=("svc/key",)), HOST)
    assert any("secrets need an initrd" in p for p in problems)
    assert any("nothing to run" in p for p in problems)


def test_memory_limit_keeps_a_host_reserve():
    small = HostLimits.from_totals(1, 1024)
    assert small.max_vm_memory_mb == 512
    big = HostLimits.from_totals(8, 65536)
    assert big.max_vm_memory_mb == int(65536 * 0.8)
    probed = HostLimits.probe()
    assert 0 < probed.max_vm_memory_mb < probed.memory_mb and probed.cpus >= 1


def test_constructor_rejects_nonsense():
    with pytest.raises(VmSpecError):
        VmSpec("", "/k")
    with pytest.raises(VmSpecError):
        VmSpec("../x", "/k")
    with pytest.raises(VmSpecError):
        VmSpec("a", "/k", backend="xen")
    with pytest.raises(VmSpecError):
        VmSpec("a", "/k", vcpus=0)


# --- runtime dir helpers shared by the backends --------------------------------
def _parse_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, off = {}, 0
    while True:
        assert data[off : off + 6] == b"070701"
        f = [int(data[off + 6 + 8 * i : off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name_start = off + 110
        name = data[name_start : name_start + namesize - 1].decode()
        off = name_start + namesize
        off += -off % 4
        body = data[off : off + size]
        off += size
        off += -off % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_newc_archive_roundtrip():
    data = newc_archive({"run/secrets/svc/key": b"s3cret", "run/secrets/other/x": b""})
    assert len(data) % 512 == 0
    entries = _parse_newc(data)
    assert entries["run/secrets/svc/key"] == (stat.S_IFREG | 0o400, b"s3cret")
    assert stat.S_ISDIR(entries["run/secrets"][0])
    assert stat.S_ISDIR(entries["run/secrets/svc"][0])
    with pytest.raises(ValueError):
        newc_archive({"../etc/passwd": b""})
    with pytest.raises(ValueError):
        newc_archive({"/abs": b""})


def test_secrets_initrd_appends_an_aligned_archive(tmp_path):
    base = tmp_path / "base.img"
    base.write_bytes(gzip.compress(b"x" * 1001))
    run = RunDir(str(tmp_path / "vm"))
    run.ensure()
    path = write_secrets_initrd(run, str(base), {"svc/key": b"v"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    data = Path(path).read_bytes()
    n = len(base.read_bytes())
    assert data[:n] == base.read_bytes()
    start = data.index(b"070701", n)
    assert start % 4 == 0 and set(data[n:start]) <= {0}
    assert _parse_newc(data[start:])["run/secrets/svc/key"][1] == b"v"


def test_rundir_stale_cleanup_keeps_console_and_disk(tmp_path):
    run = RunDir(str(tmp_path / "vm"))
    run.ensure()
    for p in (run.pidfile, run.control, run.secrets_initrd, run.console, run.disk):
        open(p, "w").close()
    assert sorted(run.remove_stale()) == sorted([run.pidfile, run.control, run.secrets_initrd])
    assert os.path.exists(run.console) and os.path.exists(run.disk)
    run.write_fingerprint("abc")
    assert run.read_fingerprint() == "abc" and run.name == "vm"


# --- console log rotation -------------------------------------------------------
def test_console_rotation_keeps_n_copies_and_tail_spans_them(tmp_path):
    log = ConsoleLog(str(tmp_path / "console.log"), max_bytes=10, keep=2)
    assert not log.maybe_rotate()  # no file yet
    with open(log.path, "ab") as f:  # the VMM's O_APPEND descriptor stays open
        for chunk in (b"A" * 11, b"B" * 11, b"C" * 11, b"D" * 3):
            f.write(chunk)
            f.flush()
            log.maybe_rotate()
        f.write(b"E")
        f.flush()
    assert Path(log.path).read_bytes() == b"DDDE"  # appended after truncate, no hole
    assert Path(log.rotated(1)).read_bytes() == b"C" * 11
    assert Path(log.rotated(2)).read_bytes() == b"B" * 11
    assert not os.path.exists(log.rotated(3))
    assert log.tail(6) == b"CCDDDE"
    assert log.contains(b"BBB") and not log.contains(b"AAA")


def test_console_read_from_follows_across_rotation(tmp_path):
    log = ConsoleLog(str(tmp_path / "console.log"), max_bytes=4, keep=1)
    assert log.read_from(0) == (0, b"")
    with open(log.path, "ab") as f:
        f.write(b"hello")
        f.flush()
        off, data = log.read_from(0)
        assert (off, data) == (5, b"hello")
        assert log.read_from(off) == (5, b"")
        log.maybe_rotate()
        f.write(b"xy")
        f.flush()
    assert log.read_from(off) == (2, b"xy")
