"""The wireguard-go backend: a child process we own, configured over its UAPI socket.

Owns: encoding a `Diff` as a UAPI `set=1` request and parsing a `get=1`
reply into a `Device` (the pure half, `encode_set` / `parse_get`), and the
I/O half `UserspaceBackend`: spawning `wireguard-go -f IFNAME` (optionally
inside a network namespace), waiting for /var/run/wireguard/IFNAME.sock,
talking to it, and stopping the process on `destroy`.

Must never: touch an interface or socket that was there before `create`
(refuse with `WireGuardLocalError`), kill a process it did not start, or
accept a UAPI reply it cannot fully parse (that is a `UapiError`).

Wire format (the cross-platform UAPI, https://www.wireguard.com/xplatform/):
"key=value\\n" lines ending with an empty line; keys are lowercase hex, not
base64; every reply ends with "errno=N". A `get` reply lists interface keys
first, then each peer starts with its `public_key=` line. Keys this module
does not know are ignored so a newer wireguard-go does not break us; a known
key with a bad value, a line without "=", a peer key before any
`public_key`, or a missing errno are errors.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import ipaddress
import logging
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from .wireguard import (
    KEY_LEN,
    BackendKind,
    Device,
    Diff,
    PeerConfig,
    PeerStatus,
    WireGuardLocalError,
    WireGuardRemoteError,
    normalize_endpoint,
)

__all__ = [
    "UapiError",
    "SOCKET_DIR",
    "MAX_REPLY",
    "encode_set",
    "encode_get",
    "parse_get",
    "parse_errno",
    "uapi_request",
    "UapiClient",
    "UserspaceBackend",
]

log = logging.getLogger(__name__)

SOCKET_DIR = Path("/var/run/wireguard")
# A get reply is ~250 bytes per peer; 16 MiB is far beyond any clan and still
# bounds what a misbehaving daemon can make us buffer.
MAX_REPLY = 16 * 1024 * 1024
# The recipe measured 5-9 ms from spawn to socket; a loaded CI box gets 100x.
SOCKET_WAIT = 5.0
STOP_WAIT = 3.0


class UapiError(WireGuardRemoteError):
    """wireguard-go answered with errno != 0 or with a malformed reply."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# --- pure half: encode / parse -------------------------------------------------


def encode_get() -> bytes:
    return b"get=1\n\n"


def _peer_lines(
    endpoint: str | None,
    allowed_ips: tuple[str, ...] | None,
    keepalive: int | None,
) -> list[str]:
    lines = []
    if endpoint is not None:
        lines.append(f"endpoint={endpoint}")
    if keepalive is not None:
        lines.append(f"persistent_keepalive_interval={keepalive}")
    if allowed_ips is not None:
        # replace semantics: the desired set is the whole truth for the peer.
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={c}" for c in allowed_ips)
    return lines


def encode_set(diff: Diff) -> bytes:
    """The `set=1` request that applies `diff` (removals, adds, updates)."""
    lines = ["set=1"]
    if diff.private_key is not None:
        lines.append(f"private_key={diff.private_key.hex()}")
    if diff.listen_port is not None:
        lines.append(f"listen_port={diff.listen_port}")
    for key in diff.remove:
        lines += [f"public_key={key.hex()}", "remove=true"]
    for p in diff.add:
        lines.append(f"public_key={p.public_key.hex()}")
        lines += _peer_lines(p.endpoint, p.allowed_ips, p.keepalive)
    for u in diff.update:
        # update_only: if the peer vanished meanwhile, do not re-create a
        # half-configured one; the next reconcile adds it whole.
        lines += [f"public_key={u.public_key.hex()}", "update_only=true"]
        lines += _peer_lines(u.endpoint, u.allowed_ips, u.keepalive)
    return ("\n".join(lines) + "\n\n").encode()


def _split_lines(reply: bytes) -> list[tuple[str, str]]:
    try:
        text = reply.decode("ascii")
    except UnicodeDecodeError:
        raise UapiError("UAPI reply is not ASCII") from None
    if not text.endswith("\n\n"):
        raise UapiError("UAPI reply is truncated (no blank line at the end)")
    out = []
    for line in text[:-2].split("\n"):
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UapiError(f"UAPI reply: malformed line {line[:80]!r}")
        out.append((key, value))
    return out


def _errno_of(pairs: list[tuple[str, str]]) -> int:
    if not pairs or pairs[-1][0] != "errno":
        raise UapiError("UAPI reply has no errno line at the end")
    return _int(pairs[-1][1], "errno", 0, 2**31 - 1)


def parse_errno(reply: bytes) -> None:
    """Check a `set` reply: exactly "errno=N"; N != 0 raises UapiError."""
    pairs = _split_lines(reply)
    if len(pairs) != 1:
        raise UapiError("UAPI set reply: expected only an errno line")
    code = _errno_of(pairs)
    if code != 0:
        raise UapiError(f"UAPI set failed: errno={code} ({_strerror(code)})", code)


def _strerror(code: int) -> str:
    return errno_mod.errorcode.get(code, "unknown")


def _int(value: str, what: str, lo: int, hi: int) -> int:
    if not value.isdigit() or len(value) > 20:
        raise UapiError(f"UAPI reply: {what}={value[:40]!r} is not a number")
    n = int(value)
    if not lo <= n <= hi:
        raise UapiError(f"UAPI reply: {what}={n} out of range")
    return n


def _key(value: str, what: str) -> bytes:
    if len(value) != 2 * KEY_LEN:
        raise UapiError(f"UAPI reply: {what} is not {KEY_LEN} hex bytes")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise UapiError(f"UAPI reply: {what} is not hex") from None


class _PeerAcc:
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.endpoint: str | None = None
        self.allowed: list[str] = []
        self.keepalive = 0
        self.hs_sec = 0
        self.hs_nsec = 0
        self.rx = 0
        self.tx = 0


_U64 = 2**64 - 1


def parse_get(reply: bytes) -> Device:
    """Parse a complete `get=1` reply into a Device; UapiError if malformed."""
    pairs = _split_lines(reply)
    code = _errno_of(pairs)
    if code != 0:
        raise UapiError(f"UAPI get failed: errno={code} ({_strerror(code)})", code)
    private_key: bytes | None = None
    listen_port = 0
    peers: dict[bytes, _PeerAcc] = {}
    cur: _PeerAcc | None = None
    for key, value in pairs[:-1]:
        if key == "public_key":
            k = _key(value, "public_key")
            if k in peers:
                raise UapiError("UAPI reply: a peer is listed twice")
            cur = peers[k] = _PeerAcc(k)
        elif cur is None:
            if key == "private_key":
                private_key = _key(value, "private_key")
            elif key == "listen_port":
                listen_port = _int(value, "listen_port", 0, 65535)
            elif key == "fwmark":
                _int(value, "fwmark", 0, 2**32 - 1)
            elif key in _PEER_KEYS:
                raise UapiError(f"UAPI reply: peer key {key!r} before any public_key")
            # else: an interface key we do not know; ignored (see docstring).
        elif key == "endpoint":
            try:
                cur.endpoint = normalize_endpoint(value)
            except WireGuardLocalError as e:
                raise UapiError(f"UAPI reply: {e}") from None
        elif key == "allowed_ip":
            try:
                cur.allowed.append(str(ipaddress.ip_network(value, strict=False)))
            except ValueError:
                raise UapiError(f"UAPI reply: allowed_ip {value[:60]!r} is not a CIDR") from None
        elif key == "persistent_keepalive_interval":
            cur.keepalive = _int(value, key, 0, 65535)
        elif key == "last_handshake_time_sec":
            cur.hs_sec = _int(value, key, 0, _U64)
        elif key == "last_handshake_time_nsec":
            cur.hs_nsec = _int(value, key, 0, 999_999_999)
        elif key == "rx_bytes":
            cur.rx = _int(value, key, 0, _U64)
        elif key == "tx_bytes":
            cur.tx = _int(value, key, 0, _U64)
        elif key == "preshared_key":
            _key(value, key)
        elif key == "protocol_version":
            _int(value, key, 0, 2**32 - 1)
        elif key in ("private_key", "listen_port", "fwmark"):
            raise UapiError(f"UAPI reply: interface key {key!r} inside a peer")
        # else: unknown peer key, ignored.
    return Device(
        private_key=private_key,
        listen_port=listen_port,
        peers={
            k: PeerConfig(k, a.endpoint, tuple(a.allowed), a.keepalive or None)
            for k, a in peers.items()
        },
        status={
            k: PeerStatus(a.hs_sec + a.hs_nsec / 1e9 if a.hs_sec or a.hs_nsec else None, a.rx, a.tx)
            for k, a in peers.items()
        },
    )


_PEER_KEYS = frozenset(
    {
        "endpoint",
        "allowed_ip",
        "persistent_keepalive_interval",
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "rx_bytes",
        "tx_bytes",
        "preshared_key",
        "protocol_version",
    }
)


# --- I/O half ------------------------------------------------------------------


async def uapi_request(path: Path, request: bytes) -> bytes:
    """Send one request on a fresh connection and read the reply up to its
    blank line. wireguard-go serves one request per connection."""
    try:
        stream = await trio.open_unix_socket(os.fspath(path))
    except OSError as e:
        raise WireGuardLocalError(f"cannot connect to UAPI socket {path}: {e}") from None
    async with stream:
        try:
            await stream.send_all(request)
            buf = bytearray()
            while not buf.endswith(b"\n\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise UapiError(f"UAPI reply larger than {MAX_REPLY} bytes")
        except (OSError, trio.BrokenResourceError) as e:
            raise UapiError(f"UAPI socket {path}: {e}") from None
    return bytes(buf)


class UapiClient:
    """Requests to one UAPI socket (wireguard-go, or anything speaking it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    async def get(self) -> Device:
        return parse_get(await uapi_request(self.path, encode_get()))

    async def set(self, diff: Diff) -> None:
        if diff.empty:
            return
        parse_errno(await uapi_request(self.path, encode_set(diff)))


class UserspaceBackend:
    """A wireguard-go interface that this object creates, owns and destroys.

    `netns` names a network namespace (as in /run/netns) to run wireguard-go
    in; the UAPI socket directory is not per-namespace, so interface names
    must be unique across namespaces. `link_exists` is an async callable
    (ifname) -> bool used to refuse a pre-existing interface; by default it
    asks netlink (pyroute2) in `netns`."""

    kind: BackendKind = "userspace"

    def __init__(
        self,
        name: str,
        *,
        netns: str | None = None,
        binary: str = "wireguard-go",
        socket_dir: Path = SOCKET_DIR,
        link_exists: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        if not name or len(name) > 15 or "/" in name or name in (".", ".."):
            raise WireGuardLocalError(f"interface name {name!r}: 1-15 chars, no '/'")
        self.name = name
        self.netns = netns
        self.binary = binary
        self.socket_path = Path(socket_dir) / f"{name}.sock"
        self._link_exists = link_exists
        self._proc: trio.Process | None = None

    @property
    def owned(self) -> bool:
        """True while we hold the wireguard-go process that made the interface."""
        return self._proc is not None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def _exists(self) -> bool:
        if self._link_exists is not None:
            return bool(await self._link_exists(self.name))
        from . import netlink

        return await netlink.link_index(self.name, netns=self.netns) is not None

    def _argv(self, exe: str) -> list[str]:
        argv = [exe, "-f", self.name]
        if self.netns is not None:
            # wireguard-go creates its TUN in the namespace it runs in; `ip netns
            # exec` is the plain way to start a process there (it execs, so the
            # pid we hold is wireguard-go itself).
            ip = shutil.which("ip")
            if ip is None:
                raise WireGuardLocalError("running wireguard-go in a netns needs `ip` on PATH")
            argv = [ip, "netns", "exec", self.netns, *argv]
        return argv

    async def create(self) -> None:
        if self._proc is not None:
            raise WireGuardLocalError(f"{self.name}: already created by this backend")
        exe = shutil.which(self.binary)
        if exe is None:
            raise WireGuardLocalError(f"{self.binary} not found on PATH (apt install wireguard-go)")
        if self.socket_path.exists() or await self._exists():
            raise WireGuardLocalError(
                f"{self.name}: an interface or UAPI socket of that name exists already; "
                "refusing to touch an interface we did not create"
            )
        env = dict(os.environ)
        env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
        proc = await trio.lowlevel.open_process(
            self._argv(exe),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._proc = proc
        try:
            with trio.fail_after(SOCKET_WAIT):
                while not self.socket_path.exists():
                    if proc.poll() is not None:
                        raise WireGuardLocalError(
                            f"wireguard-go for {self.name} exited with {proc.returncode} "
                            "before its UAPI socket appeared"
                        )
                    await trio.sleep(0.002)
        except BaseException as e:
            await self._stop()
            if isinstance(e, trio.TooSlowError):
                raise WireGuardLocalError(
                    f"wireguard-go for {self.name}: no UAPI socket after {SOCKET_WAIT}s"
                ) from None
            raise

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(STOP_WAIT):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            # wireguard-go removes its socket on a clean exit, not on SIGKILL.
            with contextlib.suppress(OSError):
                self.socket_path.unlink()

    async def destroy(self) -> None:
        if self._proc is None:
            raise WireGuardLocalError(
                f"{self.name}: not created by this backend; refusing to destroy it"
            )
        await self._stop()

    def _check_owned(self) -> None:
        if self._proc is None:
            raise WireGuardLocalError(f"{self.name}: not created by this backend")
        if self._proc.poll() is not None:
            raise WireGuardLocalError(
                f"wireguard-go for {self.name} exited with {self._proc.returncode}"
            )

    async def get(self) -> Device:
        self._check_owned()
        return await UapiClient(self.socket_path).get()

    async def apply(self, diff: Diff) -> None:
        self._check_owned()
        await UapiClient(self.socket_path).set(diff)
