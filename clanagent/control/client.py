"""A small blocking client of the control socket, for clanctl and tests.

Owns: connecting, one request at a time, and reading replies or a stream.
Must never: hang forever on a dead agent (every call has a timeout), or hide
an error reply (it raises `ClientError` with the agent's code and message).
"""

from __future__ import annotations

import errno
import itertools
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..wire import Limits, WireError, unpack
from .protocol import API_VERSION, HEADER, encode_frame

__all__ = ["ControlClient", "ClientError", "AgentNotRunning"]

MAX_REPLY = 64 << 20


class ClientError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AgentNotRunning(ClientError):
    def __init__(self, path: Path, detail: str, *, message: str = "") -> None:
        super().__init__(
            "not_running",
            message
            or f"clanagent is not running ({detail} at {path}): start it with "
            "'systemctl start clanagent' or 'clanagent run'",
        )
        self.path = path


def _not_a_socket(path: Path) -> str:
    """ "a directory" / "a regular file" / ... when `path` is there but no socket, else ""."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return ""
    if stat.S_ISSOCK(mode):
        return ""
    return (
        "a directory"
        if stat.S_ISDIR(mode)
        else "a regular file"
        if stat.S_ISREG(mode)
        else "not a socket"
    )


class ControlClient:
    def __init__(self, path: Path | str, *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._limits = Limits(max_frame=MAX_REPLY, max_array=1 << 20, max_map=1 << 16)

    def __enter__(self) -> ControlClient:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
        except FileNotFoundError:
            s.close()
            raise AgentNotRunning(self.path, "no socket") from None
        except ConnectionRefusedError:
            s.close()
            what = _not_a_socket(self.path)  # connect() says "refused" for those too
            if what:
                raise AgentNotRunning(
                    self.path,
                    what,
                    message=f"{self.path} is {what}, not the agent's control socket: "
                    "name the socket with --socket (or $CLANAGENT_SOCKET)",
                ) from None
            raise AgentNotRunning(self.path, "nobody listening on the socket") from None
        except PermissionError:
            s.close()
            raise ClientError(
                "permission_denied",
                f"permission denied opening {self.path}: run as root, as the agent's user, "
                "or as a member of the control group (control.group in agent.toml; "
                "control.read_group for read-only access)",
            ) from None
        except OSError as exc:
            s.close()
            if exc.errno == errno.ENOTSOCK:
                raise AgentNotRunning(self.path, "not a socket") from None
            raise
        self._sock = s

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_message(self, timeout: float | None) -> dict[str, Any]:
        assert self._sock is not None
        self._sock.settimeout(timeout)
        while True:
            if len(self._buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self._buf)
                if length > MAX_REPLY:
                    raise ClientError("bad_reply", f"reply of {length} bytes is too large")
                if len(self._buf) >= HEADER.size + length:
                    frame = bytes(self._buf[HEADER.size : HEADER.size + length])
                    del self._buf[: HEADER.size + length]
                    try:
                        msg = unpack(frame, self._limits)
                    except WireError as exc:
                        raise ClientError("bad_reply", f"malformed reply: {exc.reason}") from None
                    if not isinstance(msg, dict):
                        raise ClientError("bad_reply", "reply is not a map")
                    return msg
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise ClientError("timeout", "the agent did not answer in time") from None
            except ConnectionResetError:
                data = b""
            if not data:
                raise ClientError("disconnected", "the agent closed the connection")
            self._buf += data

    def _send_request(self, method: str, params: dict[str, Any] | None, version: int) -> int:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        rid = next(self._ids)
        msg = {"id": rid, "v": version, "method": method, "params": params or {}}
        try:
            self._sock.sendall(encode_frame(msg))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent may have refused us; its reply (if any) says why
        return rid

    @staticmethod
    def _raise_for(msg: dict[str, Any]) -> None:
        if msg.get("ok") is False:
            err = msg.get("error") or {}
            raise ClientError(str(err.get("code", "error")), str(err.get("message", "error")))

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, version: int = API_VERSION
    ) -> Any:
        rid = self._send_request(method, params, version)
        while True:
            msg = self._read_message(self.timeout)
            self._raise_for(msg)
            if msg.get("id") == rid and msg.get("ok") is True:
                return msg.get("result")

    def attach(
        self, method: str, params: dict[str, Any] | None = None, *, version: int = API_VERSION
    ) -> tuple[socket.socket, bytes]:
        """Make an upgrade request; on success the socket now carries raw bytes.

        Returns the socket (blocking, no timeout; the client owns it now) and
        any bytes that arrived behind the ok reply."""
        rid = self._send_request(method, params, version)
        while True:
            msg = self._read_message(self.timeout)
            self._raise_for(msg)
            if msg.get("id") == rid and msg.get("ok") is True:
                break
        assert self._sock is not None
        sock, self._sock = self._sock, None
        early, self._buf = bytes(self._buf), bytearray()
        sock.settimeout(None)
        return sock, early

    def stream(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        version: int = API_VERSION,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        rid = self._send_request(method, params, version)
        while True:
            msg = self._read_message(timeout)
            self._raise_for(msg)
            if msg.get("id") != rid:
                continue
            if msg.get("end"):
                return
            if "event" in msg:
                yield msg["event"]
