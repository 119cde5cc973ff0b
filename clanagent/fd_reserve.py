"""Descriptors held back for work at the process's open-file limit.

Owns: a few descriptors on /dev/null, held while the agent is below its
open-file limit and lent out, all at once, while the control server serves
root or the agent's uid at that limit; whether they are lent now.
Must never: block, or hold more than its size.  While they are lent no
listener accepts and the gossip service dials nobody: the freed descriptors
are for the request that borrowed them (a lazy import, a durable write, the
store's work).

Accepting one connection on one spare descriptor answers `status` but leaves
nothing for the request itself: at the limit an admin's edit failed on a
module import. Descriptors are per process, so there is one reserve per
process (`PROCESS`); parts take it as an argument so tests can give their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DEFAULT_SIZE", "PROCESS", "FdReserve"]

DEFAULT_SIZE = 16  # one for the accepted connection, the rest for its request


class FdReserve:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError("an fd reserve holds at least one descriptor")
        self.size = size
        self._held: list[int] = []
        self._loans = 0

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def lent(self) -> bool:
        """True while a borrower uses the descriptors: listeners must not accept."""
        return self._loans > 0

    def fill(self) -> None:
        """Take descriptors back up to `size` (as many as the limit allows), unless lent."""
        while not self._loans and len(self._held) < self.size:
            try:
                self._held.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return  # still at the limit: fill again when something closes

    def borrow(self) -> bool:
        """Free every held descriptor for one borrower; False when none were held."""
        if not self._held and not self._loans:
            return False
        self._close_held()
        self._loans += 1
        return True

    def give_back(self) -> None:
        """One borrower is done; the last one refills the reserve."""
        if self._loans > 0:
            self._loans -= 1
        self.fill()

    @contextmanager
    def lending(self) -> Iterator[bool]:
        ok = self.borrow()
        try:
            yield ok
        finally:
            if ok:
                self.give_back()

    def close(self) -> None:
        self._close_held()

    def _close_held(self) -> None:
        while self._held:
            os.close(self._held.pop())


PROCESS = FdReserve()
