"""Sealing secret payloads: only recipients and admins open them."""

from __future__ import annotations

import nacl.signing
import pytest

from clanagent.identity import Identity
from clanagent.secrets.crypto import (
    SecretsLocalError,
    admin_box_public,
    open_payload,
    recover_payload,
    seal_payload,
)
from clanagent.wire import WireError

FILES = {"private": b"\x00secret\xff", "other": b""}


def _setup(n=3):
    ids = [Identity.generate() for _ in range(n)]
    admin = nacl.signing.SigningKey.generate()
    recipients = {i.public_key: i.box_public for i in ids}
    return ids, admin, recipients


def test_every_recipient_opens_and_others_do_not():
    ids, admin, recipients = _setup()
    nonce, ct, keys = seal_payload(FILES, recipients, [bytes(admin.verify_key)])
    assert set(keys) == {i.public_key.hex() for i in ids} | {bytes(admin.verify_key).hex()}
    for i in ids:
        assert open_payload(nonce, ct, keys, i.public_key, i.box_key) == FILES
        # the raw 32-byte private key works too
        assert open_payload(nonce, ct, keys, i.public_key, bytes(i.box_key)) == FILES
    stranger = Identity.generate()
    assert open_payload(nonce, ct, keys, stranger.public_key, stranger.box_key) is None
    # a stranger claiming a recipient's name cannot open its sealed key
    with pytest.raises(WireError, match="does not open"):
        open_payload(nonce, ct, keys, ids[0].public_key, stranger.box_key)
    assert b"secret" not in ct and all(b"secret" not in k for k in keys.values())


def test_admin_recovers_with_the_signing_key():
    ids, admin, recipients = _setup(1)
    nonce, ct, keys = seal_payload(FILES, recipients, [bytes(admin.verify_key)])
    assert recover_payload(nonce, ct, keys, admin) == FILES
    assert recover_payload(nonce, ct, keys, bytes(admin)) == FILES
    other = nacl.signing.SigningKey.generate()
    assert recover_payload(nonce, ct, keys, other) is None
    # an admin left out of the seal cannot recover
    nonce2, ct2, keys2 = seal_payload(FILES, recipients, [])
    assert recover_payload(nonce2, ct2, keys2, admin) is None


def test_fresh_key_and_nonce_per_seal():
    _, admin, recipients = _setup(1)
    a = seal_payload(FILES, recipients, [])
    b = seal_payload(FILES, recipients, [])
    assert a[0] != b[0] and a[1] != b[1]


def test_tampering_is_a_wire_error():
    ids, _, recipients = _setup(2)
    nonce, ct, keys = seal_payload(FILES, recipients, [])
    me = ids[0]
    flipped = bytes([ct[0] ^ 1]) + ct[1:]
    with pytest.raises(WireError, match="authentication"):
        open_payload(nonce, flipped, keys, me.public_key, me.box_key)
    with pytest.raises(WireError, match="authentication"):
        open_payload(bytes(24), ct, keys, me.public_key, me.box_key)
    # the other recipient's sealed key put under my name
    swapped = dict(keys)
    swapped[me.public_key.hex()] = keys[ids[1].public_key.hex()]
    with pytest.raises(WireError, match="does not open"):
        open_payload(nonce, ct, swapped, me.public_key, me.box_key)
    with pytest.raises(WireError):
        open_payload(nonce, ct, {me.public_key.hex(): b"short"}, me.public_key, me.box_key)
    with pytest.raises(WireError):
        open_payload(b"n", ct, keys, me.public_key, me.box_key)


def test_local_misuse():
    _, _, recipients = _setup(1)
    with pytest.raises(SecretsLocalError):
        seal_payload({"../x": b""}, recipients, [])
    with pytest.raises(SecretsLocalError):
        seal_payload({"x": "str"}, recipients, [])  # type: ignore[dict-item]
    with pytest.raises(SecretsLocalError):
        seal_payload(FILES, {b"short": bytes(32)}, [])
    with pytest.raises(SecretsLocalError):
        seal_payload(FILES, {bytes(32): bytes(32)}, [])  # a low-order box key
    with pytest.raises(SecretsLocalError):
        admin_box_public(b"x")
