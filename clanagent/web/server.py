"""The web console's server: hypercorn's connections inside the agent's nursery.

Owns: starting the console once (from the config at start-up, or on the
first `ui.open`), binding it to 127.0.0.1 only, the login URLs it mints,
its counters, and stopping it cleanly with the agent.  HTTP and WebSocket
parsing are hypercorn's (h11 and wsproto underneath); connection limits are
`_listener.py`'s; the routes are `app.py`'s.
Must never: listen on anything but loopback, stop the agent when it cannot
start (the port is taken: it says so and the agent runs on) or when it fails
later, or outlive the agent.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from .._log import kv
from ..capabilities import Capability
from ..config import Config
from ..control.api import ApiTable
from ..control.protocol import ControlError, ErrorCode
from ._listener import KEEP_ALIVE, Listener
from .actions import AdminKeySource, ConsoleActions
from .app import WebApp
from .auth import Authenticator
from .guided import GuidedEdits

__all__ = ["WebConsole", "BIND_HOST"]

log = logging.getLogger("clanagent.web")

BIND_HOST = "127.0.0.1"


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError (port taken, ...) inside what hypercorn's nurseries raised."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _os_error(inner)
            if found is not None:
                return found
    return None


class WebConsole:
    """The console over the agent's control API table; its `console.*` methods
    join that table when it is built (one console per table)."""

    def __init__(self, cfg: Config, api: ApiTable) -> None:
        self.cfg = cfg.web
        self.auth = Authenticator()
        self.keys = AdminKeySource(self.cfg.admin_key)
        self.actions = ConsoleActions(api, self.keys)
        self.actions.register()
        GuidedEdits(self.actions).register()
        self.app = WebApp(api, self.auth, max_message=cfg.control.max_request)
        self.listener = Listener(self.app)
        self.app.faults = self.listener.faults  # one count, one log-once set
        self.port: int | None = None
        self.reason = "off: 'clanctl ui' starts it for this run (or set web.enabled = true)"
        self._lock = trio.Lock()
        self._stopped = trio.Event()

    @property
    def running(self) -> bool:
        return self.port is not None

    def counters(self) -> dict[str, int]:
        """Connections and requests since the agent started (plain ints, for `status`)."""
        stats = self.app.stats
        return {
            **self.listener.counters,
            "http_requests": stats.http_requests,
            "forbidden": stats.refused,  # foreign Host or Origin
            "timeouts": stats.timeouts,
            "logins": stats.logins,
            "failed_logins": stats.failed_logins,
            "websockets": stats.websockets,
            "websockets_open": stats.websockets_open,
            "websockets_busy": stats.websockets_busy,
            "requests": stats.requests,
            "errors": sum(stats.errors.values()),
        }

    def capability(self) -> Capability:
        if self.port is not None:
            return Capability("web", True, f"console at http://{BIND_HOST}:{self.port}/")
        return Capability("web", False, self.reason)

    def _hypercorn_config(self, port: int) -> Any:
        from hypercorn.config import Config

        hc = Config()
        hc.bind = [f"{BIND_HOST}:{port}"]
        hc.accesslog = None
        http_log = logging.getLogger("clanagent.web.http")
        http_log.setLevel(logging.WARNING)  # its "Running on ... (CTRL + C to quit)" is ours to say
        hc.errorlog = http_log
        hc.include_server_header = False
        hc.graceful_timeout = 1.0
        # Bigger than the app's own limit, so the app answers an oversized
        # message with a clear error; beyond this hypercorn closes (1009).
        hc.websocket_max_message_size = 4 * self.app.limits.max_frame
        hc.h11_max_incomplete_size = 16 * 1024
        hc.websocket_ping_interval = 20.0
        # Headers within this of connecting, the next request within this of the
        # last answer: idle sockets are closed soon (request bodies: the app's limit).
        hc.keep_alive_timeout = KEEP_ALIVE
        return hc

    async def ensure_running(self, nursery: trio.Nursery) -> int:
        """Start the console if it is not running; its port. ControlError when it cannot."""
        async with self._lock:
            if self.port is not None:
                return self.port
            try:
                binds = await nursery.start(self._serve, self.cfg.port)
            except (OSError, BaseExceptionGroup) as raised:
                exc = _os_error(raised)
                if exc is None:
                    raise
                self.reason = (
                    f"cannot listen on {BIND_HOST}:{self.cfg.port}: {exc.strerror or exc} "
                    "(set web.port to a free port, or 0 for any)"
                )
                log.warning("web console not started", extra=kv(reason=self.reason))
                raise ControlError(ErrorCode.UNAVAILABLE, self.reason) from None
            port = int(binds[0].rsplit(":", 1)[1])
            self.port = self.app.port = port
            log.info("web console listening", extra=kv(url=f"http://{BIND_HOST}:{port}/"))
            return port

    async def _serve(self, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        reason = "stopped"
        try:
            await self.listener.serve(
                self._hypercorn_config(port), self._stopped.wait, task_status=task_status
            )
        except Exception as exc:
            if self.port is None:
                raise  # it never started: ensure_running says why
            # A fault in the listener itself ends the console, never the agent.
            self.listener.faults.report("listener", exc)
            reason = "stopped after an internal error (see the agent's log)"
        finally:
            self.port = None
            self.auth.end_all()
            self.reason = reason

    def stop(self) -> None:
        self._stopped.set()

    def login_url(self, now: float, signer: tuple[str, int | None] | None = None) -> str:
        """A one-time login link; its session signs with `signer` (see AdminKeySource)."""
        assert self.port is not None
        token = self.auth.mint_login(now, signer=signer)
        return f"http://{BIND_HOST}:{self.port}/login?token={token}"
