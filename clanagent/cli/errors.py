"""The one error a command of either CLI (`clanagent`, `clanctl`) raises for the user.

Owns: `CommandError`, a user-facing failure printed as one line (the
program's name, then the message) with its exit code.  Must never carry a
traceback to the user: whatever a command cannot do for a reason the user
can fix becomes a CommandError naming the fix.
"""

from __future__ import annotations

__all__ = ["CommandError"]


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code `exit_code` (1 unless said)."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
