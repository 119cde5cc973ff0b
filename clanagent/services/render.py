"""Service imports on disk, and the reload hook.

Owns: the files a consuming service reads, RUNTIME/services/SERVICE/imports.json
(every provider and value) and RUNTIME/services/SERVICE/imports.env (KEY="value"
lines that both a POSIX shell and systemd's EnvironmentFile= read), written
atomically with mode 0644 (export values are public by construction); the
removal of those files when this machine stops consuming a service; and
running a service's reload command.

Must never: rewrite a file whose content did not change (that is what keeps
reloads to real changes), write a line a shell or systemd would read
differently from what we meant, touch files under RUNTIME/services that are not
ours, or let a failing reload command raise into the agent.

`render_imports` is blocking file I/O on small files; the agent calls it with
`trio.to_thread.run_sync`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from clanagent._log import kv
from clanagent.durable import atomic_write, temp_pattern
from clanagent.inventory.parse import NAME_RE
from clanagent.services.wiring import Rendered, ServiceImports, ServicesLocalError, check_value

__all__ = [
    "IMPORTS_JSON",
    "IMPORTS_ENV",
    "FILE_MODE",
    "DIR_MODE",
    "DEFAULT_RELOAD_TIMEOUT",
    "RenderResult",
    "env_text",
    "json_text",
    "service_dir",
    "render_imports",
    "run_reload",
]

log = logging.getLogger(__name__)

IMPORTS_JSON = "imports.json"
IMPORTS_ENV = "imports.env"
FILE_MODE = 0o644
DIR_MODE = 0o755
DEFAULT_RELOAD_TIMEOUT = 30.0
_OURS = (IMPORTS_JSON, IMPORTS_ENV)
_ENV_NAME_RE = re.compile(r"[A-Z_][A-Z0-9_]*")
# Inside double quotes, these are the characters that a POSIX shell and
# systemd's env-file parser both read as escapable, and treat the same way.
_DQ_ESCAPE = str.maketrans({"\\": "\\\\", '"': '\\"', "$": "\\$", "`": "\\`"})


@dataclass(frozen=True, slots=True)
class RenderResult:
    """Which services' import files changed (reload them) and which were removed."""

    changed: tuple[str, ...]
    removed: tuple[str, ...]


def env_text(env: Mapping[str, str]) -> str:
    """The imports.env content: sorted KEY="value" lines.

    Values are double-quoted with \\ " $ ` escaped, which a shell (`. file`) and
    systemd (EnvironmentFile=) both turn back into the exact value.  Values
    with a newline or other control character cannot be written this way and
    are refused (ServicesLocalError); `wiring` never produces them.
    """
    lines = []
    for key, value in sorted(env.items()):
        if not _ENV_NAME_RE.fullmatch(key):
            raise ServicesLocalError(f"{key!r} is not an environment variable name")
        why = check_value(value)
        if why is not None:
            raise ServicesLocalError(f"env {key}: {why}")
        lines.append(f'{key}="{value.translate(_DQ_ESCAPE)}"\n')
    return "".join(lines)


def json_text(imports: ServiceImports) -> str:
    """The imports.json content: sorted keys, so equal imports give equal bytes."""
    return json.dumps(imports.to_json(), sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def service_dir(runtime_dir: Path, service: str) -> Path:
    """RUNTIME/services/SERVICE (the service name is checked: it becomes a path)."""
    if not NAME_RE.fullmatch(service):
        raise ServicesLocalError(f"{service!r} is not a service name")
    return Path(runtime_dir) / "services" / service


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically replace `path` with `data` (mode 0644) unless it already holds exactly that."""
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o7777) == FILE_MODE:
            return False
    except FileNotFoundError:
        pass
    # Consumers run as other users and must read these: 0644, whatever the umask.
    atomic_write(path, data, mode=FILE_MODE)
    return True


def _remove_service(d: Path) -> bool:
    removed = False
    for name in _OURS:
        try:
            (d / name).unlink()
            removed = True
        except FileNotFoundError:
            pass
    for name in _OURS:
        for leftover in d.glob(temp_pattern(name)):  # from a crash mid-write
            leftover.unlink(missing_ok=True)
    try:
        d.rmdir()  # only if empty: whatever else is there is not ours
    except OSError:
        pass
    return removed


def render_imports(runtime_dir: Path, rendered: Rendered) -> RenderResult:
    """Bring RUNTIME/services/ in line with `rendered`; say which services changed.

    A service is in `changed` when its imports.json or imports.env was
    (re)written; run its reload command then and only then.  Services this
    machine no longer consumes lose both files (and their directory if it is
    left empty) and are listed in `removed`.
    """
    root = Path(runtime_dir) / "services"
    changed = []
    for service, imports in sorted(rendered.services.items()):
        d = service_dir(runtime_dir, service)
        env = env_text(imports.env).encode()
        js = json_text(imports).encode()
        d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(d, DIR_MODE)
        # json first: a reader that sees the new env can rely on the new json.
        wrote_json = _write_if_changed(d / IMPORTS_JSON, js)
        wrote_env = _write_if_changed(d / IMPORTS_ENV, env)
        if wrote_json or wrote_env:
            changed.append(service)
    removed = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name in rendered.services or not NAME_RE.fullmatch(d.name):
                continue
            if d.is_dir() and not d.is_symlink() and _remove_service(d):
                removed.append(d.name)
    return RenderResult(tuple(changed), tuple(removed))


def _tail(data: bytes, limit: int = 400) -> str:
    text = data.decode("utf-8", "replace").strip()
    text = " | ".join(line for line in text.splitlines() if line.strip())
    return text[-limit:]


async def run_reload(command: str, *, timeout: float = DEFAULT_RELOAD_TIMEOUT) -> tuple[bool, str]:
    """Run a reload command (no shell: shlex.split into argv) with a timeout.

    Returns (ok, message) and never raises for a failing command: a missing
    program, a non-zero exit or a timeout is logged and reported in the
    message.  An empty command is a success with nothing run.
    """
    if not command.strip():
        return True, "no reload command"
    try:
        argv = shlex.split(command)
    except ValueError as e:
        msg = f"cannot parse reload command {command!r}: {e}"
        log.warning("reload failed", extra=kv(command=command, error=msg))
        return False, msg
    proc = None
    with trio.move_on_after(timeout) as scope:
        try:
            proc = await trio.run_process(
                argv,
                stdin=b"",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        except OSError as e:
            msg = f"cannot run {argv[0]!r}: {e.strerror or e}"
            log.warning("reload failed", extra=kv(command=command, error=msg))
            return False, msg
    if scope.cancelled_caught or proc is None:
        msg = f"{argv[0]!r} timed out after {timeout:g} s"
        log.warning("reload failed", extra=kv(command=command, error=msg))
        return False, msg
    if proc.returncode != 0:
        tail = _tail(proc.stderr) or _tail(proc.stdout)
        msg = f"{argv[0]!r} exited with status {proc.returncode}" + (f": {tail}" if tail else "")
        log.warning("reload failed", extra=kv(command=command, error=msg))
        return False, msg
    log.info("reloaded", extra=kv(command=command))
    return True, "ok"
