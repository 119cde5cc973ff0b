"""The frame cipher of an established peer session (sans-IO).

Owns: sealing and opening the frames of one session with XChaCha20-Poly1305,
one key per direction and an implicit per-direction counter as the nonce.
Because the nonce is never sent, a frame that was replayed, reordered,
dropped, truncated, forged or taken from another session fails
authentication; after the first failure the cipher is closed for good.

Must never: reuse a (key, nonce) pair, hand out plaintext that did not
authenticate, keep working after a failure, let a received frame raise
anything but `RemoteProtocolError`, or do any I/O.
"""

from __future__ import annotations

from typing import NoReturn

from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_ABYTES,
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
    crypto_aead_xchacha20poly1305_ietf_KEYBYTES,
    crypto_aead_xchacha20poly1305_ietf_NPUBBYTES,
)
from nacl.exceptions import CryptoError

from clanagent.gossip.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "SessionCipher",
    "KEY_BYTES",
    "TAG_BYTES",
    "DEFAULT_MAX_PLAINTEXT",
    "COUNTER_LIMIT",
]

KEY_BYTES = crypto_aead_xchacha20poly1305_ietf_KEYBYTES
TAG_BYTES = crypto_aead_xchacha20poly1305_ietf_ABYTES
_NONCE_BYTES = crypto_aead_xchacha20poly1305_ietf_NPUBBYTES

# A gossip frame carries a batch of signed records; 1 MiB matches the wire
# codec's default max_frame, so anything the codec accepts fits in a frame.
DEFAULT_MAX_PLAINTEXT = 1 << 20

# The counter is written as 8 bytes into the nonce, so 2**64 frames per
# direction; we stop one short rather than wrap, since a wrap reuses a nonce.
COUNTER_LIMIT = 1 << 64

# Binds each frame to its purpose, so a frame can never be confused with any
# other AEAD output made under a key from the same handshake.
_AAD = b"clanagent frame v1"


def _nonce(counter: int) -> bytes:
    # 16 zero bytes then the counter: XChaCha's extended nonce is not needed
    # for uniqueness here (the key is fresh per session and direction), the
    # counter alone guarantees it.
    return bytes(_NONCE_BYTES - 8) + counter.to_bytes(8, "big")


class SessionCipher:
    """Seal outgoing and open incoming frames of one session.

    `send_key` and `recv_key` come from the handshake; the peer's cipher has
    them swapped.  Frames must be opened in the order they were sealed:
    the transport (a WebSocket) preserves order, so any gap is an attack or a
    bug, and either way the session is over.
    """

    def __init__(
        self,
        send_key: bytes,
        recv_key: bytes,
        *,
        max_plaintext: int = DEFAULT_MAX_PLAINTEXT,
        counter_limit: int = COUNTER_LIMIT,
    ) -> None:
        if len(send_key) != KEY_BYTES or len(recv_key) != KEY_BYTES:
            raise LocalProtocolError(f"session keys must be {KEY_BYTES} bytes")
        if send_key == recv_key:
            # Equal keys would let a frame be reflected back to its sender.
            raise LocalProtocolError("send and receive keys must differ")
        if not 0 < counter_limit <= COUNTER_LIMIT:
            raise LocalProtocolError(f"counter_limit must be in 1..{COUNTER_LIMIT}")
        if max_plaintext < 0:
            raise LocalProtocolError("max_plaintext must not be negative")
        self._send_key = bytes(send_key)
        self._recv_key = bytes(recv_key)
        self._send_counter = 0
        self._recv_counter = 0
        self._counter_limit = counter_limit
        self.max_plaintext = max_plaintext
        self._closed_reason: str | None = None

    @property
    def max_frame(self) -> int:
        """The largest frame `open` accepts (plaintext limit plus the tag)."""
        return self.max_plaintext + TAG_BYTES

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    def close(self) -> None:
        """Forget the keys; every later call fails."""
        if self._closed_reason is None:
            self._closed_reason = "cipher was closed"
        self._send_key = self._recv_key = b""

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt and authenticate the next outgoing frame."""
        if self._closed_reason is not None:
            raise LocalProtocolError(f"cannot seal: {self._closed_reason}")
        if not isinstance(plaintext, (bytes, bytearray, memoryview)):
            raise LocalProtocolError("plaintext must be bytes")
        if len(plaintext) > self.max_plaintext:
            raise LocalProtocolError(
                f"plaintext of {len(plaintext)} bytes exceeds limit {self.max_plaintext}"
            )
        if self._send_counter >= self._counter_limit:
            # Not sticky for the receive side, but this session can never send
            # again without reusing a nonce, so close it whole.
            self._fail("send counter exhausted; open a new session")
            raise LocalProtocolError("send counter exhausted; open a new session")
        frame = crypto_aead_xchacha20poly1305_ietf_encrypt(
            bytes(plaintext), _AAD, _nonce(self._send_counter), self._send_key
        )
        self._send_counter += 1
        return frame

    def open(self, frame: bytes) -> bytes:
        """Authenticate and decrypt the next incoming frame.

        Raises `RemoteProtocolError` (and closes the cipher for good) if the
        frame is not exactly the next one the peer sealed: of the wrong type,
        too short or too long, or failing authentication.  It is the only
        error a received frame can cause: whatever else goes wrong while
        opening one (a library refusing an input) is a bad frame too, with
        the original as `__cause__`.
        """
        if self._closed_reason is not None:
            raise RemoteProtocolError(f"cannot open: {self._closed_reason}")
        try:
            return self._open(frame)
        except RemoteProtocolError:
            raise
        except Exception as exc:
            # Only the type in the reason: it may travel in a close frame.
            reason = f"frame could not be opened ({type(exc).__name__})"
            self._fail(reason)
            raise RemoteProtocolError(reason) from exc

    def _open(self, frame: object) -> bytes:
        # A frame comes off the network, so a wrong type is the peer's fault
        # (or the transport's), never a local misuse.
        if not isinstance(frame, (bytes, bytearray, memoryview)):
            self._fail_remote("frame is not bytes")
        if len(frame) < TAG_BYTES:
            self._fail_remote("frame shorter than its authentication tag")
        if len(frame) > self.max_frame:
            self._fail_remote(f"frame of {len(frame)} bytes exceeds limit {self.max_frame}")
        if self._recv_counter >= self._counter_limit:
            self._fail_remote("receive counter exhausted")
        try:
            plaintext = crypto_aead_xchacha20poly1305_ietf_decrypt(
                bytes(frame), _AAD, _nonce(self._recv_counter), self._recv_key
            )
        except (CryptoError, ValueError, TypeError):
            # One reason for every cause (forged, replayed, reordered, other
            # session): the AEAD cannot tell them apart, and neither should we.
            self._fail_remote("frame failed authentication")
        self._recv_counter += 1
        return plaintext

    def _fail(self, reason: str) -> None:
        self._closed_reason = f"closed after an earlier error: {reason}"
        self._send_key = self._recv_key = b""

    def _fail_remote(self, reason: str) -> NoReturn:
        self._fail(reason)
        raise RemoteProtocolError(reason)
