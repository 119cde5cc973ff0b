"""VM console logs: size-capped files with N rotated copies, and tail/follow helpers.

Owns: rotating `console.log` -> `console.log.1` ... `console.log.N` and reading
the end of a log.  The VMM appends to `console.log` itself (opened O_APPEND)
so the log keeps growing while no agent runs; the agent rotates it by
copy-then-truncate, like logrotate's `copytruncate`: the VMM's file handle
stays valid, and the few bytes written between the copy and the truncate are
lost (accepted: it is a console log, not a journal).  This module must never
write to a guest or hold the log open between calls.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from clanagent.durable import atomic_open

__all__ = ["ConsoleLog", "DEFAULT_KEEP", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_BYTES = 1 << 20
DEFAULT_KEEP = 3


@dataclass(frozen=True)
class ConsoleLog:
    path: str
    max_bytes: int = DEFAULT_MAX_BYTES
    keep: int = DEFAULT_KEEP

    def rotated(self, i: int) -> str:
        return f"{self.path}.{i}"

    def size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def maybe_rotate(self) -> bool:
        """Rotate when the live file exceeds max_bytes; True when it did."""
        if self.size() <= self.max_bytes:
            return False
        self.rotate()
        return True

    def rotate(self) -> None:
        if self.keep <= 0:
            self._truncate()
            return
        for i in range(self.keep - 1, 0, -1):
            if os.path.exists(self.rotated(i)):
                os.replace(self.rotated(i), self.rotated(i + 1))
        with (
            open(self.path, "rb") as src,
            atomic_open(self.rotated(1), mode=0o644, sync=False) as dst,
        ):
            shutil.copyfileobj(src, dst)
        self._truncate()

    def _truncate(self) -> None:
        # Truncate in place (never unlink): the VMM keeps writing through its
        # O_APPEND descriptor, which lands at the new end of file.
        with open(self.path, "r+b") as f:
            f.truncate(0)

    def files(self) -> list[str]:
        """Existing log files, oldest first."""
        out = [self.rotated(i) for i in range(self.keep, 0, -1) if os.path.exists(self.rotated(i))]
        if os.path.exists(self.path):
            out.append(self.path)
        return out

    def tail(self, max_bytes: int = 64 * 1024) -> bytes:
        """The last `max_bytes` of the console, across the rotated copies."""
        chunks: list[bytes] = []
        need = max_bytes
        for path in reversed(self.files()):
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - need))
                data = f.read(need)
            chunks.append(data)
            need -= len(data)
            if need <= 0:
                break
        return b"".join(reversed(chunks))

    def contains(self, marker: bytes) -> bool:
        """Whether `marker` is in the live file or any rotated copy."""
        for path in self.files():
            with open(path, "rb") as f:
                if marker in f.read():
                    return True
        return False

    def read_from(self, offset: int = 0) -> tuple[int, bytes]:
        """Bytes of the live file after `offset`, and the offset to pass next time.

        Following a console is calling this in a loop.  A file shorter than
        `offset` was rotated meanwhile: read it again from the start.
        """
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                if size < offset:
                    offset = 0
                f.seek(offset)
                data = f.read(size - offset)
        except FileNotFoundError:
            return 0, b""
        return offset + len(data), data
