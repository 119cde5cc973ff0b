"""Tor for the mesh: our onion service, and dialling peers' onion services.

Owns: attaching to a running tor (ControlPort or ControlSocket, cookie
authentication) or starting our own tor child (its DataDirectory under the
state dir, SocksPort and ControlPort on automatically chosen loopback
ports); publishing one ephemeral onion service for the agent's port with a
key kept in the state dir (so the address is stable across restarts);
dialling `xxxx.onion:port` through tor's SOCKS port; and saying, when any of
that is impossible, why (`available` / `reason`, shown in status).

Must never: block the trio loop (stem is synchronous: every stem call runs in
`trio.to_thread.run_sync`), replace a saved onion key it cannot use (the
address is the peer-visible identity; a new one is only ever made when no
key file exists), resolve an onion name anywhere but in tor, leave a tor it
started running after it stops, or make the agent fail: a missing tor is a
reason, not an exception, in `run`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..durable import FileRefused, atomic_write, read_file
from .socks import open_socks5_stream

if TYPE_CHECKING:
    from stem.control import Controller

__all__ = [
    "TorError",
    "TorLocalError",
    "TorRemoteError",
    "KEY_FILE",
    "KEY_TYPE",
    "load_onion_key",
    "save_onion_key",
    "publish_onion",
    "own_torrc",
    "normalize_onion",
    "TorService",
]

log = logging.getLogger(__name__)

KEY_TYPE = "ED25519-V3"
KEY_FILE = "onion_key"  # under <state_dir>/tor/
_ED25519_V3_EXPANDED_LEN = 64  # tor's expanded secret key (the base64 blob ADD_ONION returns)
_MAX_KEY_FILE = 4096
_ONION_RE = re.compile(r"^[a-z2-7]{56}$")  # a v3 service id: 35 bytes in base32
START_TIMEOUT = 60.0  # own tor: launch until its control port answers (usually < 1 s)


class TorError(Exception):
    """Base of every error from the Tor part."""


class TorLocalError(TorError):
    """Our side: no tor binary, a bad key file, a bad onion name, tor would not start."""


class TorRemoteError(TorError):
    """tor itself refused or failed (authentication, ADD_ONION, a control connection lost)."""


# ---- the onion key on disk ----


def load_onion_key(path: Path) -> tuple[str, str] | None:
    """The saved (key type, base64 key) or None when there is no key file yet.

    A key file that exists but is unusable (wrong mode/owner, garbage) is a
    TorLocalError, never "no key": silently making a new key would change our
    onion address under every peer's feet.
    """
    try:
        raw = read_file(path, max_size=_MAX_KEY_FILE, owner=os.geteuid(), private=True)
    except FileNotFoundError:
        return None
    except FileRefused as exc:
        raise TorLocalError(_refused(path, exc)) from None
    except OSError as exc:
        raise TorLocalError(f"{path}: cannot open onion key: {exc.strerror}") from None
    key_type, sep, content = raw.decode("ascii", errors="replace").strip().partition(":")
    if not sep or key_type != KEY_TYPE:
        raise TorLocalError(f"{path}: expected one line '{KEY_TYPE}:<base64>'")
    try:
        blob = base64.b64decode(content, validate=True)
    except (binascii.Error, ValueError):
        raise TorLocalError(f"{path}: onion key is not base64") from None
    if len(blob) != _ED25519_V3_EXPANDED_LEN:
        raise TorLocalError(
            f"{path}: onion key holds {len(blob)} bytes, expected {_ED25519_V3_EXPANDED_LEN}"
        )
    return key_type, content


def _refused(path: Path, exc: FileRefused) -> str:
    st = exc.st
    if exc.reason == "symlink":
        return f"{path}: cannot open onion key: it is a symlink"
    if exc.reason == "not_regular":
        return f"{path}: onion key is not a regular file"
    if exc.reason == "owner":
        assert st is not None
        return f"{path}: onion key is owned by uid {st.st_uid}, not by us"
    if exc.reason == "mode":
        assert st is not None
        return (
            f"{path}: onion key is mode {stat.S_IMODE(st.st_mode):04o}; fix: chmod 600 {path} "
            "(and consider the onion address exposed)"
        )
    return f"{path}: onion key file is too large"


def save_onion_key(path: Path, key_type: str, content: str) -> None:
    """Write the key durably (temp file 0600, fsync, rename, fsync dir)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, f"{key_type}:{content}\n".encode("ascii"), mode=0o600)


def publish_onion(controller: Controller, ports: Mapping[int, str], key_path: Path) -> str:
    """ADD_ONION with the saved key, or a new ED25519-V3 key saved first-time; the service id.

    Blocking (stem): call it in a worker thread. The service is not
    detached, so tor drops it when our control connection closes -- a
    crashed agent leaves no orphan service behind.
    """
    import stem

    saved = load_onion_key(key_path)
    key_type, content = saved if saved else ("NEW", KEY_TYPE)
    try:
        resp = controller.create_ephemeral_hidden_service(
            dict(ports), key_type=key_type, key_content=content, await_publication=False
        )
    except stem.ControllerError as exc:
        what = "the saved onion key" if saved else "a new onion key"
        raise TorRemoteError(f"tor refused ADD_ONION with {what}: {exc}") from None
    service_id = getattr(resp, "service_id", None)
    if not isinstance(service_id, str) or not _ONION_RE.match(service_id):
        raise TorRemoteError(f"ADD_ONION answered a bad service id {service_id!r}")
    if saved is None:
        if resp.private_key_type != KEY_TYPE or not resp.private_key:
            raise TorRemoteError("ADD_ONION did not return the new private key")
        save_onion_key(key_path, resp.private_key_type, resp.private_key)
    return service_id


def normalize_onion(onion: str) -> str:
    """'xxxx.onion' (lowercase) for a v3 onion name given with or without the suffix."""
    if not isinstance(onion, str):
        raise TorLocalError("onion: expected a str")
    name = onion.strip().lower().removesuffix(".onion")
    if not _ONION_RE.match(name):
        raise TorLocalError(f"{onion!r} is not a v3 onion address")
    return name + ".onion"


# ---- our own tor ----


def own_torrc(data_dir: Path, owner_pid: int, extra: Mapping[str, str | Sequence[str]]) -> str:
    """The torrc of a tor we start: loopback-only auto ports, cookie auth, owned by us."""
    lines = [
        f"DataDirectory {data_dir}",
        # "auto" lets tor pick free ports (no race with a port we probed);
        # we learn them from the file / GETINFO. Loopback only.
        "SocksPort 127.0.0.1:auto ExtendedErrors",
        "ControlPort 127.0.0.1:auto",
        f"ControlPortWriteToFile {data_dir / 'control_port'}",
        "CookieAuthentication 1",
        # tor exits when this process does, even after a kill -9 of the agent.
        f"__OwningControllerProcess {owner_pid}",
        f"Log notice file {data_dir / 'notice.log'}",
        "RunAsDaemon 0",
    ]
    for key, value in extra.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise TorLocalError(f"torrc option {key!r}: not an option name")
        values = [value] if isinstance(value, str) else list(value)
        for v in values:
            if "\n" in v or "\r" in v:
                raise TorLocalError(f"torrc option {key}: value has a line break")
            lines.append(f"{key} {v}")
    return "\n".join(lines) + "\n"


def _log_tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-n:])


class TorService:
    """One agent's use of tor: its onion service and outgoing onion dials.

    Lifecycle: `await start()` (attach or launch; never raises, sets
    `available`/`reason`), `await publish(port)`, `await dial(...)`, `await
    aclose()`. Or, in a nursery, `await nursery.start(tor.run, port)`, which
    does all of it and cleans up when cancelled.
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        control_port: int | None = None,
        control_socket: Path | str | None = None,
        tor_binary: str = "tor",
        extra_config: Mapping[str, str | Sequence[str]] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        if control_port is not None and control_socket is not None:
            raise TorLocalError("give control_port or control_socket, not both")
        self.state_dir = Path(state_dir)
        self.tor_dir = self.state_dir / "tor"
        self.key_path = self.tor_dir / KEY_FILE
        self._control_port = control_port
        self._control_socket = Path(control_socket) if control_socket is not None else None
        self._tor_binary = tor_binary
        self._extra = dict(extra_config or {})
        self._start_timeout = start_timeout
        self._controller: Controller | None = None
        self._process: trio.Process | None = None
        self._socks: tuple[str, int] | None = None
        self._service_id: str | None = None
        # Service ids whose descriptor tor reported uploaded (HS_DESC UPLOADED);
        # written by stem's event thread, read by trio (a set add is atomic).
        self._uploaded: set[str] = set()
        self._listening = False
        self._available = False
        self._reason = "not started"

    # -- status --

    @property
    def attached(self) -> bool:
        """True when we use someone else's tor (we never stop it)."""
        return self._control_port is not None or self._control_socket is not None

    @property
    def available(self) -> bool:
        return self._available

    @property
    def reason(self) -> str:
        """Why tor is unavailable, or what provides it (for status)."""
        return self._reason

    @property
    def onion_address(self) -> str | None:
        """'xxxx.onion' once published, else None."""
        return f"{self._service_id}.onion" if self._service_id else None

    @property
    def published(self) -> bool:
        """True once tor uploaded our descriptor to at least one HSDir (peers can reach us)."""
        return self._service_id is not None and self._service_id in self._uploaded

    @property
    def socks_address(self) -> tuple[str, int] | None:
        return self._socks

    def _unavailable(self, reason: str) -> bool:
        if self._available or self._reason != reason:
            log.warning("tor unavailable: %s", reason)
        self._available = False
        self._reason = reason
        return False

    # -- start / stop --

    async def start(self) -> bool:
        """Attach to or launch tor; True when usable. Never raises for a missing tor."""
        try:
            import stem  # noqa: F401
        except ImportError:
            return self._unavailable("python package stem is not installed")
        try:
            if self.attached:
                await self._attach()
                how = (
                    f"control port 127.0.0.1:{self._control_port}"
                    if self._control_port is not None
                    else f"control socket {self._control_socket}"
                )
                self._reason = f"attached to tor via {how}"
            else:
                await self._launch()
                self._reason = f"own tor ({self._tor_binary}, pid {self._process.pid})"
            self._socks = await trio.to_thread.run_sync(self._socks_listener)
            if self._socks is None:
                self._reason += "; it has no SocksPort, so we cannot dial onions"
        except TorError as exc:
            await self.aclose()
            return self._unavailable(str(exc))
        self._available = True
        return True

    async def _attach(self) -> None:
        from stem.control import Controller

        def connect() -> Controller:
            try:
                if self._control_port is not None:
                    c = Controller.from_port(address="127.0.0.1", port=self._control_port)
                else:
                    c = Controller.from_socket_file(path=str(self._control_socket))
            except Exception as exc:  # stem.SocketError and friends
                raise TorLocalError(f"cannot reach tor's control interface: {exc}") from None
            try:
                c.authenticate()  # cookie / safecookie / none, from PROTOCOLINFO
            except Exception as exc:
                c.close()
                raise TorRemoteError(f"tor control authentication failed: {exc}") from None
            return c

        self._controller = await trio.to_thread.run_sync(connect)

    async def _launch(self) -> None:
        binary = shutil.which(self._tor_binary)
        if binary is None:
            raise TorLocalError(f"no tor binary {self._tor_binary!r} on PATH (apt install tor)")
        data_dir = self.tor_dir / "data"
        torrc = self.tor_dir / "torrc"
        port_file = data_dir / "control_port"

        def prepare() -> None:
            for d in (self.state_dir, self.tor_dir, data_dir):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)  # tor refuses a DataDirectory others can read
            with contextlib.suppress(FileNotFoundError):
                port_file.unlink()  # a stale one would point at a dead tor
            torrc.write_text(own_torrc(data_dir, os.getpid(), self._extra))

        await trio.to_thread.run_sync(prepare)
        out = (self.tor_dir / "tor.stdout").open("wb")
        try:
            self._process = await trio.lowlevel.open_process(
                [binary, "-f", str(torrc), "--ignore-missing-torrc"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            out.close()
        with trio.move_on_after(self._start_timeout):
            while True:
                if self._process.poll() is not None:
                    tail = _log_tail(self.tor_dir / "tor.stdout") or _log_tail(
                        data_dir / "notice.log"
                    )
                    raise TorLocalError(f"tor exited with {self._process.returncode}: {tail}")
                text = await trio.to_thread.run_sync(_read_if_exists, port_file)
                if text and text.endswith("\n"):
                    break
                await trio.sleep(0.05)
            self._control_port = _parse_port_file(text)
            try:
                await self._attach()
            finally:
                self._control_port = None  # we are not "attached": we own this tor
            # Tor drops the service and exits as soon as our control connection closes.
            await trio.to_thread.run_sync(self._controller.msg, "TAKEOWNERSHIP")
            return
        raise TorLocalError(f"tor did not open its control port within {self._start_timeout} s")

    def _socks_listener(self) -> tuple[str, int] | None:
        from stem.control import Listener

        try:
            listeners = self._controller.get_listeners(Listener.SOCKS)
        except Exception as exc:
            raise TorRemoteError(f"GETINFO net/listeners/socks failed: {exc}") from None
        for host, port in listeners:
            if host in ("127.0.0.1", "::1", "localhost"):
                return host, int(port)
        return (listeners[0][0], int(listeners[0][1])) if listeners else None

    async def aclose(self) -> None:
        """Drop the onion service, close the control connection, stop our own tor."""
        with trio.CancelScope(shield=True):
            controller, self._controller = self._controller, None
            if controller is not None:
                await trio.to_thread.run_sync(controller.close)
            proc, self._process = self._process, None
            if proc is not None and proc.returncode is None:
                proc.terminate()
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            self._service_id = None
            self._socks = None
            self._listening = False
            if self._available:
                self._available = False
                self._reason = "stopped"

    # -- onion service and dials --

    async def publish(self, port: int, *, target: str | None = None) -> str:
        """Publish `port` of our onion service, forwarding to `target` (default 127.0.0.1:port).

        Returns 'xxxx.onion'. The key lives in <state_dir>/tor/onion_key.
        """
        if self._controller is None:
            raise TorLocalError(f"tor is not available: {self._reason}")
        if not 0 < port < 65536:
            raise TorLocalError(f"onion port {port}: expected 1..65535")
        ports = {port: target or f"127.0.0.1:{port}"}
        controller = self._controller
        if not self._listening:
            # Listen before ADD_ONION so an upload right after it is not missed.
            await trio.to_thread.run_sync(self._listen_uploads, controller)
            self._listening = True
        self._service_id = await trio.to_thread.run_sync(
            publish_onion, controller, ports, self.key_path
        )
        return self.onion_address

    def _listen_uploads(self, controller: Controller) -> None:
        from stem.control import EventType

        def on_hs_desc(event: Any) -> None:
            if getattr(event, "action", None) == "UPLOADED" and isinstance(event.address, str):
                self._uploaded.add(event.address)

        try:
            controller.add_event_listener(on_hs_desc, EventType.HS_DESC)
        except Exception as exc:  # an old tor without HS_DESC: `published` stays False
            log.info("tor: cannot follow descriptor uploads: %s", exc)

    async def wait_published(self, *, poll: float = 0.2) -> None:
        """Return once our descriptor is uploaded (use under a timeout).

        Publication needs a bootstrapped tor; offline (DisableNetwork) it never happens.
        """
        if self._service_id is None:
            raise TorLocalError("no onion service published yet")
        while not self.published:
            await trio.sleep(poll)

    async def dial(self, onion: str, port: int, *, timeout: float = 120.0) -> trio.SocketStream:
        """A stream to `onion:port` through tor's SOCKS port.

        Raises TorLocalError (not available, bad name) or a `socks.SocksError`
        (e.g. SocksReplyError code 0xF0: descriptor not found yet -- retry later).
        """
        host = normalize_onion(onion)
        if self._socks is None and self._controller is not None:
            # An attached tor may have gained a SocksPort (or left DisableNetwork) since.
            self._socks = await trio.to_thread.run_sync(self._socks_listener)
        if self._socks is None:
            raise TorLocalError(f"cannot dial onions: {self._reason}")
        return await open_socks5_stream(*self._socks, host, port, timeout=timeout)

    async def bootstrap_progress(self) -> int:
        """tor's bootstrap percentage (0..100); 100 means it can build circuits."""
        if self._controller is None:
            return 0
        phase = await trio.to_thread.run_sync(
            self._controller.get_info, "status/bootstrap-phase", ""
        )
        m = re.search(r"PROGRESS=(\d+)", phase)
        return int(m.group(1)) if m else 0

    async def run(
        self,
        port: int | None = None,
        *,
        target: str | None = None,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start, publish `port` (if given), report started, and hold until cancelled.

        Unavailable tor: reports started with `available` False and returns,
        so the rest of the agent runs on.
        """
        if not await self.start():
            task_status.started(self)
            return
        try:
            if port is not None:
                try:
                    await self.publish(port, target=target)
                except TorError as exc:
                    self._unavailable(str(exc))
                    task_status.started(self)
                    return
            task_status.started(self)
            await trio.sleep_forever()
        finally:
            await self.aclose()


def _read_if_exists(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _parse_port_file(text: str) -> int:
    # "PORT=127.0.0.1:NNNN"
    m = re.search(r"PORT=127\.0\.0\.1:(\d+)", text)
    if not m:
        raise TorLocalError(f"tor wrote an unexpected control port file: {text!r}")
    return int(m.group(1))
