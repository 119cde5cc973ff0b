"""Tests for clanagent.identity: key files, modes, node ids, crash safety."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
import pytest

from clanagent import identity as ident_mod
from clanagent.identity import (
    KEY_FILES,
    Identity,
    IdentityError,
    clamp_curve25519,
    load,
    load_or_create,
    node_id_of,
    short_id_of,
    wg_key_base64,
)

# Pinned once: changing how node ids are derived changes every node's id.
FIXED_SEED = bytes(range(32))
FIXED_PUBLIC = bytes.fromhex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
FIXED_NODE_ID = "kngclyxl6avtwbf2vq6bjcwlgmbspaiele7mz2ohacjilrkx5btq"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def test_create_writes_private_files_and_load_gives_same_identity(state: Path) -> None:
    ident, created = load_or_create(state)
    assert created
    assert mode(state) == 0o700
    for name in KEY_FILES:
        assert mode(state / name) == 0o600, name
        assert len(base64.b64decode((state / name).read_bytes().strip(), validate=True)) == 32
    # Nothing but the three key files is left behind (no pending temp files).
    assert sorted(os.listdir(state)) == sorted(KEY_FILES)

    again, created2 = load_or_create(state)
    assert not created2
    assert again.node_id == ident.node_id
    assert again == ident
    assert load(state).wg_public == ident.wg_public
    assert load(state).box_public == ident.box_public


def test_wg_file_is_in_wg_genkey_format(state: Path) -> None:
    ident, _ = load_or_create(state)
    text = (state / "node.wg").read_text()
    assert text == wg_key_base64(ident.wg_private) + "\n"
    assert len(text) == 45
    assert ident.wg_public == nacl.bindings.crypto_scalarmult_base(ident.wg_private)
    assert clamp_curve25519(ident.wg_private) == ident.wg_private


def test_umask_does_not_loosen_or_tighten_modes_wrongly(state: Path) -> None:
    old = os.umask(0)
    try:
        load_or_create(state)
    finally:
        os.umask(old)
    assert mode(state) == 0o700
    assert all(mode(state / n) == 0o600 for n in KEY_FILES)


def test_existing_loose_dir_is_tightened(state: Path) -> None:
    state.mkdir()
    os.chmod(state, 0o755)
    load_or_create(state)
    assert mode(state) == 0o700
    os.chmod(state, 0o777)
    load(state)
    assert mode(state) == 0o700


def test_node_id_is_pinned_for_a_fixed_key() -> None:
    sk = nacl.signing.SigningKey(FIXED_SEED)
    assert bytes(sk.verify_key) == FIXED_PUBLIC
    assert node_id_of(FIXED_PUBLIC) == FIXED_NODE_ID
    ident = Identity(sk, nacl.public.PrivateKey(bytes(32)), clamp_curve25519(bytes(32)))
    assert ident.node_id == FIXED_NODE_ID
    assert ident.short_id == FIXED_NODE_ID[:10] == short_id_of(FIXED_NODE_ID)


def test_node_id_shape_and_sensitivity() -> None:
    a = node_id_of(FIXED_PUBLIC)
    b = node_id_of(FIXED_PUBLIC[:-1] + bytes([FIXED_PUBLIC[-1] ^ 1]))
    assert a != b
    assert len(a) == 52 and set(a) <= set("abcdefghijklmnopqrstuvwxyz234567")
    with pytest.raises(ValueError):
        node_id_of(b"short")


def test_signatures_verify_with_nacl() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert len(sig) == 64
    vk = nacl.signing.VerifyKey(ident.public_key)
    assert vk.verify(b"hello", sig) == b"hello"
    with pytest.raises(nacl.exceptions.BadSignatureError):
        vk.verify(b"hellO", sig)


def test_repr_never_shows_private_keys() -> None:
    ident = Identity.generate()
    r = repr(ident)
    assert ident.node_id in r
    assert ident.wg_private.hex() not in r
    assert wg_key_base64(ident.wg_private) not in r
    assert bytes(ident.signing_key).hex() not in r


def test_identity_rejects_unclamped_wg_key() -> None:
    with pytest.raises(ValueError):
        Identity(
            nacl.signing.SigningKey.generate(), nacl.public.PrivateKey.generate(), b"\xff" * 32
        )


@pytest.mark.parametrize("name", KEY_FILES)
@pytest.mark.parametrize(
    "content",
    [
        b"",
        base64.b64encode(bytes(31)) + b"\n",  # wrong size
        base64.b64encode(bytes(33)) + b"\n",
        bytes(32),  # raw bytes, not base64
        b"not base64 at all!!\n",
        b"A" * 1000,  # too big
    ],
)
def test_bad_key_file_names_the_file(state: Path, name: str, content: bytes) -> None:
    load_or_create(state)
    (state / name).write_bytes(content)
    os.chmod(state / name, 0o600)
    with pytest.raises(IdentityError, match=name):
        load(state)
    with pytest.raises(IdentityError, match=name):
        load_or_create(state)  # never "repairs" by regenerating


@pytest.mark.parametrize("name", KEY_FILES)
@pytest.mark.parametrize("bad_mode", [0o640, 0o604, 0o644, 0o660])
def test_readable_key_file_is_refused_with_fix(state: Path, name: str, bad_mode: int) -> None:
    load_or_create(state)
    os.chmod(state / name, bad_mode)
    with pytest.raises(IdentityError, match=rf"{name}.*chmod 600"):
        load(state)


def test_key_file_owned_by_someone_else_is_refused(state: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    load_or_create(state)
    os.chown(state / "node.x25519", 12345, 12345)
    with pytest.raises(IdentityError, match=r"node\.x25519.*owned by uid 12345"):
        load(state)


def test_symlinked_key_file_is_refused(state: Path, tmp_path: Path) -> None:
    load_or_create(state)
    target = tmp_path / "elsewhere"
    os.rename(state / "node.ed25519", target)
    os.symlink(target, state / "node.ed25519")
    with pytest.raises(IdentityError, match=r"node\.ed25519.*symlink"):
        load(state)


def test_unclamped_wg_key_file_is_refused(state: Path) -> None:
    load_or_create(state)
    (state / "node.wg").write_text(base64.b64encode(b"\xff" * 32).decode() + "\n")
    with pytest.raises(IdentityError, match=r"node\.wg.*clamped"):
        load(state)


@pytest.mark.parametrize("keep", [(n,) for n in KEY_FILES] + [KEY_FILES[:2], KEY_FILES[1:]])
def test_partial_set_is_an_error_not_a_new_identity(state: Path, keep: tuple[str, ...]) -> None:
    load_or_create(state)
    before = {n: (state / n).read_bytes() for n in KEY_FILES}
    for n in KEY_FILES:
        if n not in keep:
            (state / n).unlink()
    missing = [n for n in KEY_FILES if n not in keep]
    with pytest.raises(IdentityError) as info:
        load_or_create(state)
    for n in missing:
        assert n in str(info.value)
    assert "backup" in str(info.value)
    # Nothing was regenerated or overwritten.
    for n in keep:
        assert (state / n).read_bytes() == before[n]
    for n in missing:
        assert not (state / n).exists()


def test_load_of_empty_or_missing_dir_is_an_error(state: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        load(state)
    state.mkdir(mode=0o700)
    with pytest.raises(IdentityError, match="no identity"):
        load(state)


def _crash_after_renames(monkeypatch: pytest.MonkeyPatch, n_renames: int) -> type[BaseException]:
    real_rename = os.rename
    count = 0

    class Crash(BaseException):
        pass

    def rename(src: object, dst: object) -> None:
        nonlocal count
        if count == n_renames:
            raise Crash
        count += 1
        real_rename(src, dst)

    monkeypatch.setattr(ident_mod.os, "rename", rename)
    return Crash


@pytest.mark.parametrize("n_renames", [0, 1, 2])
def test_crash_during_creation_recovers_same_identity(
    state: Path, monkeypatch: pytest.MonkeyPatch, n_renames: int
) -> None:
    crash = _crash_after_renames(monkeypatch, n_renames)
    with pytest.raises(crash):
        load_or_create(state)
    monkeypatch.undo()
    present = {n for n in KEY_FILES if (state / n).exists()}
    assert len(present) == n_renames
    pending = {n: (state / (n + ".new")).read_bytes() for n in KEY_FILES if n not in present}
    ident, created = load_or_create(state)
    if n_renames == 0:
        # Nothing was committed, so no identity existed yet: a fresh one is fine.
        assert created
    else:
        # Interrupted between renames: finish the commit, keep the keys.
        assert not created
        for n, data in pending.items():
            assert (state / n).read_bytes() == data
    assert sorted(os.listdir(state)) == sorted(KEY_FILES)
    assert load(state).node_id == ident.node_id


def test_crash_while_writing_pending_files_leaves_no_key(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ident_mod._write_key_file
    calls = 0

    def flaky(path: Path, key: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            path.write_bytes(b"AAA")  # half a key
            raise OSError(28, "No space left on device")
        real(path, key)

    monkeypatch.setattr(ident_mod, "_write_key_file", flaky)
    with pytest.raises(IdentityError, match="No space"):
        load_or_create(state)
    monkeypatch.undo()
    assert not any((state / n).exists() for n in KEY_FILES)
    ident, created = load_or_create(state)
    assert created and load(state) == ident


def test_wg_key_base64() -> None:
    assert wg_key_base64(bytes(32)) == "A" * 43 + "="
    with pytest.raises(ValueError):
        wg_key_base64(b"x")
