"""Plain log lines with key=value fields on stderr (journald-friendly).

Owns: the one log format of the agent.  Must never: write anything but
single lines (a newline in a value is escaped), or block the event loop on
anything slower than a write to stderr.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["setup_logging", "kv"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _quote(value: Any) -> str:
    s = str(value)
    if s == "" or any(c in s for c in ' "=\n\r\t'):
        s = (
            '"'
            + s.replace("\\", "\\\\")
            .replace('"', '\\"')
            .replace("\n", "\\n")
            .replace("\r", "\\r")
            .replace("\t", "\\t")
            + '"'
        )
    return s


def kv(**fields: Any) -> dict[str, Any]:
    """Structured fields for a log call: `log.info("joined", extra=kv(peer=x))`."""
    return {"kv": fields}


class _Formatter(logging.Formatter):
    def __init__(self, with_time: bool) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.with_time:
            parts.append("ts=" + self.formatTime(record, "%Y-%m-%dT%H:%M:%S"))
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"logger={record.name}")
        parts.append(f"msg={_quote(record.getMessage())}")
        for k, v in getattr(record, "kv", {}).items():
            parts.append(f"{k}={_quote(v)}")
        if record.exc_info:
            parts.append("exc=" + _quote(self.formatException(record.exc_info)))
        return " ".join(parts)


def setup_logging(level: str = "info", *, stream=None) -> None:
    """Send clanagent's logs to stderr as one line each.

    journald adds its own timestamps, so under systemd (JOURNAL_STREAM set) we
    leave ours out.
    """
    import os

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter(with_time="JOURNAL_STREAM" not in os.environ))
    root = logging.getLogger("clanagent")
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(level, logging.INFO))
    root.propagate = False
