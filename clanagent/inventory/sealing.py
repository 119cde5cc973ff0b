"""Sealed machine endpoints: a public copy of the inventory reveals no address.

Owns: sealing a machine's endpoint list to every member machine's X25519 box
key, opening it again with one's own key, and resealing a whole document to
its current member set (so a removed machine cannot read later endpoints).

Format (spec, with one necessary deviation): sealed = pack({"n": nonce24,
"c": SecretBox(K).encrypt(pack(endpoints)), "k": {hex(node_key):
SealedBox(box_key).encrypt(K)}}).  Wire maps take str keys only, so the
recipient map is keyed by the lowercase hex of the node key, not its bytes.
K is a fresh 32-byte key per seal.  An empty endpoint list is stored as b""
("none"), which the spec allows.

Errors: `open_endpoints` returns None when we are not a recipient, and raises
`SealError` (a ValueError) when the blob is malformed or was tampered with --
a corrupted doc is a different situation from "not for me" and callers should
log it.  `open_doc_endpoints` skips such machines (and lists them in
`errors` when given a dict), it never raises on a bad blob.

Must never: put an address in the clear into a sealed doc, reuse K or a
nonce, leak a PyNaCl/msgpack exception, or log plaintext endpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.utils

from clanagent import limits as sizes
from clanagent.wire import Limits, WireError, pack, unpack

__all__ = [
    "SealError",
    "MAX_ENDPOINTS",
    "seal_endpoints",
    "open_endpoints",
    "recipients_of",
    "reseal_doc",
    "open_doc_endpoints",
]

MAX_ENDPOINTS = 64
# A blob holds one wrapped key per member: as many as a clan has machines.
_LIMITS = Limits(
    max_frame=sizes.MAX_SEALED,
    max_depth=4,
    max_str=512,
    max_map=sizes.MAX_TABLE,
    max_array=MAX_ENDPOINTS,
)


class SealError(ValueError):
    """A sealed blob is malformed or tampered with, or a reseal was asked wrongly."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _key_bytes(key: Any, what: str) -> bytes:
    if type(key) is not bytes or len(key) != 32:
        raise SealError(f"{what} must be 32 bytes")
    return key


def seal_endpoints(endpoints: Sequence[str], recipients: Mapping[bytes, bytes]) -> bytes:
    """Seal `endpoints` so that only holders of the recipients' box keys can read them.

    `recipients` maps node_key (Ed25519, 32 bytes) to box_key (X25519 public, 32 bytes).
    """
    if len(endpoints) > MAX_ENDPOINTS or not all(type(e) is str for e in endpoints):
        raise SealError(f"endpoints must be at most {MAX_ENDPOINTS} strings")
    secret = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
    nonce = nacl.utils.random(nacl.secret.SecretBox.NONCE_SIZE)
    ciphertext = nacl.secret.SecretBox(secret).encrypt(pack(list(endpoints)), nonce).ciphertext
    keys = {}
    for node_key, box_key in recipients.items():
        pub = nacl.public.PublicKey(_key_bytes(box_key, "box_key"))
        keys[_key_bytes(node_key, "node_key").hex()] = nacl.public.SealedBox(pub).encrypt(secret)
    return pack({"n": nonce, "c": ciphertext, "k": keys})


def open_endpoints(
    sealed: bytes, my_node_key: bytes, my_box_private: nacl.public.PrivateKey | bytes
) -> list[str] | None:
    """The endpoints in `sealed`, or None when `my_node_key` is not a recipient.

    Raises SealError when the blob is malformed or fails authentication.
    """
    try:
        value = unpack(sealed, _LIMITS)
    except WireError as exc:
        raise SealError(f"sealed endpoints: {exc.reason}") from None
    if type(value) is not dict or value.keys() != {"n", "c", "k"}:
        raise SealError("sealed endpoints: expected a map of n, c, k")
    nonce, ciphertext, keys = value["n"], value["c"], value["k"]
    if type(nonce) is not bytes or len(nonce) != nacl.secret.SecretBox.NONCE_SIZE:
        raise SealError("sealed endpoints: bad nonce")
    if type(ciphertext) is not bytes or type(keys) is not dict:
        raise SealError("sealed endpoints: bad ciphertext or key map")
    wrapped = keys.get(my_node_key.hex())
    if wrapped is None:
        return None
    if type(wrapped) is not bytes:
        raise SealError("sealed endpoints: bad wrapped key")
    if not isinstance(my_box_private, nacl.public.PrivateKey):
        my_box_private = nacl.public.PrivateKey(_key_bytes(my_box_private, "box private key"))
    try:
        secret = nacl.public.SealedBox(my_box_private).decrypt(wrapped)
        plain = nacl.secret.SecretBox(secret).decrypt(ciphertext, nonce)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        raise SealError(
            "sealed endpoints: authentication failed (tampered or not for this key)"
        ) from None
    try:
        endpoints = unpack(plain, _LIMITS)
    except WireError as exc:
        raise SealError(f"sealed endpoints: {exc.reason}") from None
    if type(endpoints) is not list or not all(type(e) is str for e in endpoints):
        raise SealError("sealed endpoints: plaintext is not a list of strings")
    return endpoints


def recipients_of(doc: Mapping[str, Any]) -> dict[bytes, bytes]:
    """node_key -> box_key of every machine in the doc (the member set)."""
    out = {}
    for name, m in sorted(doc.get("machines", {}).items()):
        try:
            out[_key_bytes(m.get("node_key"), "node_key")] = _key_bytes(m.get("box_key"), "box_key")
        except (SealError, AttributeError):
            raise SealError(f"machines.{name}: needs 32-byte node_key and box_key") from None
    return out


def reseal_doc(
    doc: Mapping[str, Any], plaintext_endpoints: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """A copy of `doc` with every machine's endpoints sealed to all current machines.

    A machine's endpoints are `plaintext_endpoints[name]` if given, else its
    plain `endpoints` list.  Plain lists are cleared.  Raises SealError when a
    named machine does not exist, or when a machine has sealed endpoints we
    were not given in plain (resealing would lose them; open them first with
    `open_doc_endpoints`).
    """
    machines = doc.get("machines", {})
    unknown = sorted(set(plaintext_endpoints) - set(machines))
    if unknown:
        raise SealError(f"no machine named {unknown[0]!r}")
    recipients = recipients_of(doc)
    out = copy.deepcopy(dict(doc))
    for name, m in out.get("machines", {}).items():
        if name in plaintext_endpoints:
            endpoints = list(plaintext_endpoints[name])
        else:
            endpoints = list(m.get("endpoints", []))
            if not endpoints and m.get("sealed_endpoints"):
                raise SealError(f"machines.{name}: sealed endpoints not given in plain")
        m["endpoints"] = []
        m["sealed_endpoints"] = seal_endpoints(endpoints, recipients) if endpoints else b""
    return out


def open_doc_endpoints(
    doc: Mapping[str, Any],
    my_node_key: bytes,
    my_box_private: nacl.public.PrivateKey | bytes,
    errors: dict[str, str] | None = None,
) -> dict[str, list[str]]:
    """Every machine's endpoints we can read: plain lists, and sealed ones opened.

    A machine whose blob is not for us is left out; one whose blob is bad is
    left out and, when `errors` is given, recorded there as name -> reason.
    """
    out: dict[str, list[str]] = {}
    for name, m in sorted(doc.get("machines", {}).items()):
        plain = list(m.get("endpoints", []))
        sealed = m.get("sealed_endpoints", b"")
        opened: list[str] | None = None
        if sealed:
            try:
                opened = open_endpoints(sealed, my_node_key, my_box_private)
            except SealError as exc:
                if errors is not None:
                    errors[name] = exc.reason
        merged = plain + [e for e in (opened or []) if e not in plain]
        if merged or (sealed and opened is not None):
            out[name] = merged
    return out
