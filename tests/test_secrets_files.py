"""Secret files on disk: modes, owner, atomic replacement, the previous generation's grace."""

from __future__ import annotations

import grp
import os
import pwd
import stat

import pytest

from clanagent.secrets import files
from clanagent.secrets.crypto import SecretsLocalError
from tests.conftest import requires_root

T0 = 1_700_000_000


def mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_install_writes_modes_and_reports_change(tmp_path):
    changed = files.install(tmp_path, "svc", "key", 1, {"private": b"s1"}, {"public": b"p1"}, T0)
    assert changed
    sdir = tmp_path / "secrets" / "svc" / "key"
    pdir = tmp_path / "public" / "svc" / "key"
    assert (sdir / "private").read_bytes() == b"s1"
    assert (pdir / "public").read_bytes() == b"p1"
    assert mode(sdir / "private") == 0o400
    assert mode(sdir) == 0o700
    assert mode(pdir / "public") == 0o444
    assert mode(pdir) == 0o755
    assert files.installed_generation(tmp_path, "svc", "key") == 1
    assert files.installed(tmp_path) == [("svc", "key")]
    # same content again (e.g. after a restart): no change, no previous
    assert not files.install(tmp_path, "svc", "key", 1, {"private": b"s1"}, {"public": b"p1"}, T0)
    assert not (sdir / files.PREVIOUS).exists()
    assert not [p for p in sdir.iterdir() if p.name.endswith(".tmp")]


def test_group_readable_dir(tmp_path):
    files.install(tmp_path, "svc", "key", 1, {"v": b"x"}, {}, T0, dir_mode=0o750)
    assert mode(tmp_path / "secrets" / "svc" / "key") == 0o750


def test_previous_generation_kept_for_grace_then_removed(tmp_path):
    files.install(
        tmp_path, "svc", "key", 1, {"private": b"s1", "gone": b"g"}, {"public": b"p1"}, T0
    )
    assert files.install(tmp_path, "svc", "key", 2, {"private": b"s2"}, {"public": b"p2"}, T0 + 10)
    sdir = tmp_path / "secrets" / "svc" / "key"
    prev = sdir / files.PREVIOUS
    assert (sdir / "private").read_bytes() == b"s2"
    assert not (sdir / "gone").exists()
    assert (prev / "private").read_bytes() == b"s1" and (prev / "gone").read_bytes() == b"g"
    assert mode(prev / "private") == 0o400 and mode(prev) == 0o700
    assert (tmp_path / "public" / "svc" / "key" / "public").read_bytes() == b"p2"
    assert files.installed_generation(tmp_path, "svc", "key") == 2
    assert files.expire_previous(tmp_path, T0 + 10 + 3599) == []
    assert prev.exists()
    assert files.expire_previous(tmp_path, T0 + 10 + 3600) == [("svc", "key")]
    assert not prev.exists() and (sdir / "private").read_bytes() == b"s2"
    # a configurable grace
    files.install(tmp_path, "svc", "key", 3, {"private": b"s3"}, {}, T0 + 20)
    assert files.expire_previous(tmp_path, T0 + 25, grace=5) == [("svc", "key")]
    assert not (tmp_path / "public" / "svc" / "key" / "public").exists()


def test_third_generation_replaces_previous(tmp_path):
    for g in (1, 2, 3):
        files.install(tmp_path, "svc", "key", g, {"v": f"s{g}".encode()}, {}, T0 + g)
    prev = tmp_path / "secrets" / "svc" / "key" / files.PREVIOUS
    assert (prev / "v").read_bytes() == b"s2"


def test_remove(tmp_path):
    files.install(tmp_path, "svc", "key", 1, {"v": b"x"}, {"p": b"y"}, T0)
    files.install(tmp_path, "svc", "other", 1, {"v": b"x"}, {}, T0)
    assert files.remove(tmp_path, "svc", "key")
    assert not (tmp_path / "secrets" / "svc" / "key").exists()
    assert not (tmp_path / "public" / "svc").exists()
    assert files.installed(tmp_path) == [("svc", "other")]
    assert not files.remove(tmp_path, "svc", "key")


def test_bad_names_are_refused(tmp_path):
    for svc, sec, fname in (
        ("..", "k", "v"),
        ("svc", "a/b", "v"),
        ("svc", "k", "../v"),
        ("svc", "k", ".hidden"),
    ):
        with pytest.raises(SecretsLocalError):
            files.install(tmp_path, svc, sec, 1, {fname: b"x"}, {}, T0)
    assert not (tmp_path / "secrets").exists() or files.installed(tmp_path) == []


def test_planted_symlink_is_not_followed(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    files.install(tmp_path, "svc", "key", 1, {"v": b"x"}, {}, T0)
    sdir = tmp_path / "secrets" / "svc" / "key"
    (sdir / "v").unlink()
    (sdir / "v").symlink_to(target)
    files.install(tmp_path, "svc", "key", 2, {"v": b"new"}, {}, T0 + 1)
    assert target.read_bytes() == b"keep"
    assert not (sdir / "v").is_symlink() and (sdir / "v").read_bytes() == b"new"


@requires_root
def test_owner(tmp_path):
    files.install(tmp_path, "svc", "key", 1, {"v": b"x"}, {"p": b"y"}, T0, owner=(65534, 65534))
    sdir = tmp_path / "secrets" / "svc" / "key"
    for p in (sdir, sdir / "v"):
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert os.lstat(tmp_path / "public" / "svc" / "key" / "p").st_uid == 0


def test_resolve_owner():
    assert files.resolve_owner(None) is None and files.resolve_owner("") is None
    nobody = pwd.getpwnam("nobody")
    assert files.resolve_owner("nobody") == (nobody.pw_uid, nobody.pw_gid)
    assert files.resolve_owner(f"0:{nobody.pw_gid}") == (0, nobody.pw_gid)
    assert files.resolve_owner(f"root:{grp.getgrgid(0).gr_name}") == (0, 0)
    with pytest.raises(SecretsLocalError):
        files.resolve_owner("no-such-user-here")
    with pytest.raises(SecretsLocalError):
        files.resolve_owner("root:no-such-group-here")
