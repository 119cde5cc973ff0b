"""Signed envelopes: what crosses every machine boundary.

Owns: `SignedRecord`, a header `{clan, kind, key, version, body}` packed
canonically and signed with the origin's Ed25519 key, its wire form
`[signer, payload, signature]`, the signature domain and the version bounds.

Must never: accept a signed record whose signature does not verify (through
`decode`) or whose bytes are not the one canonical encoding of its content,
or raise anything but `WireError` on bad input.
"""

from __future__ import annotations

import hashlib
from dataclasses import InitVar, dataclass, field
from typing import Any, Protocol

import msgpack
import nacl.exceptions
import nacl.signing

from .codec import DEFAULT_LIMITS, RECORD_LIMITS, Limits, WireError, _tname, _unpack, pack, unpack
from .schema import Record, record_class

__all__ = [
    "Signer",
    "SignedRecord",
    "RECORD_SIGNATURE_DOMAIN",
    "MAX_VERSION",
    "MAX_RECORD_VERSION",
]


# Signatures cover this prefix + payload, so a record signature can never be
# replayed as (or forged from) a signature made by another part of the system.
RECORD_SIGNATURE_DOMAIN = b"clanagent-record-v1\0"
MAX_VERSION = 2**63 - 1
# Records are created and accepted only below this version.  Versions count
# one per publish, so 2**53 never runs out (a million publishes a second for
# 285 years), leaves the rest of MAX_VERSION as margin, and is exact as a
# float for JSON consumers.  Decoding still admits up to MAX_VERSION (peers
# refuse such records by policy: counted, not a malformed envelope).
MAX_RECORD_VERSION = 2**53
_HEADER_KEYS = frozenset({"clan", "kind", "key", "version", "body"})
_ENV_SIGNER_HEAD = b"\x93\xc4\x20"  # fixarray(3), bin8(32)
_ENV_SIG_HEAD = b"\xc4\x40"  # bin8(64)
# The envelope alone: [signer, payload, signature], three bins in one frame.
_ENVELOPE_LIMITS = Limits(max_depth=1, max_str=0, max_array=3, max_map=0)


class Signer(Protocol):
    """What creating a record needs from an identity (clanagent.identity.Identity fits)."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def _bin_head(n: int) -> bytes:
    if n < 0x100:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 0x10000:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def _check_header(h: Any, limits: Limits) -> None:
    if type(h) is not dict:
        raise WireError(f"header: expected map, got {_tname(h)}")
    if h.keys() != _HEADER_KEYS:
        extra = sorted(str(k) for k in h if k not in _HEADER_KEYS)
        if extra:
            raise WireError(f"header.{extra[0]}: unknown field")
        raise WireError(f"header.{sorted(_HEADER_KEYS - h.keys())[0]}: missing field")
    clan, kind, key, version = h["clan"], h["kind"], h["key"], h["version"]
    if type(clan) is not bytes:
        raise WireError(f"header.clan: expected bytes, got {_tname(clan)}")
    if len(clan) > limits.max_clan:
        raise WireError(f"header.clan: {len(clan)} bytes exceeds limit {limits.max_clan}")
    if type(kind) is not str:
        raise WireError(f"header.kind: expected str, got {_tname(kind)}")
    if not kind:
        raise WireError("header.kind: empty")
    if len(kind) > limits.max_kind or len(kind.encode()) > limits.max_kind:
        raise WireError(f"header.kind: longer than {limits.max_kind} bytes")
    if type(key) is not str:
        raise WireError(f"header.key: expected str, got {_tname(key)}")
    # len(str) <= len(utf-8) always, so the cheap test decides most keys.
    if len(key) > limits.max_key or len(key.encode()) > limits.max_key:
        raise WireError(f"header.key: longer than {limits.max_key} bytes")
    if type(version) is not int:
        raise WireError(f"header.version: expected int, got {_tname(version)}")
    if not 1 <= version <= MAX_VERSION:
        raise WireError(f"header.version: {version} is outside 1..2**63-1")


@dataclass(frozen=True, slots=True, repr=False)
class SignedRecord:
    """A signed, canonical record: what crosses every machine boundary.

    The wire form is the msgpack array [signer, payload, signature]; payload
    is pack() of {clan, kind, key, version, body}; signature is Ed25519 by
    `signer` over RECORD_SIGNATURE_DOMAIN + payload.  The header is decoded
    and checked once at construction and exposed as attributes.

    Constructing one directly checks structure and canonical form but NOT the
    signature; untrusted bytes go through `decode` (which verifies).  `body`
    is the decoded value: treat it as read-only, it is shared by everyone who
    holds this record.
    """

    signer: bytes
    payload: bytes
    signature: bytes
    limits: InitVar[Limits] = RECORD_LIMITS
    clan: bytes = field(init=False, compare=False)
    kind: str = field(init=False, compare=False)
    key: str = field(init=False, compare=False)
    version: int = field(init=False, compare=False)
    body: Any = field(init=False, compare=False)
    size: int = field(init=False, compare=False)
    record_id: bytes = field(init=False, compare=False)

    def __post_init__(self, limits: Limits) -> None:
        signer, payload, signature = self.signer, self.payload, self.signature
        if type(signer) is not bytes or len(signer) != 32:
            raise WireError("signer: expected 32 bytes")
        if type(signature) is not bytes or len(signature) != 64:
            raise WireError("signature: expected 64 bytes")
        if type(payload) is not bytes:
            raise WireError("payload: expected bytes")
        # Canonical form is what makes the signed bytes a function of the
        # content: without it the same record could travel as many byte
        # strings (other int widths, float32, key orders, duplicate keys).
        # Key order is checked while decoding; re-packing the decoded value
        # in that order must then give the payload back byte for byte.
        header = _unpack(payload, limits, True)
        _check_header(header, limits)
        if msgpack.packb(header, use_bin_type=True, use_single_float=False) != payload:
            raise WireError("payload is not canonical")
        bin_head = _bin_head(len(payload))
        size = len(_ENV_SIGNER_HEAD) + 32 + len(bin_head) + len(payload) + len(_ENV_SIG_HEAD) + 64
        if size > limits.max_frame:
            raise WireError(f"record of {size} bytes exceeds limit {limits.max_frame}")
        # The hash of exactly encode()'s bytes, fed in pieces to avoid a copy.
        h = hashlib.blake2b(digest_size=32)
        for part in (_ENV_SIGNER_HEAD, signer, bin_head, payload, _ENV_SIG_HEAD, signature):
            h.update(part)
        setattr_ = object.__setattr__
        setattr_(self, "clan", header["clan"])
        setattr_(self, "kind", header["kind"])
        setattr_(self, "key", header["key"])
        setattr_(self, "version", header["version"])
        setattr_(self, "body", header["body"])
        setattr_(self, "size", size)
        setattr_(self, "record_id", h.digest())

    @property
    def origin(self) -> bytes:
        """The Ed25519 public key of the node that made (signed) this record."""
        return self.signer

    @classmethod
    def create(
        cls,
        identity: Signer,
        kind: str,
        key: str,
        version: int,
        body: Any,
        clan: bytes = b"",
    ) -> SignedRecord:
        """Sign a new record; a Record body is converted with to_wire().

        Applies the same checks (and RECORD_LIMITS) as `decode`, so we never
        emit a record our peers would drop.
        """
        if isinstance(body, Record):
            body_kind = getattr(type(body), "KIND", None)
            if body_kind is not None and body_kind != kind:
                raise WireError(f"body is a {body_kind!r} record, not {kind!r}")
            body = body.to_wire()
        header = {"clan": clan, "kind": kind, "key": key, "version": version, "body": body}
        _check_header(header, DEFAULT_LIMITS)
        if version >= MAX_RECORD_VERSION:
            raise WireError(f"header.version: {version} is at or over 2**53")
        payload = pack(header)
        signature = identity.sign(RECORD_SIGNATURE_DOMAIN + payload)
        return cls(bytes(identity.public_key), payload, signature)

    def encode(self) -> bytes:
        """The canonical wire bytes: pack([signer, payload, signature])."""
        return pack([self.signer, self.payload, self.signature])

    @classmethod
    def decode(
        cls, data: bytes, limits: Limits = RECORD_LIMITS, *, verify: bool = True
    ) -> SignedRecord:
        """Parse and (unless verify=False, for data we stored after verifying) verify a record.

        Cheap checks run first and the signature last, so garbage costs
        little.  Every failure is a WireError.
        """
        env = unpack(data, limits)
        if type(env) is not list or len(env) != 3:
            raise WireError("envelope: expected an array of 3")
        record = cls(env[0], env[1], env[2], limits)
        # All three items decoded to their exact sizes and nothing trailed, so
        # the input is canonical exactly when no header was wider than needed,
        # i.e. when its length is the canonical length.
        if len(data) != record.size:
            raise WireError("envelope is not canonical")
        if verify:
            record.verify()
        return record

    @staticmethod
    def signed_by(data: bytes) -> bytes | None:
        """The signer of `data` when its envelope carries a payload that this
        signer's signature covers, whatever the payload holds; else None.

        For telling a record refused for its signed content (over our limits,
        not canonical: the origin's doing, a relay only forwarded it) from
        bytes that a sender forged or broke (that sender's doing).  Costs one
        signature check, so callers remember the answer by record id.
        """
        try:
            env = unpack(data, _ENVELOPE_LIMITS)
        except WireError:
            return None
        if type(env) is not list or len(env) != 3:
            return None
        signer, payload, signature = env
        if type(signer) is not bytes or type(payload) is not bytes or type(signature) is not bytes:
            return None
        if len(signer) != 32 or len(signature) != 64:
            return None
        try:
            nacl.signing.VerifyKey(signer).verify(RECORD_SIGNATURE_DOMAIN + payload, signature)
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            return None
        return signer

    def verify(self) -> None:
        """Check the signature (raises WireError("bad signature"))."""
        try:
            nacl.signing.VerifyKey(self.signer).verify(
                RECORD_SIGNATURE_DOMAIN + self.payload, self.signature
            )
        except (nacl.exceptions.CryptoError, ValueError, TypeError):
            # BadSignatureError is a CryptoError; libsodium also lands here
            # for small-order or non-canonical keys and non-canonical S.
            raise WireError("bad signature") from None

    def parse_body(self, cls: type[Record] | None = None) -> Record:
        """The body as a typed record (by `cls`, or the type registered for `kind`)."""
        if cls is None:
            cls = record_class(self.kind)
        elif getattr(cls, "KIND", None) != self.kind:
            raise WireError(f"record kind {self.kind!r} is not {cls.__name__}")
        return cls.from_wire(self.body, path="body")

    def __repr__(self) -> str:
        return (
            f"SignedRecord(kind={self.kind!r}, key={self.key!r}, version={self.version}, "
            f"origin={self.signer.hex()[:16]}, size={self.size})"
        )
