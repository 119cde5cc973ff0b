"""QMP framing and the command/reply/event rules, sans-IO.

Owns: QMP's newline-delimited JSON, the greeting -> capabilities -> command
sequence, matching replies to commands by id, and setting events aside.
Must never: import trio or do any I/O; qmp.py (the trio client) moves its bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clanagent.vmhost.spec import VmHostLocalError, VmHostRemoteError

# QMP replies we ask for are small; query-* on a microvm stays far below this.
# A longer line means a broken or hostile peer, not a big answer.
MAX_LINE = 1 << 20


class QmpProtocolError(VmHostRemoteError):
    """QEMU sent something that is not QMP (bad JSON, overlong line, no greeting)."""


class QmpDisconnected(VmHostRemoteError):
    """The QMP socket closed or could not be reached."""


class QmpCommandError(VmHostRemoteError):
    """A command got an `error` reply."""

    def __init__(self, command: str, klass: str, desc: str) -> None:
        self.command, self.klass, self.desc = command, klass, desc
        super().__init__(f"{command}: {klass}: {desc}")


class QmpMisuse(VmHostLocalError):
    """The protocol object was driven out of order."""


@dataclass(frozen=True)
class QmpEvent:
    name: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class QmpReply:
    id: Any
    ok: bool
    value: Any  # the `return` value, or the `error` object when not ok


class QmpProtocol:
    """Sans-IO QMP: feed bytes with receive_data(), pull messages with next_message().

    States: "greeting" (waiting for the banner) -> "ready".  The capabilities
    negotiation is just the first command; the caller sends it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._next_id = 0
        self.state = "greeting"
        self.greeting: Mapping[str, Any] | None = None

    def receive_data(self, data: bytes) -> None:
        self._buf += data
        # the unterminated tail is the line still coming in
        if len(self._buf) - (self._buf.rfind(b"\n") + 1) > MAX_LINE:
            raise QmpProtocolError(f"QMP line longer than {MAX_LINE} bytes")

    def next_message(self) -> QmpEvent | QmpReply | None:
        """The next complete message, or None when more bytes are needed."""
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return None
            line = bytes(self._buf[:nl]).strip()
            del self._buf[: nl + 1]
            if not line:
                continue
            if len(line) > MAX_LINE:
                raise QmpProtocolError(f"QMP line longer than {MAX_LINE} bytes")
            try:
                msg = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                raise QmpProtocolError(f"QMP sent bad JSON: {line[:80]!r}") from None
            if not isinstance(msg, dict):
                raise QmpProtocolError("QMP message is not an object")
            if self.state == "greeting":
                if "QMP" not in msg:
                    raise QmpProtocolError("first QMP message is not a greeting")
                self.greeting = msg["QMP"]
                self.state = "ready"
                continue
            if "event" in msg:
                data = msg.get("data")
                return QmpEvent(str(msg["event"]), data if isinstance(data, dict) else {})
            if "return" in msg:
                return QmpReply(msg.get("id"), True, msg["return"])
            if "error" in msg:
                return QmpReply(msg.get("id"), False, msg["error"])
            raise QmpProtocolError(f"unknown QMP message keys {sorted(msg)[:5]}")

    def send_command(
        self, command: str, arguments: Mapping[str, Any] | None = None
    ) -> tuple[int, bytes]:
        """Encode a command with a fresh id; returns (id, bytes to send)."""
        if self.state != "ready":
            raise QmpMisuse("QMP command before the greeting")
        self._next_id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            msg["arguments"] = dict(arguments)
        return self._next_id, json.dumps(msg).encode() + b"\n"


__all__ = [
    "MAX_LINE",
    "QmpProtocolError",
    "QmpDisconnected",
    "QmpCommandError",
    "QmpMisuse",
    "QmpEvent",
    "QmpReply",
    "QmpProtocol",
]
