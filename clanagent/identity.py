"""The node's long-term keys and the node id derived from them.

Owns: generating, storing and loading the three private keys of a node
(Ed25519 for signing records, X25519 for sealed boxes, a Curve25519 key for
WireGuard) under the state dir, and the node id (a hash of the Ed25519
public key) with its short display form.

Must never: regenerate keys when some of them are missing or unreadable (that
would silently give the machine a new identity), read a key file that other
users can read, leave a half-written key file after a crash, or put private
key bytes into a repr or a log line.

Key file format (chosen to match `wg genkey`, so `node.wg` can be handed to
`wg set ... private-key` as is): one line holding the standard base64 of the
32 raw key bytes, then a newline.  `node.ed25519` holds the Ed25519 *seed*,
`node.x25519` the X25519 private scalar, `node.wg` the clamped WireGuard
private key.  Files are 0600, the directory 0700.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import nacl.bindings
import nacl.public
import nacl.signing

from .durable import FileRefused, fsync_dir, read_file, write_new

__all__ = [
    "IdentityError",
    "Identity",
    "KEY_FILES",
    "node_id_of",
    "short_id_of",
    "load",
    "load_or_create",
    "wg_key_base64",
    "clamp_curve25519",
]

log = logging.getLogger(__name__)

# File names under the state dir, in the order they are committed on creation.
ED25519_FILE = "node.ed25519"
X25519_FILE = "node.x25519"
WG_FILE = "node.wg"
KEY_FILES = (ED25519_FILE, X25519_FILE, WG_FILE)

# Suffix of the fully written, fsynced key files that creation renames into
# place; their presence next to a partial set proves creation was interrupted.
_PENDING = ".new"

# BLAKE2b personalisation (at most 16 bytes): keeps node ids from ever
# colliding with some other hash of the same public key.
_NODE_ID_PERSON = b"clanagent-nodeid"
SHORT_ID_LEN = 10
_MAX_KEY_FILE = 128  # a key file is 45 bytes; never read more than this


class IdentityError(Exception):
    """The node's keys are missing, malformed or unsafe; the message names the file and the fix."""


def clamp_curve25519(key: bytes) -> bytes:
    """Clamp a 32-byte Curve25519 private key the way `wg genkey` does."""
    if len(key) != 32:
        raise ValueError("a Curve25519 key is 32 bytes")
    b = bytearray(key)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def node_id_of(public_key: bytes) -> str:
    """The node id of an Ed25519 public key: personalised BLAKE2b-256, lowercase base32, no padding.

    52 characters of [a-z2-7]; safe in file names, DNS labels (with care for
    length) and logs.
    """
    if not isinstance(public_key, bytes) or len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    digest = hashlib.blake2b(public_key, digest_size=32, person=_NODE_ID_PERSON).digest()
    return base64.b32encode(digest).decode("ascii").rstrip("=").lower()


def short_id_of(node_id: str) -> str:
    """The first 10 characters (50 bits) of a node id, for humans only.

    Trade-off: 50 bits make an accidental collision negligible for any real
    clan (about 4e-10 for 1000 nodes) and stay easy to read and type, but an
    attacker can grind a key whose short id matches a victim's with roughly
    2**50 key generations.  So a short id is for display, logs and CLI
    completion; nothing may look a peer up, trust it or authorise it by its
    short id -- always use the full node id or the public key.
    """
    return node_id[:SHORT_ID_LEN]


def wg_key_base64(key: bytes) -> str:
    """Render a 32-byte WireGuard key the way the wg tools show it (standard base64)."""
    if len(key) != 32:
        raise ValueError("a WireGuard key is 32 bytes")
    return base64.b64encode(key).decode("ascii")


@dataclass(frozen=True, eq=False)
class Identity:
    """A node's private keys.  Equality is by public keys; repr shows only the node id."""

    signing_key: nacl.signing.SigningKey
    box_key: nacl.public.PrivateKey
    wg_private: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.wg_private, bytes) or len(self.wg_private) != 32:
            raise ValueError("wg_private must be 32 bytes")
        if clamp_curve25519(self.wg_private) != self.wg_private:
            raise ValueError("wg_private must be a clamped Curve25519 key")

    @classmethod
    def generate(cls) -> Identity:
        return cls(
            signing_key=nacl.signing.SigningKey.generate(),
            box_key=nacl.public.PrivateKey.generate(),
            wg_private=clamp_curve25519(os.urandom(32)),
        )

    # cached_property writes to the instance __dict__ directly, so it works on
    # a frozen dataclass; these are read on every record we sign.
    @cached_property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @cached_property
    def box_public(self) -> bytes:
        return bytes(self.box_key.public_key)

    @cached_property
    def wg_public(self) -> bytes:
        return nacl.bindings.crypto_scalarmult_base(self.wg_private)

    @cached_property
    def node_id(self) -> str:
        return node_id_of(self.public_key)

    @property
    def short_id(self) -> str:
        return short_id_of(self.node_id)

    def sign(self, data: bytes) -> bytes:
        """A 64-byte detached Ed25519 signature of `data`."""
        return self.signing_key.sign(data).signature

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return (self.public_key, self.box_public, self.wg_public) == (
            other.public_key,
            other.box_public,
            other.wg_public,
        )

    def __hash__(self) -> int:
        return hash(self.public_key)

    def __repr__(self) -> str:
        return f"Identity(node_id={self.node_id!r})"


# ---------------------------------------------------------------- storage


def _secure_dir(state_dir: Path, *, create: bool) -> None:
    if create:
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise IdentityError(f"{state_dir}: cannot create state dir: {exc.strerror}") from None
    try:
        st = state_dir.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"{state_dir}: state dir does not exist; create an identity first "
            "(clanagent creates one on first start)"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise IdentityError(f"{state_dir}: state dir is not a directory")
    if st.st_mode & 0o077:
        # mkdir's mode is filtered by the umask and an existing dir may have
        # been made by hand; the keys' protection must not depend on either.
        log.warning("tightening %s from %04o to 0700", state_dir, stat.S_IMODE(st.st_mode))
        try:
            os.chmod(state_dir, 0o700)
        except OSError as exc:
            raise IdentityError(
                f"{state_dir}: state dir is mode {stat.S_IMODE(st.st_mode):04o} and cannot "
                f"be tightened ({exc.strerror}); fix: chmod 700 {state_dir}"
            ) from None


def _write_key_file(path: Path, key: bytes) -> None:
    """Write `key` to `path` completely and durably (0600), replacing any file there."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    write_new(path, base64.b64encode(key) + b"\n", mode=0o600)


def _read_key_file(path: Path) -> bytes:
    """Read one key file, checking type, owner and mode before reading a byte."""
    try:
        raw = read_file(path, max_size=_MAX_KEY_FILE, owner=os.geteuid(), private=True)
    except FileNotFoundError:
        raise
    except FileRefused as exc:
        raise IdentityError(_refused(path, exc)) from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot open key file: {exc.strerror}") from None
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(
            f"{path}: key file is not one line of base64; restore it from a backup"
        ) from None
    if len(key) != 32:
        raise IdentityError(
            f"{path}: key file holds {len(key)} bytes, expected 32; restore it from a backup"
        )
    return key


def _refused(path: Path, exc: FileRefused) -> str:
    st = exc.st
    if exc.reason == "symlink":
        return f"{path}: key file is a symlink; fix: replace it with the file itself (mode 0600)"
    if exc.reason == "not_regular":
        return f"{path}: key file is not a regular file"
    if exc.reason == "owner":
        assert st is not None
        return (
            f"{path}: key file is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.geteuid()}); fix: chown it to the agent's user"
        )
    if exc.reason == "mode":
        assert st is not None
        return (
            f"{path}: key file is mode {stat.S_IMODE(st.st_mode):04o}, readable by other "
            f"users; fix: chmod 600 {path} (and consider the key exposed)"
        )
    return f"{path}: key file is too large to be a key; expected one base64 line"


def _pending(path: Path) -> Path:
    return path.with_name(path.name + _PENDING)


def _paths(state_dir: Path) -> Iterator[Path]:
    return (state_dir / name for name in KEY_FILES)


def _identity_from_files(state_dir: Path) -> Identity:
    ed, x, wg = (_read_key_file(p) for p in _paths(state_dir))
    wg_path = state_dir / WG_FILE
    if clamp_curve25519(wg) != wg:
        # `wg genkey` always clamps; an unclamped key here means a foreign or
        # damaged file, and WireGuard would silently use a different key.
        raise IdentityError(
            f"{wg_path}: WireGuard key is not clamped; fix: restore it from a backup"
        )
    return Identity(
        signing_key=nacl.signing.SigningKey(ed),
        box_key=nacl.public.PrivateKey(x),
        wg_private=wg,
    )


def _roll_forward(state_dir: Path) -> bool:
    """Finish a creation that a crash interrupted between renames, if that is what we see.

    Creation fsyncs every pending file and the dir before renaming the first
    one, so when each missing key file has its pending file, those pending
    files are complete and belong to the same identity as the present ones.
    """
    missing = [p for p in _paths(state_dir) if not p.exists()]
    if not missing or len(missing) == len(KEY_FILES):
        return False
    if not all(_pending(p).exists() for p in missing):
        return False
    for p in missing:
        os.rename(_pending(p), p)
    fsync_dir(state_dir)
    log.warning("completed an interrupted identity creation in %s", state_dir)
    return True


def _create(state_dir: Path) -> Identity:
    ident = Identity.generate()
    keys = {
        ED25519_FILE: bytes(ident.signing_key),
        X25519_FILE: bytes(ident.box_key),
        WG_FILE: ident.wg_private,
    }
    for name, key in keys.items():
        _write_key_file(_pending(state_dir / name), key)
    fsync_dir(state_dir)  # every pending file is durable before the first rename
    for name in KEY_FILES:
        os.rename(_pending(state_dir / name), state_dir / name)
    fsync_dir(state_dir)
    return ident


def _cleanup_pending(state_dir: Path) -> None:
    for p in _paths(state_dir):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_pending(p))


def _check_complete(state_dir: Path) -> None:
    present = [p for p in _paths(state_dir) if p.exists() or p.is_symlink()]
    if len(present) == len(KEY_FILES):
        return
    if not present:
        raise IdentityError(
            f"{state_dir}: no identity here (expected {', '.join(KEY_FILES)}); "
            "create one with load_or_create (clanagent does on first start)"
        )
    missing = [p for p in _paths(state_dir) if p not in present]
    raise IdentityError(
        f"{', '.join(map(str, missing))}: missing while "
        f"{', '.join(p.name for p in present)} exist; refusing to make a new identity. "
        "Fix: restore the missing file(s) from a backup, or delete the remaining "
        f"key files in {state_dir} to start over with a NEW node id"
    )


def load(state_dir: Path) -> Identity:
    """Load the identity stored under `state_dir`, or raise IdentityError naming the file and fix."""
    state_dir = Path(state_dir)
    _secure_dir(state_dir, create=False)
    try:
        _roll_forward(state_dir)
    except OSError as exc:
        raise IdentityError(f"{state_dir}: cannot finish interrupted creation: {exc}") from None
    _check_complete(state_dir)
    try:
        return _identity_from_files(state_dir)
    except FileNotFoundError as exc:  # removed between the check and the read
        raise IdentityError(f"{exc.filename}: key file disappeared while loading") from None


def load_or_create(state_dir: Path) -> tuple[Identity, bool]:
    """Load the identity under `state_dir`, creating one if there is none at all.

    Returns (identity, created_now).  A partial or damaged set is an error,
    never a reason to create new keys.
    """
    state_dir = Path(state_dir)
    _secure_dir(state_dir, create=True)
    try:
        _roll_forward(state_dir)
        if not any(p.exists() or p.is_symlink() for p in _paths(state_dir)):
            _cleanup_pending(state_dir)
            return _create(state_dir), True
    except OSError as exc:
        raise IdentityError(f"{state_dir}: cannot create identity: {exc}") from None
    return load(state_dir), False


# -- the machine key: what an admin needs to add this node to the inventory --

MACHINE_KEY_PREFIX = "clanmachine1."


def machine_key_string(identity: Identity) -> str:
    """One copy-pasteable string with the node's three public keys and a checksum."""
    raw = identity.public_key + identity.box_public + identity.wg_public
    check = hashlib.blake2b(raw, digest_size=4).digest()
    return MACHINE_KEY_PREFIX + base64.urlsafe_b64encode(raw + check).decode().rstrip("=")


def parse_machine_key(text: str) -> tuple[bytes, bytes, bytes]:
    """(node key, box key, wg key) from `machine_key_string`'s output."""
    text = text.strip()
    if not text.startswith(MACHINE_KEY_PREFIX):
        raise IdentityError(
            f"a machine key starts with '{MACHINE_KEY_PREFIX}': run 'clanagent keygen' on the "
            "new machine and copy its 'machine key' line"
        )
    body = text[len(MACHINE_KEY_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (ValueError, binascii.Error):
        raise IdentityError("machine key is not valid base64: it was mistyped") from None
    if len(raw) != 100 or hashlib.blake2b(raw[:96], digest_size=4).digest() != raw[96:]:
        raise IdentityError("machine key is mistyped or truncated (checksum mismatch)")
    return raw[:32], raw[32:64], raw[64:96]
