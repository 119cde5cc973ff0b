"""Sealing a secret's payload to its recipients and the clan admins.

Owns: the envelope of a secret generation -- a fresh 32-byte key K per
generation, the files packed and encrypted with SecretBox(K, nonce), and K
sealed (SealedBox) to each recipient's X25519 box key and to each admin's
Ed25519 key converted to X25519 -- and opening it again, either as a
recipient (node key + box private key) or as an admin recovering with the
admin signing key.  Wire maps take str keys only, so the sealed-key map is
keyed by the lowercase hex of the node/admin key.

Errors: `SecretsError` is the base of this package's errors; our own misuse
(bad key sizes, bad file names) raises `SecretsLocalError`.  Anything wrong
with what a peer sent (tampered ciphertext, a sealed key that does not open
for us, a plaintext of the wrong shape) raises `WireError` -- the remote kind.

Must never: reuse K or a nonce, return plaintext that failed authentication,
leak a PyNaCl/msgpack exception, or log key material or plaintext.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.signing
import nacl.utils

from clanagent.secrets.model import valid_file_name
from clanagent.wire import Limits, WireError, pack, unpack

__all__ = [
    "SecretsError",
    "SecretsLocalError",
    "Sealed",
    "MAX_FILES",
    "MAX_PAYLOAD",
    "SEALED_KEY_SIZE",
    "admin_box_public",
    "seal_payload",
    "open_payload",
    "recover_payload",
    "check_files",
]

MAX_FILES = 64
MAX_PAYLOAD = 1 << 20
# SealedBox: ephemeral public key (32) + MAC (16) + K (32).
SEALED_KEY_SIZE = 32 + 16 + 32
_PLAIN_LIMITS = Limits(
    max_frame=MAX_PAYLOAD + 4096, max_depth=2, max_str=256, max_bin=MAX_PAYLOAD, max_map=MAX_FILES
)


class SecretsError(Exception):
    """Base of every error of clanagent.secrets."""


class SecretsLocalError(SecretsError, ValueError):
    """We asked for something impossible (bad key size, bad file name)."""


Sealed = tuple[bytes, bytes, dict[str, bytes]]
"""(nonce, ciphertext, {hex(key): sealed K})"""


def _key32(key: Any, what: str) -> bytes:
    if type(key) is not bytes or len(key) != 32:
        raise SecretsLocalError(f"{what} must be 32 bytes")
    return key


def admin_box_public(admin_key: bytes) -> bytes:
    """The X25519 public key that an Ed25519 admin key receives sealed keys on."""
    try:
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(_key32(admin_key, "admin key"))
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise SecretsLocalError("admin key is not a valid Ed25519 point") from None


def check_files(files: Mapping[str, bytes]) -> None:
    """Raise SecretsLocalError unless `files` is a small map of safe names to bytes."""
    if len(files) > MAX_FILES:
        raise SecretsLocalError(f"more than {MAX_FILES} files")
    for name, value in files.items():
        if not valid_file_name(name):
            raise SecretsLocalError(f"bad file name {name!r}")
        if type(value) is not bytes:
            raise SecretsLocalError(f"file {name!r}: content must be bytes")


def seal_payload(
    files: Mapping[str, bytes], recipients: Mapping[bytes, bytes], admins: Sequence[bytes]
) -> Sealed:
    """Encrypt `files` so that only the recipients and admins can read them.

    `recipients` maps node key (Ed25519) -> box key (X25519 public).  When
    an admin key is also a recipient node key, the recipient entry wins (the
    map has one slot per key); that machine's box key opens it.
    """
    check_files(files)
    plain = pack(dict(files))
    if len(plain) > MAX_PAYLOAD:
        raise SecretsLocalError(f"secret files exceed {MAX_PAYLOAD} bytes")
    k = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    nonce = nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE)
    ciphertext = nacl.secret.SecretBox(k).encrypt(plain, nonce).ciphertext
    keys: dict[str, bytes] = {}
    for admin in admins:
        pub = nacl.public.PublicKey(admin_box_public(admin))
        try:
            keys[admin.hex()] = nacl.public.SealedBox(pub).encrypt(k)
        except nacl.exceptions.CryptoError:
            raise SecretsLocalError(f"admin key {admin.hex()[:16]} is not usable") from None
    for node_key, box_key in recipients.items():
        name = _key32(node_key, "node key").hex()
        pub = nacl.public.PublicKey(_key32(box_key, "box key"))
        try:
            keys[name] = nacl.public.SealedBox(pub).encrypt(k)
        except nacl.exceptions.CryptoError:
            # libsodium refuses low-order points: the doc has a bad box key.
            raise SecretsLocalError(f"box key of {name[:16]} is not usable") from None
    return nonce, ciphertext, keys


def _open_with(
    nonce: bytes, ciphertext: bytes, wrapped: Any, box_private: nacl.public.PrivateKey
) -> dict[str, bytes]:
    if type(wrapped) is not bytes or len(wrapped) != SEALED_KEY_SIZE:
        raise WireError("secret: bad sealed key")
    if type(nonce) is not bytes or len(nonce) != nacl.secret.SecretBox.NONCE_SIZE:
        raise WireError("secret: bad nonce")
    if type(ciphertext) is not bytes:
        raise WireError("secret: bad ciphertext")
    try:
        k = nacl.public.SealedBox(box_private).decrypt(wrapped)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise WireError("secret: sealed key does not open with our key") from None
    try:
        plain = nacl.secret.SecretBox(k).decrypt(ciphertext, nonce)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise WireError("secret: ciphertext failed authentication") from None
    files = unpack(plain, _PLAIN_LIMITS)
    if type(files) is not dict:
        raise WireError("secret: plaintext is not a map")
    for name, value in files.items():
        if not valid_file_name(name):
            raise WireError(f"secret: bad file name {name!r}")
        if type(value) is not bytes:
            raise WireError(f"secret: file {name!r} is not bytes")
    return files


def open_payload(
    nonce: bytes,
    ciphertext: bytes,
    keys: Mapping[str, Any],
    my_node_key: bytes,
    my_box_private: nacl.public.PrivateKey | bytes,
) -> dict[str, bytes] | None:
    """The files, or None when `my_node_key` is not a recipient.

    Raises WireError when the payload is tampered with or the sealed key
    under our name does not open with our box key.
    """
    wrapped = keys.get(_key32(my_node_key, "node key").hex())
    if wrapped is None:
        return None
    if not isinstance(my_box_private, nacl.public.PrivateKey):
        my_box_private = nacl.public.PrivateKey(_key32(my_box_private, "box private key"))
    return _open_with(nonce, ciphertext, wrapped, my_box_private)


def recover_payload(
    nonce: bytes,
    ciphertext: bytes,
    keys: Mapping[str, Any],
    admin_signing_key: nacl.signing.SigningKey | bytes,
) -> dict[str, bytes] | None:
    """Admin recovery: the files opened with an admin's Ed25519 key (32-byte seed or SigningKey).

    None when that admin was not sealed to; WireError when tampered with.
    """
    if not isinstance(admin_signing_key, nacl.signing.SigningKey):
        admin_signing_key = nacl.signing.SigningKey(_key32(admin_signing_key, "admin seed"))
    public = bytes(admin_signing_key.verify_key)
    wrapped = keys.get(public.hex())
    if wrapped is None:
        return None
    sk64 = bytes(admin_signing_key) + public
    box_private = nacl.public.PrivateKey(nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(sk64))
    return _open_with(nonce, ciphertext, wrapped, box_private)
