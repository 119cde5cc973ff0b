"""Admin requests to start, stop or restart a VM, from any machine of the clan.

Owns: the request an admin signs with the admin key (`clanctl vm start|stop|
restart NAME`), its checks, and which request is in force for a VM.  The
request travels as a gossiped record (kind `vm-request`, key = VM name), so
it reaches the hosting agent over the mesh whichever machine it was made
on.  Must never: act on a request that is not signed by a current admin, or
one older than the last one acted on (a replay cannot undo a later order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import nacl.exceptions
import nacl.signing

from ..wire import Record, WireError, pack, record_type

__all__ = [
    "REQUEST_KIND",
    "ACTIONS",
    "VmRequest",
    "sign_request",
    "parse_body",
    "parse_request",
    "verify_request",
    "in_force",
    "ConsoleRequest",
    "sign_console",
    "parse_console",
    "NonceCache",
]

REQUEST_KIND = "vm-request"
ACTIONS = ("start", "stop", "restart")
DOMAIN = b"clanagent-vm-request-v1\0"
MAX_SKEW = 300  # seconds a request may be older than now when it is submitted


@record_type
@dataclass(frozen=True, slots=True)
class VmRequest(Record):
    """An admin's order for one VM: the `vm-request` record's body (key = the VM)."""

    KIND: ClassVar[str] = REQUEST_KIND
    vm: str
    action: str
    at: int
    admin: bytes
    sig: bytes

    def __post_init__(self) -> None:
        if not 0 < len(self.vm) <= 63:
            raise WireError("vm: expected a VM name")
        if self.action not in ACTIONS:
            raise WireError(f"action: expected one of {', '.join(ACTIONS)}")
        if not 0 <= self.at < 2**63:
            raise WireError("at: expected a unix time")
        if len(self.admin) != 32 or len(self.sig) != 64:
            raise WireError("admin, sig: expected a 32-byte key and a 64-byte signature")


def _message(vm: str, action: str, at: int) -> bytes:
    return DOMAIN + pack([vm, action, at])


def sign_request(key: nacl.signing.SigningKey, vm: str, action: str, at: int) -> VmRequest:
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
    sig = key.sign(_message(vm, action, at)).signature
    return VmRequest(vm, action, at, bytes(key.verify_key), sig)


def parse_body(body: Any) -> VmRequest:
    """A request's body checked field by field (the schema); WireError otherwise."""
    return VmRequest.from_wire(body, path="body")


def verify_request(req: VmRequest, admins: frozenset[bytes] | set[bytes]) -> VmRequest:
    """`req` when a current admin signed it; WireError otherwise."""
    if req.admin not in admins:
        raise WireError("vm request: not signed by an admin of this clan")
    try:
        nacl.signing.VerifyKey(req.admin).verify(_message(req.vm, req.action, req.at), req.sig)
    except (nacl.exceptions.BadSignatureError, ValueError):
        raise WireError("vm request: bad signature") from None
    return req


def parse_request(body: Any, admins: frozenset[bytes] | set[bytes]) -> VmRequest:
    """A request whose admin signature verifies; WireError otherwise."""
    return verify_request(parse_body(body), admins)


def in_force(bodies: list[Any], vm: str, admins: frozenset[bytes] | set[bytes]) -> VmRequest | None:
    """The newest valid request for `vm` (ties broken by action, then signature)."""
    best: VmRequest | None = None
    for body in bodies:
        try:
            req = parse_request(body, admins)
        except WireError:
            continue
        if req.vm != vm:
            continue
        if best is None or (req.at, req.action, req.sig) > (best.at, best.action, best.sig):
            best = req
    return best


# -- interactive console ----------------------------------------------------------
#
# A console session is not a gossiped order but a live stream, so its request
# is bound to the one machine that hosts the VM and carries a random nonce the
# host remembers for as long as the request is fresh: it cannot be replayed
# to the same host, moved to another host or used for another VM.

CONSOLE_DOMAIN = b"clanagent-vm-console-v1\0"
NONCE_LEN = 16


@dataclass(frozen=True)
class ConsoleRequest:
    vm: str
    machine: str
    at: int
    nonce: bytes
    admin: bytes
    sig: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "machine": self.machine,
            "at": self.at,
            "nonce": self.nonce,
            "admin": self.admin,
            "sig": self.sig,
        }


def _console_message(vm: str, machine: str, at: int, nonce: bytes) -> bytes:
    return CONSOLE_DOMAIN + pack([vm, machine, at, nonce])


def sign_console(
    key: nacl.signing.SigningKey, vm: str, machine: str, at: int, nonce: bytes
) -> ConsoleRequest:
    sig = key.sign(_console_message(vm, machine, at, nonce)).signature
    return ConsoleRequest(vm, machine, at, nonce, bytes(key.verify_key), sig)


_CONSOLE_FIELDS = {"vm", "machine", "at", "nonce", "admin", "sig"}


def parse_console(body: Any, admins: frozenset[bytes] | set[bytes]) -> ConsoleRequest:
    """A console request whose admin signature verifies; WireError otherwise.

    Freshness and the nonce are the caller's to check (it knows the clock and
    which nonces it has seen).
    """
    if not isinstance(body, dict) or set(body) != _CONSOLE_FIELDS:
        raise WireError("console request: expected {vm, machine, at, nonce, admin, sig}")
    vm, machine, at, nonce, admin, sig = (
        body[k] for k in ("vm", "machine", "at", "nonce", "admin", "sig")
    )
    if not isinstance(vm, str) or not 0 < len(vm) <= 63:
        raise WireError("console request: bad vm name")
    if not isinstance(machine, str) or not 0 < len(machine) <= 63:
        raise WireError("console request: bad machine name")
    if type(at) is not int or at < 0:
        raise WireError("console request: bad time")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_LEN:
        raise WireError(f"console request: nonce must be {NONCE_LEN} bytes")
    if not isinstance(admin, bytes) or len(admin) != 32 or not isinstance(sig, bytes):
        raise WireError("console request: bad admin key or signature")
    if admin not in admins:
        raise WireError("console request: not signed by an admin of this clan")
    try:
        nacl.signing.VerifyKey(admin).verify(_console_message(vm, machine, at, nonce), sig)
    except (nacl.exceptions.BadSignatureError, ValueError):
        raise WireError("console request: bad signature") from None
    return ConsoleRequest(vm, machine, at, nonce, admin, sig)


class NonceCache:
    """Nonces seen within the freshness window: a second use is a replay."""

    def __init__(self, window: int = MAX_SKEW, limit: int = 4096) -> None:
        self.window = window
        self.limit = limit
        self._seen: dict[bytes, int] = {}

    def check(self, req: ConsoleRequest, now: int) -> None:
        """WireError when the request is stale, from the future, or replayed."""
        if req.at < now - self.window or req.at > now + self.window:
            raise WireError(
                f"console request: {abs(now - req.at)} s off this machine's clock "
                f"(limit {self.window} s; check both clocks)"
            )
        for n, at in list(self._seen.items()):
            if at < now - self.window:
                del self._seen[n]
        if req.nonce in self._seen:
            raise WireError("console request: replayed (nonce already used)")
        if len(self._seen) >= self.limit:
            raise WireError("console request: too many sessions opened recently; try later")
        self._seen[req.nonce] = req.at
