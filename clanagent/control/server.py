"""The control socket server (trio shell around protocol.py and api.py).

Owns: the unix socket file (stale-socket cleanup, mode, group), the
peer-credential check (SO_PEERCRED and SO_PEERGROUPS), connection slots
(a total cap, a per-user cap and a reserve for root and the agent's own
user), the deadlines of a connection (idle, request, send), the accept loop
at the fd limit, one task per client, and turning every failure into an
error reply.  Must never: stop serving because of one bad client or one
handler bug, spin when out of file descriptors, let a local user take the
slots reserved for the admin, block the event loop, or run a handler for a
caller it refused.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .._counters import OTHER, LabelCounts
from .._log import kv
from ..config import ControlConfig
from ..fd_reserve import PROCESS, FdReserve
from ..wire import Limits
from .api import AgentView, ApiTable, check_params
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

__all__ = ["ControlServer", "PeerCred", "Slots", "authorize", "peer_cred", "peer_groups"]

log = logging.getLogger("clanagent.control")

# A connection that sends nothing for this long is closed.
IDLE_TIMEOUT = 60.0
# Once its first byte arrived, a request must be whole within this.
REQUEST_TIMEOUT = 10.0
# A reply or event the client does not take within this ends the connection.
SEND_TIMEOUT = 10.0
# How long the accept loop waits when the process is out of file descriptors.
ACCEPT_BACKOFF = 0.1
# A connection accepted at the fd limit holds the whole fd reserve (and so
# keeps the listeners from accepting) until it ends, but never longer than
# this: time enough for a request, not for a stream left open.
LOAN_LIMIT = REQUEST_TIMEOUT
# Faults logged once per (uid, kind); beyond this many keys the oldest goes.
MAX_LOGGED = 256

# Linux's SO_PEERGROUPS (4.13+): the peer's supplementary groups as of connect().
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_CONNECTION_GONE = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int
    # Supplementary groups of the peer when it connected (empty until looked up).
    groups: frozenset[int] = frozenset()


# Who the control request being handled comes from (SO_PEERCRED), for the few
# handlers that act for that user (`ui.open`); unset outside the socket server.
CURRENT_PEER: contextvars.ContextVar[PeerCred] = contextvars.ContextVar("clanagent_control_peer")


def peer_cred(sock: socket.socket | trio.socket.SocketType) -> PeerCred:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCred(pid, uid, gid)


def peer_groups(sock: socket.socket | trio.socket.SocketType, uid: int, gid: int) -> frozenset[int]:
    """The peer's groups: from the socket if the kernel tells, else the user database.

    SO_PEERGROUPS is taken at connect() like SO_PEERCRED, so it cannot race
    with the peer exiting or changing groups (reading /proc/PID/status can);
    the fallback gives the groups of the uid's name as login would."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError:  # an old kernel, or more groups than 1024 bytes hold
        pass
    else:
        n = len(raw) // 4
        return frozenset(struct.unpack(f"{n}I", raw[: n * 4])) | {gid}
    try:
        return frozenset(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except (KeyError, OSError):  # a uid without a name (e.g. from a container)
        return frozenset({gid})


def _group_gid(name: str) -> int | None:
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _who_may(cfg: ControlConfig) -> str:
    allowed = "root or the agent's user"
    if cfg.group:
        allowed += f", or members of group '{cfg.group}'"
    if cfg.read_group:
        allowed += f" (read-only: group '{cfg.read_group}')"
    return allowed


def authorize(
    cred: PeerCred,
    cfg: ControlConfig,
    *,
    agent_uid: int,
    gid_of: Callable[[str], int | None] = _group_gid,
) -> tuple[str | None, str]:
    """Return (access, why): access is "write", "read" or None (refused).

    `cred.groups` holds the caller's supplementary groups (see peer_groups);
    its primary gid counts too."""
    if cred.uid == 0:
        return "write", "root"
    if cred.uid == agent_uid:
        return "write", "the agent's own user"
    groups = {cred.gid} | cred.groups
    write_gid = gid_of(cfg.group)
    if write_gid is not None and write_gid in groups:
        return "write", f"member of group {cfg.group}"
    read_gid = gid_of(cfg.read_group)
    if read_gid is not None and read_gid in groups:
        return "read", f"member of group {cfg.read_group}"
    return None, (
        f"permission denied: uid {cred.uid} may not use this control socket; "
        f"allowed: {_who_may(cfg)}"
    )


def _write_denied(method: str, cred: PeerCred, cfg: ControlConfig) -> str:
    who = f"uid {cred.uid}"
    via = f" (group '{cfg.read_group}')" if cfg.read_group else ""
    if cfg.group:
        need = f"membership of group '{cfg.group}' (or root, or the agent's user)"
    else:
        need = "root or the agent's user (control.group in agent.toml names a group that may)"
    return f"'{method}' changes state and {who} has read-only access{via}; it needs {need}"


class Slots:
    """Connection slots of the control socket: plain bookkeeping, no I/O.

    `total` connections at once; `reserved` of them only privileged callers
    (root, the agent's own uid) may take; any other uid holds at most
    `per_uid`.  So however many connections local users open, root can
    always get in."""

    def __init__(self, total: int, reserved: int, per_uid: int) -> None:
        if not 0 <= reserved < total or per_uid < 1:
            raise ValueError("need 0 <= reserved < total and per_uid >= 1")
        self.total = total
        self.reserved = reserved
        self.per_uid = per_uid
        self.by_uid: dict[int, int] = {}
        self.privileged = 0
        self.others = 0

    @property
    def in_use(self) -> int:
        return self.privileged + self.others

    def acquire(self, uid: int, privileged: bool) -> str | None:
        """Take a slot for `uid`, or return why not (nothing taken)."""
        if self.in_use >= self.total:
            return f"all {self.total} control connections are in use; try again shortly"
        if not privileged:
            if self.by_uid.get(uid, 0) >= self.per_uid:
                return (
                    f"uid {uid} already holds {self.per_uid} control connections, "
                    "the most one user may; close one and retry"
                )
            if self.others >= self.total - self.reserved:
                return (
                    f"the {self.total - self.reserved} control connections open to users "
                    "other than root and the agent's user are all in use; try again shortly"
                )
            self.others += 1
        else:
            self.privileged += 1
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1
        return None

    def release(self, uid: int, privileged: bool) -> None:
        left = self.by_uid.get(uid, 0) - 1
        if left < 0:
            raise ValueError(f"uid {uid} holds no control slot")
        if left:
            self.by_uid[uid] = left
        else:
            del self.by_uid[uid]
        if privileged:
            self.privileged -= 1
        else:
            self.others -= 1


class _SendStalled(Exception):
    """The client did not take a reply within the send deadline."""


_COUNTERS = (
    "accepted",  # connections given a slot
    "active",  # open now (a gauge)
    "requests",
    "upgrades",
    "refused_slots",  # no slot for that uid (total, per-user or reserve)
    "refused_group",  # uid in no allowed group
    "refused_fds",  # accepted on the spare fd only to say we are out of fds
    "denied_write",  # a read-only caller asked for a write method
    "error_replies",
    "internal_errors",  # a bug while serving one request or connection
    "timeouts",  # a request not whole in time, or a reply not taken in time
    "idle_closed",
    "accept_errors",
)


class _Loan:
    """The fd reserve lent to one connection: given back once, at its end or at the limit."""

    def __init__(self, fds: FdReserve) -> None:
        self._fds = fds
        self._out = True
        self.scope = trio.CancelScope()

    def end(self) -> None:
        if self._out:
            self._out = False
            self._fds.give_back()
            self.scope.cancel()

    async def expire(self, after: float) -> None:
        with self.scope:
            await trio.sleep(after)
            self.end()


class ControlServer:
    def __init__(
        self,
        path: Path,
        api: ApiTable | AgentView,
        cfg: ControlConfig,
        *,
        agent_uid: int | None = None,
        authorizer: Callable[[PeerCred], tuple[str | None, str]] | None = None,
        idle_timeout: float = IDLE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        fd_reserve: FdReserve | None = None,
    ) -> None:
        self.path = Path(path)
        # the one table the web console dispatches through too (a bare
        # AgentView: a table of the agent-wide methods over it)
        self.api = ApiTable.of(api)
        self.cfg = cfg
        self.agent_uid = os.getuid() if agent_uid is None else agent_uid
        self._authorize = authorizer or (
            lambda c: authorize(c, self.cfg, agent_uid=self.agent_uid, gid_of=self._gid)
        )
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.limits = Limits(max_frame=cfg.max_request)
        self.slots = Slots(
            cfg.max_connections, cfg.reserved_connections, cfg.max_connections_per_user
        )
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._error_codes: dict[str, int] = {}
        # Requests by (method, result): "ok" or the error code; a method
        # unknown here counts as OTHER (callers choose the names).
        self.by_method = LabelCounts()
        self._logged: dict[tuple[int, str], None] = {}
        self._gid_cache: dict[str, int] = {}
        self._sock: socket.socket | None = None
        # Descriptors held back for root and the agent's uid at the fd limit.
        self._fds = PROCESS if fd_reserve is None else fd_reserve

    # -- counters and logging ---------------------------------------------

    def counters(self) -> dict[str, int]:
        out = dict(self._counters)
        out["active"] = self.slots.in_use
        out.update({f"error_{code}": n for code, n in sorted(self._error_codes.items())})
        return out

    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] += n

    def _count_error(self, code: str) -> None:
        self._counters["error_replies"] += 1
        self._error_codes[code] = self._error_codes.get(code, 0) + 1

    def _first_time(self, uid: int, kind: str) -> bool:
        """True once per (uid, kind), so a repeating fault fills no disk."""
        key = (uid, kind)
        if key in self._logged:
            return False
        if len(self._logged) >= MAX_LOGGED:
            del self._logged[next(iter(self._logged))]
        self._logged[key] = None
        return True

    def _fault(self, cred: PeerCred, exc: BaseException, where: str) -> None:
        self._count("internal_errors")
        if self._first_time(cred.uid, f"{where}:{type(exc).__name__}"):
            log.error(
                "control request failed; that connection ends, the others go on",
                exc_info=exc,
                extra=kv(uid=cred.uid, pid=cred.pid, where=where),
            )

    def _gid(self, name: str) -> int | None:
        # The last good answer stands in when the lookup fails (e.g. out of fds).
        if not name:
            return None
        gid = _group_gid(name)
        if gid is None:
            return self._gid_cache.get(name)
        self._gid_cache[name] = gid
        return gid

    # -- socket file -------------------------------------------------------

    def bind(self) -> None:
        """Create the socket file now, so a start-up problem is raised here, plainly."""
        if self._sock is None:
            self._sock = self._bind()

    def _bind(self) -> socket.socket:
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
        # With a read group, its members must reach the socket whatever their
        # primary group: anyone may connect and the peer credentials decide.
        # Without one, the file mode keeps out everyone but the control group.
        read_gid = self._gid(self.cfg.read_group)
        if self.cfg.read_group and read_gid is None:
            log.warning(
                "control read group does not exist; nobody gets read-only access",
                extra=kv(group=self.cfg.read_group),
            )
        os.chmod(self.path, 0o666 if read_gid is not None else 0o660)
        gid = self._gid(self.cfg.group)
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
        raw.setblocking(False)
        raw.listen(128)
        return raw

    # -- accepting -----------------------------------------------------------

    def _keep_spare(self) -> None:
        """Hold descriptors in reserve, to accept and serve a client at the fd limit."""
        self._fds.fill()

    def _accept_on_spare(self, sock: socket.socket) -> socket.socket | None:
        """Accept on the reserve, borrowed until that connection ends (or is refused).

        The whole reserve is freed, not one descriptor: the request needs some
        too (an import, a durable write), and listeners do not accept while it
        is lent."""
        if not self._fds.borrow():
            return None
        try:
            conn, _ = sock.accept()
        except OSError:
            self._fds.give_back()
            return None
        return conn

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.bind()
        sock, self._sock = self._sock, None
        assert sock is not None
        self._keep_spare()
        log.info("control socket listening", extra=kv(path=self.path))
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(self.path)
                await self._accept_loop(sock, nursery)
        finally:
            sock.close()
            try:
                self.path.unlink()
            except OSError:
                pass

    async def _accept_loop(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        accept_failing = False
        while True:
            self._keep_spare()
            await trio.lowlevel.wait_readable(sock)
            out_of_fds = False
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                self._count("accept_errors")
                if not accept_failing:
                    accept_failing = True
                    log.warning("control accept failed", extra=kv(error=exc))
                conn = self._accept_on_spare(sock) if exc.errno in _OUT_OF_FDS else None
                if conn is None:
                    await trio.sleep(ACCEPT_BACKOFF)  # never spin on a full fd table
                    continue
                out_of_fds = True
            else:
                accept_failing = False
            try:
                self._admit(conn, nursery, out_of_fds)
            except Exception as exc:  # a bug admitting one caller must not stop the loop
                self._fault(PeerCred(0, -1, -1), exc, "accept")
                conn.close()
                if out_of_fds:
                    self._fds.give_back()

    def _admit(self, conn: socket.socket, nursery: trio.Nursery, out_of_fds: bool) -> None:
        """Give the new connection a slot and a task, or answer it and close it at once.

        `out_of_fds`: accepted on the borrowed reserve; the caller (if it raises)
        or the connection's task gives it back."""
        try:
            cred = peer_cred(conn)
        except OSError as exc:
            log.warning("cannot read peer credentials", extra=kv(error=exc))
            conn.close()
            if out_of_fds:
                self._fds.give_back()
            return
        privileged = cred.uid in (0, self.agent_uid)
        if out_of_fds and not privileged:
            self._reject(conn, cred, "refused_fds", "the agent is out of file descriptors")
            self._fds.give_back()
            return
        why = self.slots.acquire(cred.uid, privileged)
        if why is not None:
            self._reject(conn, cred, "refused_slots", why)
            if out_of_fds:
                self._fds.give_back()
            return
        self._count("accepted")
        try:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        except BaseException:
            self.slots.release(cred.uid, privileged)
            conn.close()
            raise
        loan = _Loan(self._fds) if out_of_fds else None
        nursery.start_soon(self._client, stream, cred, privileged, loan)
        if loan is not None:
            nursery.start_soon(loan.expire, LOAN_LIMIT)

    def _reject(self, conn: socket.socket, cred: PeerCred, counter: str, why: str) -> None:
        # Costs nothing to hold: one non-blocking send into an empty buffer, then close.
        self._count(counter)
        self._count_error(ErrorCode.UNAVAILABLE)
        if self._first_time(cred.uid, counter):
            log.warning("control connection refused", extra=kv(uid=cred.uid, why=why))
        try:
            conn.setblocking(False)
            conn.send(encode_frame(reply_error(None, ErrorCode.UNAVAILABLE, why)))
        except OSError:
            pass
        conn.close()

    # -- one client --------------------------------------------------------

    async def _send(self, stream: trio.SocketStream, message: dict[str, Any]) -> None:
        await self._send_bytes(stream, encode_frame(message))

    async def _send_bytes(self, stream: trio.SocketStream, data: bytes) -> None:
        with trio.move_on_after(self.send_timeout) as scope:
            await stream.send_all(data)
        if scope.cancelled_caught:
            raise _SendStalled

    async def _client(
        self,
        stream: trio.SocketStream,
        cred: PeerCred,
        privileged: bool,
        loan: _Loan | None = None,
    ) -> None:
        try:
            if not privileged:  # root and the agent's user need no group lookups
                cred = dataclasses.replace(
                    cred, groups=peer_groups(stream.socket, cred.uid, cred.gid)
                )
            CURRENT_PEER.set(cred)  # this client's task only: handlers may ask who calls
            await self._serve_client(stream, cred)
        except _CONNECTION_GONE + (OSError,):
            pass  # the client went away; nothing to clean up beyond the stream
        except _SendStalled:
            self._count("timeouts")
            if self._first_time(cred.uid, "send_stalled"):
                log.warning("control client stopped reading; closing", extra=kv(uid=cred.uid))
        except Exception as exc:  # one broken connection must not stop the server
            self._fault(cred, exc, "connection")
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.send_all(
                    encode_frame(
                        reply_error(None, ErrorCode.INTERNAL, "internal error; see the log")
                    )
                )
        finally:
            self.slots.release(cred.uid, privileged)
            # Close now and take the freed fds back into the reserve before any
            # other task runs: at the fd limit another listener would grab them.
            stream.socket.close()
            if loan is not None:
                loan.end()
            self._keep_spare()
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _serve_client(self, stream: trio.SocketStream, cred: PeerCred) -> None:
        access, why = self._authorize(cred)
        decoder = FrameDecoder(self.cfg.max_request)
        if access is None:
            self._count("refused_group")
            if self._first_time(cred.uid, "refused_group"):
                log.warning("control client refused", extra=kv(uid=cred.uid, pid=cred.pid))
            await self._refuse(stream, decoder, why)
            return
        last_activity = trio.current_time()
        partial_since: float | None = None
        while True:
            if decoder.pending and partial_since is not None:
                deadline = partial_since + self.request_timeout
            else:
                deadline = last_activity + self.idle_timeout
            with trio.move_on_at(deadline) as scope:
                data = await stream.receive_some(65536)
            if scope.cancelled_caught:
                if decoder.pending:
                    self._count("timeouts")
                    self._count_error(ErrorCode.TIMEOUT)
                    await self._send(
                        stream,
                        reply_error(
                            None,
                            ErrorCode.TIMEOUT,
                            f"request not complete within {self.request_timeout:g} s",
                        ),
                    )
                else:
                    self._count("idle_closed")
                return
            if not data:
                return
            try:
                frames = decoder.feed(data)
            except ControlError as exc:
                self._count_error(exc.code)
                log.warning("control request too large; closing", extra=kv(uid=cred.uid))
                await self._send(stream, reply_error(None, exc.code, exc.message))
                return
            if not decoder.pending:
                partial_since = None
            elif frames or partial_since is None:
                partial_since = trio.current_time()  # a new request started in this chunk
            for frame in frames:
                streamed = await self._dispatch(stream, frame, access, cred)
                if streamed:
                    return  # a stream ends the connection
            last_activity = trio.current_time()
            if frames and decoder.pending:
                partial_since = last_activity  # the handlers' time is not the client's

    async def _refuse(self, stream: trio.SocketStream, decoder: FrameDecoder, why: str) -> None:
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
            self._count_error(ErrorCode.PERMISSION_DENIED)
            await self._send(stream, reply_error(rid, ErrorCode.PERMISSION_DENIED, why))

    async def _dispatch(
        self, stream: trio.SocketStream, frame: bytes, access: str, cred: PeerCred
    ) -> bool:
        self._count("requests")
        rid: int | None = None
        method, outcome = OTHER, "ok"
        try:
            req = parse_request(frame, self.limits)
            rid = req.id
            handler = self.api.lookup(req.version, req.method, "socket")
            method = handler.name
            if not handler.allows(access):
                self._count("denied_write")
                raise ControlError(
                    ErrorCode.PERMISSION_DENIED, _write_denied(req.method, cred, self.cfg)
                )
            check_params(handler, req.params)
            if handler.upgrade or handler.streaming:
                self.by_method.add(method, "ok")  # counted when it starts
                if handler.upgrade:
                    await self._upgrade(stream, req.id, handler.call(req.params))
                else:
                    await self._stream(stream, req.id, handler.call(req.params))
                return True
            result = await handler.call(req.params)
            payload = encode_frame(reply_ok(req.id, result))
        except RequestError as exc:
            self._count_error(exc.code)
            outcome = exc.code
            payload = encode_frame(reply_error(exc.request_id, exc.code, exc.message))
        except ControlError as exc:
            self._count_error(exc.code)
            outcome = exc.code
            payload = encode_frame(reply_error(rid, exc.code, exc.message))
        except _CONNECTION_GONE + (_SendStalled,):
            self.by_method.add(method, "gone")
            raise
        except Exception as exc:  # a handler bug ends that request, never the server
            self._count_error(ErrorCode.INTERNAL)
            outcome = ErrorCode.INTERNAL
            self._fault(cred, exc, "handler")
            payload = encode_frame(
                reply_error(
                    rid, ErrorCode.INTERNAL, f"internal error ({type(exc).__name__}); see the log"
                )
            )
        self.by_method.add(method, outcome)
        await self._send_bytes(stream, payload)
        return False

    async def _upgrade(self, stream: trio.SocketStream, rid: int, opener: Any) -> None:
        """Reply ok once the other end is open, then splice raw bytes until either closes.

        An error while opening is an ordinary error reply (raised to
        `_dispatch`); after the ok reply the connection only carries bytes."""
        from ..vmhost.attach import splice

        replied = False
        try:
            async with opener as other:
                self._count("upgrades")
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

        # A failure is carried out of the nursery bare (not in an ExceptionGroup),
        # so `_dispatch` can tell a gone client from a broken event source.
        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_for_close, nursery.cancel_scope)
            try:
                async for event in events:
                    await self._send(stream, stream_event(rid, event))
                await self._send(stream, stream_end(rid))
            except Exception as exc:
                failure = exc
            finally:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    with trio.CancelScope(shield=True):
                        await aclose()
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
