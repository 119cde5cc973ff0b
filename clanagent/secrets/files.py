"""Secret files on disk: the current generation, the previous one for a grace period.

Owns the layout under the runtime dir (blocking I/O; the agent calls it
from a worker thread):

    RUNTIME/secrets/SERVICE/SECRET/FILE            0400, dir 0700 (or 0750)
    RUNTIME/secrets/SERVICE/SECRET/.previous/FILE  the generation before
    RUNTIME/secrets/SERVICE/SECRET/.previous/.retired   when it was replaced
    RUNTIME/secrets/SERVICE/SECRET/.generation     "GENERATION\\n" of the files
    RUNTIME/public/SERVICE/SECRET/FILE             0444, dir 0755

Every file is written to a temp name, fsynced, chmodded and chowned, then
renamed into place, so a reader sees an old or a new file, never a torn
one.  `install` reports whether the content changed (the cue to run the
service's reload hook); `expire_previous` deletes previous generations
older than the grace period; `remove` deletes an instance we no longer hold.

Must never: write a file name that is not a single safe component, leave a
secret readable by anyone but its owner, or touch anything outside
RUNTIME/secrets and RUNTIME/public.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from collections.abc import Mapping
from pathlib import Path

from clanagent.durable import atomic_write, fsync_dir
from clanagent.secrets.crypto import SecretsLocalError
from clanagent.secrets.model import valid_file_name

__all__ = [
    "DEFAULT_GRACE",
    "Owner",
    "secret_dir",
    "public_dir",
    "install",
    "installed",
    "installed_generation",
    "expire_previous",
    "remove",
    "resolve_owner",
]

DEFAULT_GRACE = 3600
PREVIOUS = ".previous"
_RETIRED = ".retired"
_GENERATION = ".generation"

Owner = tuple[int, int] | None
"""(uid, gid) to chown secret files and dirs to, or None to keep ours."""


def _name(name: str, what: str) -> str:
    if not valid_file_name(name):
        raise SecretsLocalError(f"bad {what} name {name!r}")
    return name


def resolve_owner(spec: str | None) -> Owner:
    """(uid, gid) for "USER" or "USER:GROUP" (names or numbers); None for ""/None.

    A bare user takes that user's primary group.  SecretsLocalError when unknown.
    """
    if not spec:
        return None
    user, _, group = spec.partition(":")
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        if not group:
            return pw.pw_uid, pw.pw_gid
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        raise SecretsLocalError(f"unknown secrets owner {spec!r}") from None
    return pw.pw_uid, gid


def secret_dir(runtime: Path, service: str, secret: str) -> Path:
    return Path(runtime) / "secrets" / _name(service, "service") / _name(secret, "secret")


def public_dir(runtime: Path, service: str, secret: str) -> Path:
    return Path(runtime) / "public" / _name(service, "service") / _name(secret, "secret")


def _mkdir(path: Path, mode: int, owner: Owner) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)


def _write_atomic(path: Path, data: bytes, mode: int, owner: Owner) -> None:
    # The directory is fsynced once per install, after all its files.
    atomic_write(path, data, mode=mode, owner=owner, sync_dir=False)


def _read_files(d: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if not d.is_dir():
        return out
    for p in d.iterdir():
        if p.name.startswith(".") or not p.is_file() or p.is_symlink():
            continue
        out[p.name] = p.read_bytes()
    return out


def installed_generation(runtime: Path, service: str, secret: str) -> int | None:
    """The generation whose files are installed, or None."""
    try:
        return int((secret_dir(runtime, service, secret) / _GENERATION).read_text())
    except (OSError, ValueError):
        return None


def install(
    runtime: Path,
    service: str,
    secret: str,
    generation: int,
    secret_files: Mapping[str, bytes],
    public_files: Mapping[str, bytes],
    now: int,
    *,
    owner: Owner = None,
    dir_mode: int = 0o700,
) -> bool:
    """Install one generation; True when any file's content changed.

    The replaced secret files move to .previous/ (replacing an older
    previous generation) and stay there until `expire_previous`.
    """
    for n in (*secret_files, *public_files):
        _name(n, "file")
    sdir = secret_dir(runtime, service, secret)
    pdir = public_dir(runtime, service, secret)
    old_secret = _read_files(sdir)
    old_public = _read_files(pdir)
    changed = old_secret != dict(secret_files) or old_public != dict(public_files)
    _mkdir(sdir.parent, 0o755, None)
    _mkdir(sdir, dir_mode, owner)
    if changed and old_secret:
        prev = sdir / PREVIOUS
        shutil.rmtree(prev, ignore_errors=True)
        _mkdir(prev, dir_mode, owner)
        for name in old_secret:
            os.replace(sdir / name, prev / name)
        _write_atomic(prev / _RETIRED, f"{now}\n".encode(), 0o400, owner)
        fsync_dir(prev)
    if changed:
        for name, data in sorted(secret_files.items()):
            _write_atomic(sdir / name, data, 0o400, owner)
        if public_files:
            _mkdir(pdir.parent, 0o755, None)
            _mkdir(pdir, 0o755, None)
        for name, data in sorted(public_files.items()):
            _write_atomic(pdir / name, data, 0o444, None)
        for name in set(old_public) - set(public_files):
            (pdir / name).unlink(missing_ok=True)
        if pdir.is_dir():
            fsync_dir(pdir)
    _write_atomic(sdir / _GENERATION, f"{generation}\n".encode(), 0o400, owner)
    fsync_dir(sdir)
    return changed


def expire_previous(runtime: Path, now: int, grace: int = DEFAULT_GRACE) -> list[tuple[str, str]]:
    """Delete previous generations retired at least `grace` seconds ago; (service, secret) each."""
    removed = []
    for service, secret in installed(runtime):
        prev = secret_dir(runtime, service, secret) / PREVIOUS
        try:
            retired = int((prev / _RETIRED).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            retired = 0  # unreadable marker: expire rather than keep a secret forever
        if now - retired >= grace:
            shutil.rmtree(prev, ignore_errors=True)
            removed.append((service, secret))
    return removed


def installed(runtime: Path) -> list[tuple[str, str]]:
    """(service, secret) of every instance with a directory under RUNTIME/secrets, sorted."""
    root = Path(runtime) / "secrets"
    out = []
    if not root.is_dir():
        return out
    for sdir in root.iterdir():
        if not sdir.is_dir() or not valid_file_name(sdir.name):
            continue
        for xdir in sdir.iterdir():
            if xdir.is_dir() and valid_file_name(xdir.name):
                out.append((sdir.name, xdir.name))
    return sorted(out)


def remove(runtime: Path, service: str, secret: str) -> bool:
    """Delete an instance's secret and public files; True if anything was there."""
    found = False
    for d in (secret_dir(runtime, service, secret), public_dir(runtime, service, secret)):
        if d.exists():
            shutil.rmtree(d)
            found = True
        try:
            d.parent.rmdir()  # the service dir, when this was its last secret
        except OSError:
            pass
    return found
