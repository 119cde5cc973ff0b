"""Who may use the web console: one-time login tokens and sessions, sans-IO.

Owns: minting login tokens (what `clanctl ui` prints, inside a URL),
exchanging one for a session exactly once before it expires, checking and
ending sessions, and the request checks that keep other web pages out
(Host: DNS rebinding; Origin: cross-site requests).  Takes `now` from the
caller and does no I/O.  Must never: accept a token twice or after it
expired, keep a secret in a form that a dict lookup could time (only
SHA-256 digests are stored), or grow without bound.

The session secret travels in the body of the login reply and then in the
first WebSocket message, never in a cookie: cookies are shared by every
port of 127.0.0.1 (RFC 6265 section 8.5), so any local program listening on
another port could receive one; the browser keeps the session in the
origin's localStorage, which is per port.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

__all__ = [
    "LOGIN_TTL",
    "SESSION_TTL",
    "SESSION_IDLE",
    "MAX_LOGIN_TOKENS",
    "MAX_SESSIONS",
    "AuthError",
    "Authenticator",
    "allowed_hosts",
    "check_host",
    "check_origin",
]

LOGIN_TTL = 300.0  # seconds a login URL stays valid
SESSION_TTL = 12 * 3600.0  # seconds a session lives at most
SESSION_IDLE = 3600.0  # seconds a session lives without use
MAX_LOGIN_TOKENS = 16  # outstanding login URLs; minting more drops the oldest
MAX_SESSIONS = 32  # live sessions; a new login drops the least recently used


class AuthError(Exception):
    """A refused login or session; `message` says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class _Session:
    created: float
    used: float
    access: str
    # The admin key this session may sign with: (path, uid that must own the
    # file, or None for any owner), or None for no key.  Fixed at `ui.open`.
    signer: tuple[str, int | None] | None = None


_EXPIRED_LOGIN = "this login link has expired or was already used: run 'clanctl ui' for a new one"
_BAD_SESSION = "not logged in (or the session expired): run 'clanctl ui' and open the new link"


class Authenticator:
    """Login tokens and sessions of one web console, kept in memory only."""

    def __init__(
        self,
        *,
        login_ttl: float = LOGIN_TTL,
        session_ttl: float = SESSION_TTL,
        session_idle: float = SESSION_IDLE,
    ) -> None:
        self.login_ttl = login_ttl
        self.session_ttl = session_ttl
        self.session_idle = session_idle
        # digest -> (expires, access, signer)
        self._logins: dict[str, tuple[float, str, tuple[str, int | None] | None]] = {}
        self._sessions: dict[str, _Session] = {}  # digest -> session

    # -- login tokens --------------------------------------------------------------

    def mint_login(
        self, now: float, access: str = "write", signer: tuple[str, int | None] | None = None
    ) -> str:
        """A new one-time login token (URL-safe), valid for `login_ttl` seconds."""
        self._expire(now)
        while len(self._logins) >= MAX_LOGIN_TOKENS:
            oldest = min(self._logins, key=lambda d: self._logins[d][0])
            del self._logins[oldest]
        token = secrets.token_urlsafe(32)
        self._logins[_digest(token)] = (now + self.login_ttl, access, signer)
        return token

    def redeem(self, token: object, now: float) -> str:
        """Exchange a login token for a new session secret; AuthError if it cannot be."""
        if not isinstance(token, str) or not 0 < len(token) <= 128:
            raise AuthError("the login link has no valid token: run 'clanctl ui' for a new one")
        self._expire(now)
        entry = self._logins.pop(_digest(token), None)  # single use, even when it fails below
        if entry is None:
            raise AuthError(_EXPIRED_LOGIN)
        _, access, signer = entry
        while len(self._sessions) >= MAX_SESSIONS:
            lru = min(self._sessions, key=lambda d: self._sessions[d].used)
            del self._sessions[lru]
        session = secrets.token_urlsafe(32)
        self._sessions[_digest(session)] = _Session(now, now, access, signer)
        return session

    # -- sessions ------------------------------------------------------------------

    def check(self, session: object, now: float) -> str:
        """The access ("write" or "read") of a live session; AuthError otherwise."""
        if not isinstance(session, str) or not 0 < len(session) <= 128:
            raise AuthError(_BAD_SESSION)
        self._expire(now)
        s = self._sessions.get(_digest(session))
        if s is None:
            raise AuthError(_BAD_SESSION)
        s.used = now
        return s.access

    def alive(self, session: object, now: float) -> bool:
        """Whether a session still lives (without counting this as a use)."""
        if not isinstance(session, str):
            return False
        self._expire(now)
        return _digest(session) in self._sessions

    def signer_of(self, session: object) -> tuple[str, int | None] | None:
        """The admin key a live session may sign with (see `_Session.signer`)."""
        s = self._sessions.get(_digest(session)) if isinstance(session, str) else None
        return None if s is None else s.signer

    def end(self, session: object) -> bool:
        if not isinstance(session, str):
            return False
        return self._sessions.pop(_digest(session), None) is not None

    def end_all(self) -> None:
        self._logins.clear()
        self._sessions.clear()

    @property
    def counts(self) -> dict[str, int]:
        return {"login_tokens": len(self._logins), "sessions": len(self._sessions)}

    def _expire(self, now: float) -> None:
        for d in [d for d, (exp, _, _) in self._logins.items() if exp <= now]:
            del self._logins[d]
        for d in [
            d
            for d, s in self._sessions.items()
            if now - s.created >= self.session_ttl or now - s.used >= self.session_idle
        ]:
            del self._sessions[d]


# -- request checks ------------------------------------------------------------------


def allowed_hosts(port: int) -> frozenset[str]:
    """The Host header values a browser sends for this console (anything else is rebinding)."""
    return frozenset({f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"})


def check_host(host: str | None, port: int) -> None:
    if host is None or host.lower() not in allowed_hosts(port):
        raise AuthError(
            f"wrong Host header {host!r}: the console answers only at "
            f"http://127.0.0.1:{port}/ (a different name is a DNS rebinding attempt)"
        )


def check_origin(origin: str | None, port: int) -> None:
    """A state-changing request or WebSocket must come from the console's own page."""
    if origin is None:
        raise AuthError("missing Origin header: the console only talks to its own page")
    allowed = {f"http://{h}" for h in allowed_hosts(port)}
    if origin.lower() not in allowed:
        raise AuthError(
            f"requests from {origin!r} are refused: only the console's own page "
            f"(http://127.0.0.1:{port}) may use it"
        )
