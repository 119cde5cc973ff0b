"""The one error a command of either CLI (`clanagent`, `clanctl`) raises for the user,
and the one exit-code scheme both CLIs follow.

Owns: `CommandError`, a user-facing failure printed as one line (the
program's name, then the message) with its exit code, and `Exit`, the exit
codes (README "Exit codes" and `clanctl --help` show the same table).  Must
never carry a traceback to the user: whatever a command cannot do for a
reason the user can fix becomes a CommandError naming the fix.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["CommandError", "Exit", "EXIT_CODES_HELP", "NOT_IN_CLAN_HINT"]


class Exit(IntEnum):
    """Exit codes of `clanctl` and `clanagent` (one scheme; scripts may rely on it)."""

    OK = 0
    FAILED = 1  # the agent refused or failed the request, or the command failed
    USAGE = 2  # bad command line or config; `clanagent` could not start
    NO_AGENT = 3  # no agent at the socket, or it did not answer in time
    DENIED = 4  # permission denied (the socket, or the agent refused this user)
    NO_CLAN = 5  # the command needs a clan and this agent is in none (yet)
    INTERRUPTED = 130  # Ctrl-C


EXIT_CODES_HELP = """\
exit codes:
  0    ok
  1    the agent refused or failed the request, or the command failed
  2    usage: bad command line (or, for clanagent, bad config / could not start)
  3    no agent: nothing listening at the control socket, or no answer in time
  4    permission denied: the socket or the agent refused this user
  5    not in a clan: the command needs one ('clanctl clan init NAME' or
       'clanagent join TOKEN')
  130  interrupted"""

NOT_IN_CLAN_HINT = (
    "found a clan with 'clanctl clan init NAME', or join one with 'clanagent join TOKEN' "
    "(a member's admin prints the token with 'clanctl machine add' or 'clanctl invite')"
)


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit code `exit_code` (1 unless said)."""

    def __init__(self, message: str, *, exit_code: int = Exit.FAILED) -> None:
        super().__init__(message)
        self.exit_code = int(exit_code)
