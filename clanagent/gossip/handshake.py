"""The peer handshake: mutual authentication and session keys (sans-IO).

Owns: the four handshake messages between two clan nodes, their strict
decoding, the transcript, the key schedule, and the decision whether the peer
is admitted.  Bytes in, bytes out (like h11): the shell hands each received
WebSocket message to `Handshake.receive` and sends back what it returns.

Must never: do I/O or read a clock, send a node key in the clear, put a key
or the clan id into an error reason (reasons travel in clear close frames),
accept a message that is not exactly the next one of *this* session, keep
going after an error (the ERROR state is sticky), or let the peer's bytes
raise anything but `RemoteProtocolError` (every field is checked at decode,
and `receive` turns anything unforeseen into a handshake failure).

The flow (SIGMA-I, shaped like Noise XX, plus a key confirmation)::

    I -> R  HELLO    {t=1, v=[min, max], c=clan_tag, e=eph_i}
    R -> I  REPLY    {t=2, v=version, e=eph_r,
                      x=AEAD(k_hs_r2i, {k=static_r, s=sig_r(transcript)})}
    I -> R  FINISH   {t=3, x=AEAD(k_hs_i2r, {k=static_i, s=sig_i(transcript)})}
    R -> I  CONFIRM  {t=4, m=MAC(k_confirm, transcript)}

* Forward secrecy: every session does X25519 between fresh ephemerals; the
  static Ed25519 keys only sign.
* Identity hiding: static keys travel encrypted under keys from the
  ephemeral DH, so a passive observer learns no node key.  The initiator
  reveals itself only after it has verified and admitted the responder.
* Clan binding: the clan id is the first thing in the transcript, so every
  key and signature depends on it; the short clan tag in HELLO (a hash,
  never the id) only exists so a mismatch gives a clear error early.
* Both signatures cover the whole transcript so far (both ephemerals, the
  negotiated version, the signer's own key), with a role label so a
  signature can never be reflected back as the other role's.
* CONFIRM tells the initiator that the responder admitted it, so a refused
  initiator learns it during the handshake, not at its first frame.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, Protocol

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_scalarmult,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError
from nacl.signing import VerifyKey

from clanagent.gossip.errors import GossipError, LocalProtocolError, RemoteProtocolError
from clanagent.gossip.session import TAG_BYTES, SessionCipher
from clanagent.identity import node_id_of
from clanagent.wire import Limits, WireError, pack, unpack

__all__ = [
    "Handshake",
    "Role",
    "State",
    "Input",
    "MsgType",
    "TRANSITIONS",
    "PROTOCOL_MIN",
    "PROTOCOL_MAX",
    "CLAN_TAG_BYTES",
    "HANDSHAKE_LIMITS",
    "clan_tag",
]

# Protocol versions this code speaks.  HELLO's layout must never change, so
# that any two versions can still negotiate (or fail clearly).
PROTOCOL_MIN = 1
PROTOCOL_MAX = 1

CLAN_TAG_BYTES = 8
_KEY_BYTES = 32
_SIG_BYTES = 64
_MAC_BYTES = 32

# Tight bounds for untrusted handshake bytes: the largest message (REPLY) is
# about 170 bytes, so nothing bigger is worth decoding.
HANDSHAKE_LIMITS = Limits(
    max_frame=512, max_depth=2, max_str=8, max_bin=256, max_array=2, max_map=4
)
# The encrypted identity payload {k, s}: 105 bytes exactly.
_PAYLOAD_LIMITS = Limits(
    max_frame=128, max_depth=1, max_str=1, max_bin=_SIG_BYTES, max_array=0, max_map=2
)
# Both fields are fixed-size bins, so the payload has one length, and its
# ciphertext (REPLY's and FINISH's `x`) exactly one more: anything else is
# refused before it reaches the AEAD, which raises ValueError (not
# CryptoError) for input shorter than its tag.
_PAYLOAD_BYTES = len(pack({"k": bytes(_KEY_BYTES), "s": bytes(_SIG_BYTES)}))
_IDENTITY_CIPHERTEXT_BYTES = _PAYLOAD_BYTES + TAG_BYTES

_NONCE = bytes(24)  # each handshake key encrypts exactly one message
_PERSON_TRANSCRIPT = b"clanagent hs v1 "
_PERSON_KDF = b"clanagent kdf v1"
_PERSON_CLAN_TAG = b"clanagent clan  "
_SIG_LABEL = {
    "initiator": b"clanagent initiator sig v1\0",
    "responder": b"clanagent responder sig v1\0",
}


class Role(enum.Enum):
    INITIATOR = "initiator"
    RESPONDER = "responder"


class State(enum.Enum):
    START = "start"
    WAIT_REPLY = "wait_reply"  # initiator sent HELLO
    WAIT_FINISH = "wait_finish"  # responder sent REPLY
    WAIT_CONFIRM = "wait_confirm"  # initiator sent FINISH
    DONE = "done"
    ERROR = "error"


class MsgType(enum.IntEnum):
    """Handshake message types on the wire.  Only append to this list."""

    HELLO = 1
    REPLY = 2
    FINISH = 3
    CONFIRM = 4


class Input(enum.Enum):
    """What can happen to a handshake: one local call, or a received message."""

    SEND_HELLO = "send_hello"
    RECV_HELLO = "recv_hello"
    RECV_REPLY = "recv_reply"
    RECV_FINISH = "recv_finish"
    RECV_CONFIRM = "recv_confirm"


_RECV_INPUT = {
    MsgType.HELLO: Input.RECV_HELLO,
    MsgType.REPLY: Input.RECV_REPLY,
    MsgType.FINISH: Input.RECV_FINISH,
    MsgType.CONFIRM: Input.RECV_CONFIRM,
}

# ---------------------------------------------------------------------------
# THE TRANSITION TABLE.  Every legal move of a handshake is one row here and
# nowhere else: (role, state, input) -> next state.  Anything not in the table
# is out of order: a local call raises LocalProtocolError; a received message
# raises RemoteProtocolError and moves to State.ERROR, which has no rows, so
# it is sticky.  The handlers below only do the crypto for a row that exists.
# ---------------------------------------------------------------------------
_I, _R = Role.INITIATOR, Role.RESPONDER
TRANSITIONS: Mapping[tuple[Role, State, Input], State] = {
    (_I, State.START, Input.SEND_HELLO): State.WAIT_REPLY,
    (_I, State.WAIT_REPLY, Input.RECV_REPLY): State.WAIT_CONFIRM,  # answers FINISH
    (_I, State.WAIT_CONFIRM, Input.RECV_CONFIRM): State.DONE,
    (_R, State.START, Input.RECV_HELLO): State.WAIT_FINISH,  # answers REPLY
    (_R, State.WAIT_FINISH, Input.RECV_FINISH): State.DONE,  # answers CONFIRM
}


class SigningIdentity(Protocol):
    """What the handshake needs of `clanagent.identity.Identity`."""

    @property
    def public_key(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def clan_tag(clan_id: bytes) -> bytes:
    """The short, one-way tag of a clan id that HELLO carries."""
    return hashlib.blake2b(clan_id, digest_size=CLAN_TAG_BYTES, person=_PERSON_CLAN_TAG).digest()


def _kdf(secret: bytes, label: bytes, transcript: bytes) -> bytes:
    # BLAKE2b keyed with the DH secret is a PRF; the label makes each key of
    # the schedule independent, the transcript binds it to this session.
    h = hashlib.blake2b(key=secret, digest_size=32, person=_PERSON_KDF)
    h.update(len(label).to_bytes(1, "big") + label)
    h.update(transcript)
    return h.digest()


class _Transcript:
    """A running hash of everything both sides agreed on, in order."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=32, person=_PERSON_TRANSCRIPT)

    def mix(self, label: bytes, data: bytes) -> None:
        # Length-prefixed so no two different sequences hash the same.
        self._h.update(len(label).to_bytes(1, "big") + label)
        self._h.update(len(data).to_bytes(4, "big") + data)

    def digest(self) -> bytes:
        return self._h.copy().digest()


def _is_bin(value: Any, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def _is_uint16(value: Any) -> bool:
    # bool is an int subclass, but msgpack true is not a version.
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF


def _is_version_range(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and _is_uint16(value[0])
        and _is_uint16(value[1])
        and value[0] <= value[1]
    )


def _bin(size: int) -> Callable[[Any], bool]:
    return lambda value: _is_bin(value, size)


# The schema of every message: its exact set of fields and the check of each
# one's type and size, all applied at decode, before any handler acts.  What
# a field's value *means* (a common version, our clan tag, a point of large
# order, a valid ciphertext) is checked by the handler.
_SCHEMAS: Mapping[MsgType, Mapping[str, Callable[[Any], bool]]] = {
    MsgType.HELLO: {
        "t": _is_uint16,
        "v": _is_version_range,
        "c": _bin(CLAN_TAG_BYTES),
        "e": _bin(_KEY_BYTES),
    },
    MsgType.REPLY: {
        "t": _is_uint16,
        "v": _is_uint16,
        "e": _bin(_KEY_BYTES),
        "x": _bin(_IDENTITY_CIPHERTEXT_BYTES),
    },
    MsgType.FINISH: {"t": _is_uint16, "x": _bin(_IDENTITY_CIPHERTEXT_BYTES)},
    MsgType.CONFIRM: {"t": _is_uint16, "m": _bin(_MAC_BYTES)},
}


class Handshake:
    """One side of one handshake.

    The initiator calls `start()` and sends the bytes; then both sides feed
    each received message to `receive()` and send whatever bytes it returns
    (None means nothing to send).  When `state` is DONE, `cipher`,
    `peer_public_key` and `peer_node_id` are ready.

    `admit(public_key)` decides whether a verified peer key may join; it is
    called only after the peer proved it holds the key.
    """

    def __init__(
        self,
        role: Role,
        identity: SigningIdentity,
        clan_id: bytes,
        admit: Callable[[bytes], bool],
        rng: Callable[[int], bytes] = os.urandom,
        *,
        versions: tuple[int, int] = (PROTOCOL_MIN, PROTOCOL_MAX),
    ) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError("role must be a Role")
        if not isinstance(clan_id, bytes) or not clan_id:
            raise LocalProtocolError("clan_id must be non-empty bytes")
        lo, hi = versions
        if not (_is_uint16(lo) and _is_uint16(hi) and lo <= hi):
            raise LocalProtocolError("versions must be (min, max) with 0 <= min <= max <= 65535")
        public_key = bytes(identity.public_key)
        if len(public_key) != _KEY_BYTES:
            raise LocalProtocolError("identity public key must be 32 bytes")
        self.role = role
        self._identity = identity
        self._public_key = public_key
        self._clan_tag = clan_tag(clan_id)
        self._admit = admit
        self._versions = (lo, hi)
        self._state = State.START
        self._error: str | None = None
        self._transcript = _Transcript()
        self._transcript.mix(b"clan", clan_id)

        self._eph_secret: bytes | None = rng(32)
        if not isinstance(self._eph_secret, bytes) or len(self._eph_secret) != 32:
            raise LocalProtocolError("rng must return 32 bytes")
        self.ephemeral_public_key: bytes = crypto_scalarmult_base(self._eph_secret)

        self._dh: bytes | None = None
        self._k_hs_i2r: bytes | None = None
        self._k_hs_r2i: bytes | None = None
        self._expected_mac: bytes | None = None
        self._cipher: SessionCipher | None = None
        self.version: int | None = None
        # Set once the peer has proved it holds this key (even if it is then
        # refused), so the shell can log who was refused without the key
        # ever being part of an error reason.
        self.peer_public_key: bytes | None = None

    # -- public surface ----------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def done(self) -> bool:
        return self._state is State.DONE

    @property
    def error(self) -> str | None:
        """The reason of the remote error that ended this handshake, if any."""
        return self._error

    @property
    def peer_node_id(self) -> str | None:
        if self.peer_public_key is None:
            return None
        return node_id_of(self.peer_public_key)

    @property
    def cipher(self) -> SessionCipher:
        if self._cipher is None or self._state is not State.DONE:
            raise LocalProtocolError(f"no session cipher in state {self._state.name}")
        return self._cipher

    def start(self) -> bytes:
        """Initiator only: return HELLO, the first message to send."""
        next_state = self._local_transition(Input.SEND_HELLO)
        lo, hi = self._versions
        msg = pack(
            {
                "t": int(MsgType.HELLO),
                "v": [lo, hi],
                "c": self._clan_tag,
                "e": self.ephemeral_public_key,
            }
        )
        self._transcript.mix(b"hello", msg)
        self._state = next_state
        return msg

    def receive(self, data: bytes) -> bytes | None:
        """Process one whole received handshake message.

        Returns the bytes to send back, or None.  Raises RemoteProtocolError
        (and enters the sticky ERROR state) on anything unacceptable.

        This is also the last-resort boundary for the peer's bytes: any
        exception that is not one of ours (a library refusing an input we
        failed to check, a bug, a raising `admit`) fails this handshake like
        any bad message, with the original as `__cause__` for the shell's
        log, so a caller only ever sees handshake failures.
        """
        try:
            return self._receive(data)
        except GossipError:
            raise
        except Exception as exc:
            # Only the type in the reason: the reason travels in clear to the
            # peer, and a library's message could hold anything.
            reason = f"handshake message could not be processed ({type(exc).__name__})"
            try:
                self._fail(reason)
            except RemoteProtocolError as err:
                raise err from exc

    def _receive(self, data: bytes) -> bytes | None:
        if self._state is State.ERROR:
            raise RemoteProtocolError(f"handshake already failed: {self._error}")
        if self._state is State.DONE:
            raise LocalProtocolError("handshake is done; frames belong to the session cipher")
        if self.role is Role.INITIATOR and self._state is State.START:
            raise LocalProtocolError("the initiator must call start() before receive()")
        msg, raw = self._decode(data)
        msg_type = MsgType(msg["t"])
        key = (self.role, self._state, _RECV_INPUT[msg_type])
        if key not in TRANSITIONS:
            self._fail(f"unexpected {msg_type.name} message in state {self._state.name}")
        # Every handler reports a bad message through _fail, which enters
        # ERROR before raising; so does _decode above.
        if msg_type is MsgType.HELLO:
            reply = self._on_hello(msg, raw)
        elif msg_type is MsgType.REPLY:
            reply = self._on_reply(msg)
        elif msg_type is MsgType.FINISH:
            reply = self._on_finish(msg)
        else:
            reply = self._on_confirm(msg)
        self._state = TRANSITIONS[key]
        if self._state is State.DONE:
            self._forget_secrets()
        return reply

    # -- state machine helpers ---------------------------------------------

    def _local_transition(self, event: Input) -> State:
        key = (self.role, self._state, event)
        if key not in TRANSITIONS:
            raise LocalProtocolError(
                f"{self.role.value} cannot {event.value} in state {self._state.name}"
            )
        return TRANSITIONS[key]

    def _fail(self, reason: str) -> NoReturn:
        self._state = State.ERROR
        self._error = reason
        self._forget_secrets()
        self._cipher = None
        raise RemoteProtocolError(reason)

    def _forget_secrets(self) -> None:
        self._eph_secret = None
        self._dh = self._k_hs_i2r = self._k_hs_r2i = self._expected_mac = None

    # -- decoding ------------------------------------------------------------

    def _decode(self, data: bytes) -> tuple[dict[str, Any], bytes]:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError("handshake data must be bytes")
        raw = bytes(data)
        try:
            msg = unpack(raw, HANDSHAKE_LIMITS)
        except WireError as exc:
            self._fail(f"malformed handshake message: {exc.reason}")
        if not isinstance(msg, dict):
            self._fail("handshake message is not a map")
        t = msg.get("t")
        if not _is_uint16(t) or t not in MsgType._value2member_map_:
            self._fail("unknown handshake message type")
        msg_type = MsgType(t)
        schema = _SCHEMAS[msg_type]
        if set(msg) != set(schema):
            self._fail(f"{msg_type.name} message has wrong fields")
        for field, check in schema.items():
            if not check(msg[field]):
                self._fail(f"{msg_type.name} message has a malformed '{field}' field")
        # Canonical encoding only: one value, one byte string, so nothing in a
        # message can be changed without changing what both sides hash.
        if pack(msg) != raw:
            self._fail("handshake message is not canonically encoded")
        return msg, raw

    def _decode_identity(self, key: bytes, ciphertext: bytes, aad: bytes) -> tuple[bytes, bytes]:
        if len(ciphertext) != _IDENTITY_CIPHERTEXT_BYTES:  # the schema checked it already
            self._fail("handshake ciphertext has the wrong length")
        try:
            plaintext = crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, _NONCE, key)
        except (CryptoError, ValueError, TypeError):
            self._fail("handshake message failed authentication")
        try:
            payload = unpack(plaintext, _PAYLOAD_LIMITS)
        except WireError as exc:
            self._fail(f"malformed identity payload: {exc.reason}")
        if (
            not isinstance(payload, dict)
            or set(payload) != {"k", "s"}
            or not _is_bin(payload["k"], _KEY_BYTES)
            or not _is_bin(payload["s"], _SIG_BYTES)
        ):
            self._fail("malformed identity payload")
        static = payload["k"]
        if static == self._public_key:
            # Dialling ourselves (or a reflection): never a useful session.
            self._fail("peer presents our own node key")
        return static, payload["s"]

    def _verify_and_admit(self, static: bytes, sig: bytes, label: bytes) -> None:
        try:
            VerifyKey(static).verify(label + self._transcript.digest(), sig)
        except (CryptoError, ValueError, TypeError):
            self._fail("peer signature is invalid")
        self.peer_public_key = static
        if not self._admit(static):
            self._fail("peer key is not admitted")

    def _sign(self, label: bytes) -> bytes:
        sig = bytes(self._identity.sign(label + self._transcript.digest()))
        if len(sig) != _SIG_BYTES:
            raise LocalProtocolError("identity.sign must return a 64-byte signature")
        return sig

    def _do_dh(self, peer_eph: bytes) -> None:
        assert self._eph_secret is not None
        try:
            self._dh = crypto_scalarmult(self._eph_secret, peer_eph)
        except CryptoError:
            # libsodium refuses an all-zero result: a low-order point, which
            # would make the "shared" secret public.
            self._fail("peer ephemeral key is a low-order point")
        finally:
            # The DH was the secret's only use: dropping it now is what gives
            # forward secrecy (Python cannot wipe memory, but nothing keeps a
            # reference after this).
            self._eph_secret = None
        th2 = self._transcript.digest()
        self._k_hs_r2i = _kdf(self._dh, b"handshake r->i", th2)
        self._k_hs_i2r = _kdf(self._dh, b"handshake i->r", th2)

    def _finish_keys(self) -> bytes:
        """Derive the session cipher from the full transcript; return the
        confirmation MAC both sides expect."""
        assert self._dh is not None
        th = self._transcript.digest()
        i2r = _kdf(self._dh, b"session i->r", th)
        r2i = _kdf(self._dh, b"session r->i", th)
        k_confirm = _kdf(self._dh, b"confirm r->i", th)
        if self.role is Role.INITIATOR:
            self._cipher = SessionCipher(i2r, r2i)
        else:
            self._cipher = SessionCipher(r2i, i2r)
        return hashlib.blake2b(th, key=k_confirm, digest_size=_MAC_BYTES).digest()

    # -- the four messages -------------------------------------------------

    # Each handler gets a message whose fields `_decode` checked against
    # `_SCHEMAS`; it checks what the values mean, and acts.

    def _on_hello(self, msg: dict[str, Any], raw: bytes) -> bytes:
        v = msg["v"]
        lo, hi = self._versions
        version = min(v[1], hi)
        if version < max(v[0], lo):
            self._fail(
                f"no common protocol version (peer speaks {v[0]}..{v[1]}, we speak {lo}..{hi})"
            )
        if not hmac.compare_digest(msg["c"], self._clan_tag):
            self._fail("peer belongs to another clan")
        self.version = version
        self._transcript.mix(b"hello", raw)
        self._transcript.mix(b"version", version.to_bytes(2, "big"))
        self._transcript.mix(b"eph r", self.ephemeral_public_key)
        self._do_dh(msg["e"])
        assert self._k_hs_r2i is not None
        aad = self._transcript.digest()
        self._transcript.mix(b"key r", self._public_key)
        sig = self._sign(_SIG_LABEL["responder"])
        self._transcript.mix(b"sig r", sig)
        payload = pack({"k": self._public_key, "s": sig})
        x = crypto_aead_xchacha20poly1305_ietf_encrypt(payload, aad, _NONCE, self._k_hs_r2i)
        return pack({"t": int(MsgType.REPLY), "v": version, "e": self.ephemeral_public_key, "x": x})

    def _on_reply(self, msg: dict[str, Any]) -> bytes:
        version, eph_r, x = msg["v"], msg["e"], msg["x"]
        lo, hi = self._versions
        if not lo <= version <= hi:
            self._fail(f"peer chose protocol version {version}, we speak {lo}..{hi}")
        self.version = version
        self._transcript.mix(b"version", version.to_bytes(2, "big"))
        self._transcript.mix(b"eph r", eph_r)
        self._do_dh(eph_r)
        assert self._k_hs_r2i is not None and self._k_hs_i2r is not None
        static_r, sig_r = self._decode_identity(self._k_hs_r2i, x, self._transcript.digest())
        self._transcript.mix(b"key r", static_r)
        self._verify_and_admit(static_r, sig_r, _SIG_LABEL["responder"])
        self._transcript.mix(b"sig r", sig_r)

        aad = self._transcript.digest()
        self._transcript.mix(b"key i", self._public_key)
        sig = self._sign(_SIG_LABEL["initiator"])
        self._transcript.mix(b"sig i", sig)
        payload = pack({"k": self._public_key, "s": sig})
        x3 = crypto_aead_xchacha20poly1305_ietf_encrypt(payload, aad, _NONCE, self._k_hs_i2r)
        self._expected_mac = self._finish_keys()
        return pack({"t": int(MsgType.FINISH), "x": x3})

    def _on_finish(self, msg: dict[str, Any]) -> bytes:
        assert self._k_hs_i2r is not None
        static_i, sig_i = self._decode_identity(self._k_hs_i2r, msg["x"], self._transcript.digest())
        self._transcript.mix(b"key i", static_i)
        self._verify_and_admit(static_i, sig_i, _SIG_LABEL["initiator"])
        self._transcript.mix(b"sig i", sig_i)
        mac = self._finish_keys()
        return pack({"t": int(MsgType.CONFIRM), "m": mac})

    def _on_confirm(self, msg: dict[str, Any]) -> None:
        if self._expected_mac is None or not hmac.compare_digest(msg["m"], self._expected_mac):
            self._fail("key confirmation failed")
        return None
