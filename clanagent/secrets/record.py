"""The secret record and the rotate request: building, parsing, choosing the current one.

Owns: the body of a "secret" record (kind "secret", key = instance id,
the generation in the body, signed by the generating machine) and of a
"secret-rotate" request (key = instance id, body {generation, requested}),
the strict checks that make a parsed body trustworthy in shape (every
field typed, sorted unique keys, sealed keys for exactly the recipients and
admins, file names safe, the key agreeing with the body), and the
rule that picks the current generation among records from several origins:
the highest (generation, created, origin) that verifies, whose origin is
allowed (a holder) and that opens for us when we are a recipient.

Must never: accept a body that fails any check (every failure is a
WireError, the remote kind), trust a record whose signature was not checked
unless the caller says it was, or decide on anything but its arguments.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import nacl.public

from clanagent.secrets.crypto import SEALED_KEY_SIZE, open_payload, seal_payload
from clanagent.secrets.model import SecretInstance, valid_file_name
from clanagent.wire import MAX_VERSION, Record, SignedRecord, Signer, WireError, record_type

__all__ = [
    "SECRET_KIND",
    "ROTATE_KIND",
    "SecretBody",
    "RotateRequest",
    "Current",
    "build_secret_record",
    "parse_secret_record",
    "build_rotate_request",
    "parse_rotate_request",
    "choose_current",
    "open_body",
]

SECRET_KIND = "secret"
ROTATE_KIND = "secret-rotate"
MAX_RECIPIENTS = 1024
_HEX_KEY = re.compile(r"[0-9a-f]{64}")


def _sorted_keys(values: list[bytes], what: str) -> None:
    if len(values) > MAX_RECIPIENTS:
        raise WireError(f"body.{what}: more than {MAX_RECIPIENTS}")
    for i, v in enumerate(values):
        if len(v) != 32:
            raise WireError(f"body.{what}[{i}]: expected 32 bytes")
    if any(a >= b for a, b in zip(values, values[1:], strict=False)):
        raise WireError(f"body.{what}: not sorted and unique")


@record_type
@dataclass(frozen=True, slots=True)
class SecretBody(Record):
    """One generation of a secret instance, sealed to its recipients and the admins."""

    KIND: ClassVar[str] = SECRET_KIND
    service: str
    secret: str
    scope: str
    generation: int
    created: int
    recipients: list[bytes]
    admins: list[bytes]
    nonce: bytes
    ciphertext: bytes
    keys: dict[str, bytes]
    public: dict[str, bytes]
    inputs: dict[str, int]

    def __post_init__(self) -> None:
        # Types are checked by from_wire before this runs; values here.
        try:
            SecretInstance(self.service, self.secret, self.scope)
        except WireError as exc:
            raise WireError(f"body: {exc.reason}") from None
        if not 1 <= self.generation <= MAX_VERSION:
            raise WireError("body.generation: must be at least 1")
        if not 0 <= self.created <= MAX_VERSION:
            raise WireError("body.created: must not be negative")
        _sorted_keys(self.recipients, "recipients")
        _sorted_keys(self.admins, "admins")
        if not self.recipients:
            raise WireError("body.recipients: empty")
        if len(self.nonce) != 24:
            raise WireError("body.nonce: expected 24 bytes")
        # SecretBox adds a 16-byte MAC to a packed map (at least 1 byte).
        if len(self.ciphertext) < 17:
            raise WireError("body.ciphertext: too short")
        expected = {k.hex() for k in self.recipients} | {k.hex() for k in self.admins}
        if set(self.keys) != expected:
            raise WireError("body.keys: must be sealed to exactly the recipients and admins")
        for name, wrapped in self.keys.items():
            if not _HEX_KEY.fullmatch(name) or len(wrapped) != SEALED_KEY_SIZE:
                raise WireError(f"body.keys.{name[:64]}: bad sealed key")
        for name in self.public:
            if not valid_file_name(name):
                raise WireError(f"body.public: bad file name {name[:64]!r}")
        for dep, gen in self.inputs.items():
            if "/" not in dep or not 1 <= gen <= MAX_VERSION:
                raise WireError(f"body.inputs: bad entry {dep[:64]!r}")

    @property
    def instance(self) -> SecretInstance:
        return SecretInstance(self.service, self.secret, self.scope)

    @property
    def order(self) -> tuple[int, int]:
        return (self.generation, self.created)


@record_type
@dataclass(frozen=True, slots=True)
class RotateRequest(Record):
    """A member asks for the generation after `generation` of an instance."""

    KIND: ClassVar[str] = ROTATE_KIND
    generation: int
    requested: int

    def __post_init__(self) -> None:
        if not 0 <= self.generation <= MAX_VERSION:
            raise WireError("body.generation: out of range")
        if not 1 <= self.requested <= MAX_VERSION:
            raise WireError("body.requested: must be at least 1")


def secret_body(
    inst: SecretInstance,
    generation: int,
    created: int,
    secret_files: Mapping[str, bytes],
    public_files: Mapping[str, bytes],
    recipients: Mapping[bytes, bytes],
    admins: Sequence[bytes],
    inputs: Mapping[str, int] | None = None,
) -> dict:
    """Seal one generation into a record body (the agent publishes it as a record)."""
    nonce, ciphertext, keys = seal_payload(secret_files, recipients, admins)
    body = SecretBody(
        service=inst.service,
        secret=inst.secret,
        scope=inst.scope_id,
        generation=generation,
        created=created,
        recipients=sorted(recipients),
        admins=sorted(set(admins)),
        nonce=nonce,
        ciphertext=ciphertext,
        keys=keys,
        public=dict(public_files),
        inputs=dict(inputs or {}),
    )
    wire = body.to_wire()
    # Round-trip through the strict parser so we never publish what peers drop.
    SecretBody.from_wire(wire, path="body")
    return wire


def build_secret_record(
    identity: Signer,
    inst: SecretInstance,
    generation: int,
    created: int,
    secret_files: Mapping[str, bytes],
    public_files: Mapping[str, bytes],
    recipients: Mapping[bytes, bytes],
    admins: Sequence[bytes],
    inputs: Mapping[str, int] | None = None,
    clan: bytes = b"",
    version: int | None = None,
) -> SignedRecord:
    """Seal and sign one generation.  `recipients`: node key -> box key.

    `version` is the record version (the origin's own counter when it goes
    through gossip); it defaults to the generation for standalone use."""
    body = secret_body(
        inst, generation, created, secret_files, public_files, recipients, admins, inputs
    )
    return SignedRecord.create(
        identity, SECRET_KIND, inst.id, generation if version is None else version, body, clan=clan
    )


def parse_secret_record(record: SignedRecord, *, verify: bool = True) -> SecretBody:
    """The checked body of a secret record; WireError on any mismatch."""
    if record.kind != SECRET_KIND:
        raise WireError(f"record kind {record.kind!r} is not {SECRET_KIND!r}")
    body = SecretBody.from_wire(record.body, path="body")
    if record.key != body.instance.id:
        raise WireError("record key does not match the body's instance")
    if verify:
        record.verify()
    return body


def build_rotate_request(
    identity: Signer, instance_id: str, generation: int, requested: int, clan: bytes = b""
) -> SignedRecord:
    """A signed request for the generation after `generation` (version = requested time)."""
    body = RotateRequest(generation=generation, requested=requested)
    return SignedRecord.create(identity, ROTATE_KIND, instance_id, requested, body, clan=clan)


def parse_rotate_request(record: SignedRecord, *, verify: bool = True) -> RotateRequest:
    """The checked body of a rotate request; WireError on any mismatch."""
    if record.kind != ROTATE_KIND:
        raise WireError(f"record kind {record.kind!r} is not {ROTATE_KIND!r}")
    body = RotateRequest.from_wire(record.body, path="body")
    if verify:
        record.verify()
    return body


@dataclass(frozen=True, slots=True)
class Current:
    """The current generation of an instance: its record and checked body."""

    record: SignedRecord
    body: SecretBody


def choose_current(
    records: Iterable[SignedRecord],
    allowed_origins: Iterable[bytes],
    *,
    opens: Callable[[SecretBody], object] | None = None,
    verify: bool = True,
    rejected: list[tuple[SignedRecord, str]] | None = None,
) -> Current | None:
    """The current generation: the highest (generation, created, origin) that passes.

    A record passes when it parses (and verifies, unless `verify` is False
    for records the store already verified), its origin is in
    `allowed_origins`, and `opens(body)` (when given: decrypt it if we are a
    recipient) does not raise WireError.  Every node given the same records
    picks the same one, so two sides of a partition that each made
    generation N+1 converge once they see each other's records.  Failures
    are appended to `rejected` as (record, reason) when given.
    """
    allowed = set(allowed_origins)
    parsed: list[tuple[tuple[int, int, bytes], SignedRecord, SecretBody]] = []
    for rec in records:
        try:
            body = parse_secret_record(rec, verify=verify)
        except WireError as exc:
            if rejected is not None:
                rejected.append((rec, exc.reason))
            continue
        if rec.origin not in allowed:
            if rejected is not None:
                rejected.append((rec, "origin is not a holder"))
            continue
        parsed.append(((body.generation, body.created, rec.origin), rec, body))
    parsed.sort(key=lambda t: t[0], reverse=True)
    for _, rec, body in parsed:
        if opens is not None:
            try:
                opens(body)
            except WireError as exc:
                if rejected is not None:
                    rejected.append((rec, exc.reason))
                continue
        return Current(rec, body)
    return None


def open_body(
    body: SecretBody, my_node_key: bytes, my_box_private: nacl.public.PrivateKey | bytes
) -> dict[str, bytes] | None:
    """The secret files of `body`, or None when we are not a recipient; WireError if tampered."""
    if my_node_key not in body.recipients:
        return None
    files = open_payload(body.nonce, body.ciphertext, body.keys, my_node_key, my_box_private)
    if files is None:  # a recipient without a sealed key: __post_init__ forbids it
        raise WireError("secret: no sealed key for a recipient")
    return files
