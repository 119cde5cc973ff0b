"""clanagent.durable: the atomic replace, the exclusive create, the guarded read."""

from __future__ import annotations

import os
import stat

import pytest

from clanagent import durable
from clanagent.durable import FileRefused, atomic_open, atomic_write, read_file, write_new


def mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class Crash(Exception):
    pass


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]


def test_a_crash_before_the_rename_leaves_the_old_file(tmp_path):
    path = tmp_path / "f"
    atomic_write(path, b"old content")
    with pytest.raises(Crash), atomic_open(path) as f:
        f.write(b"new content, half of it")
        f.flush()
        raise Crash
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["f"]  # the temp file is gone too


def test_a_failed_fsync_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f"
    atomic_write(path, b"old")

    def broken_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(durable.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]


def test_a_failed_rename_removes_the_temp_file(tmp_path):
    target = tmp_path / "d"
    target.mkdir()  # os.replace of a file over a directory fails
    with pytest.raises(OSError):
        atomic_write(target, b"x")
    assert os.listdir(tmp_path) == ["d"]


def test_fsyncs_file_then_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(
        durable.os,
        "fsync",
        lambda fd: synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)) or real(fd),
    )
    atomic_write(tmp_path / "f", b"x")
    assert synced == [False, True]
    synced.clear()
    atomic_write(tmp_path / "f", b"y", sync_dir=False)
    assert synced == [False]
    synced.clear()
    atomic_write(tmp_path / "f", b"z", sync=False)
    assert synced == []
    assert (tmp_path / "f").read_bytes() == b"z"


@pytest.mark.parametrize("bits", [0o600, 0o644, 0o400, 0o444])
def test_mode_is_exact_whatever_the_umask(tmp_path, bits):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "a", b"x", mode=bits)
        write_new(tmp_path / "b", b"x", mode=bits)
    finally:
        os.umask(old)
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "c", b"x", mode=bits)
    finally:
        os.umask(old)
    assert mode(tmp_path / "a") == mode(tmp_path / "b") == mode(tmp_path / "c") == bits


def test_a_replaced_symlink_is_not_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "f"
    link.symlink_to(victim)
    atomic_write(link, b"new")
    assert victim.read_bytes() == b"keep"
    assert not link.is_symlink() and link.read_bytes() == b"new"


def test_write_new_refuses_an_existing_file_or_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "dangling")
    for p in (victim, link):
        with pytest.raises(FileExistsError):
            write_new(p, b"x")
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "dangling").exists()


def test_temp_pattern_matches_a_left_over_temp_file(tmp_path):
    path = tmp_path / "imports.json"
    with pytest.raises(Crash), atomic_open(path) as f:
        f.write(b"x")
        # what a crash (kill -9) here would leave: the temp file
        leftovers = list(tmp_path.glob(durable.temp_pattern("imports.json")))
        raise Crash
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".")


# -- read_file ---------------------------------------------------------------------


def test_read_file_reads_a_regular_file(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"hello")
    assert read_file(p, max_size=5) == b"hello"


def test_read_file_refuses_a_symlink_unless_asked_to_follow(tmp_path):
    target = tmp_path / "t"
    target.write_bytes(b"x")
    link = tmp_path / "l"
    link.symlink_to(target)
    with pytest.raises(FileRefused) as info:
        read_file(link, max_size=10)
    assert info.value.reason == "symlink"
    assert read_file(link, max_size=10, follow_symlinks=True) == b"x"


def test_read_file_refuses_what_is_not_a_regular_file_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for p in (fifo, tmp_path, "/dev/null"):
        with pytest.raises(FileRefused) as info:
            read_file(p, max_size=10)
        assert info.value.reason == "not_regular"


def test_read_file_refuses_a_file_over_the_cap(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"x" * 11)
    with pytest.raises(FileRefused) as info:
        read_file(p, max_size=10)
    assert info.value.reason == "too_large" and info.value.st.st_size == 11
    assert read_file(p, max_size=11) == b"x" * 11


def test_read_file_checks_owner_and_mode(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"k")
    p.chmod(0o640)
    assert read_file(p, max_size=1) == b"k"
    with pytest.raises(FileRefused) as info:
        read_file(p, max_size=1, private=True)
    assert info.value.reason == "mode" and stat.S_IMODE(info.value.st.st_mode) == 0o640
    p.chmod(0o600)
    assert read_file(p, max_size=1, private=True, owner=os.geteuid()) == b"k"
    with pytest.raises(FileRefused) as info:
        read_file(p, max_size=1, owner=os.geteuid() + 1)
    assert info.value.reason == "owner"


def test_read_file_passes_a_missing_file_through(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_file(tmp_path / "nope", max_size=1)


def test_fsync_dir(tmp_path):
    durable.fsync_dir(tmp_path)
    with pytest.raises(NotADirectoryError):
        (tmp_path / "f").write_bytes(b"")
        durable.fsync_dir(tmp_path / "f")
