"""The console's fault ledger: every unexpected exception counted, each kind logged once.

Owns: the `internal_errors` count and the bounded set of (where, exception type)
pairs already logged with a traceback.  Must never: grow without bound, or stay
silent about a kind of fault it has not logged before (until the set is full).
"""

from __future__ import annotations

import logging

from .._log import kv

__all__ = ["Faults", "MAX_FAULT_KEYS"]

log = logging.getLogger("clanagent.web")

MAX_FAULT_KEYS = 256  # distinct (where, exception type) pairs logged with a traceback


class Faults:
    """Count every fault; log each (where, exception type) once, with its traceback."""

    def __init__(self, counters: dict[str, int]) -> None:
        self.counters = counters
        self._seen: set[tuple[str, str]] = set()

    def report(self, where: str, exc: BaseException) -> None:
        self.counters["internal_errors"] += 1
        key = (where, type(exc).__name__)
        if key in self._seen or len(self._seen) >= MAX_FAULT_KEYS:
            log.debug("web console fault (again)", extra=kv(where=where, error=repr(exc)))
            return
        self._seen.add(key)
        log.error(
            "web console fault: that request or connection ended, the console serves on",
            exc_info=exc,
            extra=kv(where=where, error=type(exc).__name__),
        )
