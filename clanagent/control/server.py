"""The control socket server (trio shell around protocol.py and api.py).

Owns: the unix socket file (stale-socket cleanup, mode 0660, group), the
peer-credential check (SO_PEERCRED), one task per client, and turning every
failure into an error reply.  Must never: stop serving because of one bad
client, block the event loop, or run a handler for a caller it refused.
"""

from __future__ import annotations

import contextvars
import errno
import grp
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from .._log import kv
from ..config import ControlConfig
from ..wire import Limits
from .api import AgentView, check_params, lookup
from .protocol import (
    ControlError,
    ErrorCode,
    FrameDecoder,
    RequestError,
    encode_frame,
    parse_request,
    reply_error,
    reply_ok,
    stream_end,
    stream_event,
)

__all__ = ["ControlServer", "PeerCred", "authorize", "peer_cred"]

log = logging.getLogger("clanagent.control")

MAX_CLIENTS = 64
IDLE_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


# Who the control request being handled comes from (SO_PEERCRED), for the few
# handlers that act for that user (`ui.open`); unset outside the socket server.
CURRENT_PEER: contextvars.ContextVar[PeerCred] = contextvars.ContextVar("clanagent_control_peer")


def peer_cred(sock: socket.socket | trio.socket.SocketType) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def _process_groups(pid: int) -> set[int]:
    """Supplementary groups of the calling process (SO_PEERCRED gives only its primary gid)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def _group_gid(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def authorize(
    cred: PeerCred,
    cfg: ControlConfig,
    *,
    agent_uid: int,
    groups_of: Callable[[int], set[int]] = _process_groups,
    gid_of: Callable[[str], int | None] = _group_gid,
) -> tuple[str | None, str]:
    """Return (access, why): access is "write", "read" or None (refused)."""
    if cred.uid == 0:
        return "write", "root"
    if cred.uid == agent_uid:
        return "write", "the agent's own user"
    groups = {cred.gid} | groups_of(cred.pid)
    write_gid = gid_of(cfg.group)
    if write_gid is not None and write_gid in groups:
        return "write", f"member of group {cfg.group}"
    read_gid = gid_of(cfg.read_group)
    if read_gid is not None and read_gid in groups:
        return "read", f"member of group {cfg.read_group}"
    allowed = "root or the agent's user"
    if cfg.group:
        allowed += f", or members of group '{cfg.group}'"
    if cfg.read_group:
        allowed += f" (read-only: group '{cfg.read_group}')"
    return None, (
        f"permission denied: uid {cred.uid} may not use this control socket; allowed: {allowed}"
    )


@dataclass
class ControlStats:
    connections: int = 0
    refused: int = 0
    requests: int = 0
    upgrades: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class ControlServer:
    def __init__(
        self,
        path: Path,
        agent: AgentView,
        cfg: ControlConfig,
        *,
        agent_uid: int | None = None,
        authorizer: Callable[[PeerCred], tuple[str | None, str]] | None = None,
    ) -> None:
        self.path = Path(path)
        self.agent = agent
        self.cfg = cfg
        self.agent_uid = os.getuid() if agent_uid is None else agent_uid
        self._authorize = authorizer or (lambda c: authorize(c, self.cfg, agent_uid=self.agent_uid))
        self.stats = ControlStats()
        self.limits = Limits(max_frame=cfg.max_request)
        self._clients = trio.CapacityLimiter(MAX_CLIENTS)
        self._sock: trio.socket.SocketType | None = None

    # -- socket file -------------------------------------------------------

    def bind(self) -> None:
        """Create the socket file now, so a start-up problem is raised here, plainly."""
        if self._sock is None:
            self._sock = self._bind()

    def _bind(self) -> trio.socket.SocketType:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.path))
            except OSError as exc:
                if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                    raise
                self.path.unlink(missing_ok=True)  # stale socket from a dead agent
            else:
                raise RuntimeError(
                    f"another clanagent is already listening on {self.path}: stop it first "
                    "or choose another --control-socket"
                )
            finally:
                probe.close()
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Create the file with no access at all, then open it up: no window in
        # which another user could connect before the mode is set.
        old_umask = os.umask(0o777)
        try:
            raw.bind(str(self.path))  # instant for unix sockets: fine on the loop
        except OSError:
            raw.close()
            raise
        finally:
            os.umask(old_umask)
        sock = trio.socket.from_stdlib_socket(raw)
        os.chmod(self.path, 0o660)
        gid = _group_gid(self.cfg.group)
        if self.cfg.group and gid is None:
            log.warning(
                "control group does not exist; socket keeps the agent's group",
                extra=kv(group=self.cfg.group),
            )
        elif gid is not None:
            try:
                os.chown(self.path, -1, gid)
            except PermissionError:
                log.warning(
                    "cannot give the control socket to its group", extra=kv(group=self.cfg.group)
                )
        sock.listen(128)
        return sock

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.bind()
        sock, self._sock = self._sock, None
        listener = trio.SocketListener(sock)
        log.info("control socket listening", extra=kv(path=self.path))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as exc:
                        # EMFILE and friends: back off, never die.
                        log.warning("accept failed", extra=kv(error=exc))
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._client, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            try:
                self.path.unlink()
            except OSError:
                pass

    # -- one client --------------------------------------------------------

    async def _send(self, stream: trio.SocketStream, message: dict[str, Any]) -> None:
        await stream.send_all(encode_frame(message))

    async def _client(self, stream: trio.SocketStream) -> None:
        self.stats.connections += 1
        try:
            if self._clients.available_tokens == 0:
                await self._send(
                    stream,
                    reply_error(None, ErrorCode.UNAVAILABLE, "too many control clients; try again"),
                )
                return
            async with self._clients:
                await self._serve_client(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the client went away; nothing to clean up beyond the stream
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        try:
            cred = peer_cred(stream.socket)
        except OSError as exc:
            log.warning("cannot read peer credentials", extra=kv(error=exc))
            return
        CURRENT_PEER.set(cred)  # this client's task only: handlers may ask who calls
        access, why = self._authorize(cred)
        decoder = FrameDecoder(self.cfg.max_request)
        if access is None:
            self.stats.refused += 1
            log.warning("control client refused", extra=kv(uid=cred.uid, pid=cred.pid))
            # Answer the first request so the client can print why, then close.
            with trio.move_on_after(2):
                rid = None
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    try:
                        frames = decoder.feed(data)
                    except ControlError:
                        break
                    if frames:
                        try:
                            rid = parse_request(frames[0], self.limits).id
                        except RequestError as exc:
                            rid = exc.request_id
                        except ControlError:
                            pass
                        break
                self.stats.count_error(ErrorCode.PERMISSION_DENIED)
                await self._send(stream, reply_error(rid, ErrorCode.PERMISSION_DENIED, why))
            return
        while True:
            with trio.move_on_after(IDLE_TIMEOUT) as idle:
                data = await stream.receive_some(65536)
            if idle.cancelled_caught or not data:
                return
            try:
                frames = decoder.feed(data)
            except ControlError as exc:
                self.stats.count_error(exc.code)
                log.warning("control request too large; closing", extra=kv(uid=cred.uid))
                await self._send(stream, reply_error(None, exc.code, exc.message))
                return
            for frame in frames:
                streamed = await self._dispatch(stream, frame, access)
                if streamed:
                    return  # a stream ends the connection

    async def _dispatch(self, stream: trio.SocketStream, frame: bytes, access: str) -> bool:
        self.stats.requests += 1
        rid: int | None = None
        try:
            req = parse_request(frame, self.limits)
            rid = req.id
            handler = lookup(req.version, req.method)
            if handler.access == "write" and access != "write":
                raise ControlError(
                    ErrorCode.PERMISSION_DENIED,
                    f"'{req.method}' changes state and this caller has read-only access",
                )
            check_params(handler, req.params)
            if handler.upgrade:
                await self._upgrade(stream, req.id, handler.call(self.agent, req.params))
                return True
            if handler.streaming:
                await self._stream(stream, req.id, handler.call(self.agent, req.params))
                return True
            result = await handler.call(self.agent, req.params)
            await self._send(stream, reply_ok(req.id, result))
        except RequestError as exc:
            self.stats.count_error(exc.code)
            await self._send(stream, reply_error(exc.request_id, exc.code, exc.message))
        except ControlError as exc:
            self.stats.count_error(exc.code)
            await self._send(stream, reply_error(rid, exc.code, exc.message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception as exc:  # a handler bug must not take the server down
            self.stats.count_error(ErrorCode.INTERNAL)
            log.exception("control handler failed", extra=kv(request_id=rid))
            await self._send(stream, reply_error(rid, ErrorCode.INTERNAL, f"internal error: {exc}"))
        return False

    async def _upgrade(self, stream: trio.SocketStream, rid: int, opener: Any) -> None:
        """Reply ok once the other end is open, then splice raw bytes until either closes.

        An error while opening is an ordinary error reply (raised to
        `_dispatch`); after the ok reply the connection only carries bytes."""
        from ..vmhost.attach import splice

        replied = False
        try:
            async with opener as other:
                self.stats.upgrades += 1
                await self._send(stream, reply_ok(rid, {"attached": True}))
                replied = True
                await splice(stream, other)
        except Exception:
            if not replied:
                raise
            # mid-session there is no frame to answer with: log and close
            log.warning("attached session ended with an error", exc_info=True)

    async def _stream(self, stream: trio.SocketStream, rid: int, events: Any) -> None:
        async def watch_for_close(cancel: trio.CancelScope) -> None:
            # The client sends nothing while it streams; EOF (or anything) ends it.
            try:
                await stream.receive_some(1024)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_for_close, nursery.cancel_scope)
            try:
                async for event in events:
                    await self._send(stream, stream_event(rid, event))
                await self._send(stream, stream_end(rid))
            finally:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
            nursery.cancel_scope.cancel()
