"""The join token: what a new machine needs to find and trust its clan.

Owns: `make_token` and `parse_token` for the text form
`clan1.` + base64url(pack({"v": 1, "clan", "name", "admins", "seeds",
"machine"}) + 4-byte BLAKE2b checksum of the packed bytes), no padding.

The checksum catches typos and truncation (not forgery: a token is handed
over by a human over a channel they trust; it anchors trust in the admin keys).

Must never: accept a token that does not re-encode to exactly the same text
(so one token has one spelling), or raise anything but `TokenError` on any
input string.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from clanagent.wire import Limits, WireError, pack, unpack

__all__ = ["TOKEN_PREFIX", "TokenError", "Token", "make_token", "parse_token"]

TOKEN_PREFIX = "clan1."
MAX_TOKEN = 8192  # characters
MAX_ADMINS = 64
MAX_SEEDS = 64
_CHECKSUM = 4
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_KEYS = frozenset({"v", "clan", "name", "admins", "seeds", "machine"})
_LIMITS = Limits(max_frame=MAX_TOKEN, max_depth=3, max_str=512, max_array=MAX_SEEDS, max_map=16)


class TokenError(ValueError):
    """A join token that cannot be used; the message says what to do about it."""


@dataclass(frozen=True)
class Token:
    clan_id: bytes
    name: str
    admins: tuple[bytes, ...]
    seeds: tuple[str, ...]
    machine: str


def _checksum(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_CHECKSUM).digest()


def _check_seed(seed: Any) -> str:
    if type(seed) is not str or not 3 <= len(seed) <= 261:
        raise TokenError("token field seeds: each seed is a 'host:port' string")
    host, sep, port = seed.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit():
        raise TokenError(f"token field seeds: {seed!r} is not host:port")
    if not 1 <= int(port) <= 65535:
        raise TokenError(f"token field seeds: port of {seed!r} is out of range")
    return seed


def _fields(clan: Any, name: Any, admins: Any, seeds: Any, machine: Any) -> Token:
    if type(clan) is not bytes or len(clan) != 16:
        raise TokenError("token field clan: expected a 16-byte clan id")
    if type(name) is not str or not 1 <= len(name) <= 64:
        raise TokenError("token field name: expected 1..64 characters")
    if type(admins) not in (list, tuple) or not 1 <= len(admins) <= MAX_ADMINS:
        raise TokenError(f"token field admins: expected 1..{MAX_ADMINS} admin keys")
    if not all(type(a) is bytes and len(a) == 32 for a in admins):
        raise TokenError("token field admins: each admin key is 32 bytes")
    if len(set(admins)) != len(admins):
        raise TokenError("token field admins: an admin key is listed twice")
    if type(seeds) not in (list, tuple) or len(seeds) > MAX_SEEDS:
        raise TokenError(f"token field seeds: expected at most {MAX_SEEDS} seeds")
    if type(machine) is not str or not _NAME_RE.fullmatch(machine):
        raise TokenError("token field machine: expected a name like 'alpha' ([a-z0-9-])")
    return Token(clan, name, tuple(sorted(admins)), tuple(_check_seed(s) for s in seeds), machine)


def make_token(
    clan_id: bytes, name: str, admins: Iterable[bytes], seeds: Iterable[str], machine: str
) -> str:
    """The token text for a machine joining the clan; TokenError on bad fields."""
    tok = _fields(clan_id, name, list(admins), list(seeds), machine)
    body = pack(
        {
            "v": 1,
            "clan": tok.clan_id,
            "name": tok.name,
            "admins": list(tok.admins),
            "seeds": list(tok.seeds),
            "machine": tok.machine,
        }
    )
    text = base64.urlsafe_b64encode(body + _checksum(body)).decode("ascii").rstrip("=")
    if len(TOKEN_PREFIX) + len(text) > MAX_TOKEN:
        raise TokenError("token would be too long: fewer seeds or admins")
    return TOKEN_PREFIX + text


def parse_token(s: str) -> Token:
    """Parse token text (surrounding whitespace ignored); TokenError says what is wrong."""
    if not isinstance(s, str):
        raise TokenError("a token is text")
    s = s.strip()
    if len(s) > MAX_TOKEN:
        raise TokenError("token is too long")
    if not s.startswith(TOKEN_PREFIX):
        raise TokenError(f"not a join token: it must start with {TOKEN_PREFIX!r}")
    text = s[len(TOKEN_PREFIX) :]
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise TokenError("token is not valid base64url: it is mistyped or truncated")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("token is not valid base64url: it is mistyped or truncated") from None
    if len(raw) <= _CHECKSUM:
        raise TokenError("token is mistyped or truncated")
    body, check = raw[:-_CHECKSUM], raw[-_CHECKSUM:]
    if _checksum(body) != check:
        raise TokenError("token is mistyped or truncated (checksum mismatch)")
    if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != text:
        raise TokenError("token is mistyped or truncated (non-canonical base64)")
    try:
        value = unpack(body, _LIMITS)
    except WireError as exc:
        raise TokenError(f"token content is malformed: {exc.reason}") from None
    if type(value) is not dict or value.keys() != _KEYS:
        raise TokenError("token content is malformed: wrong fields")
    if value["v"] != 1 or type(value["v"]) is not int:
        raise TokenError(f"token version {value['v']!r} is not supported by this agent")
    return _fields(value["clan"], value["name"], value["admins"], value["seeds"], value["machine"])
