"""clanctl's one test for "this agent is not in a clan", shared by every command.

Owns: deciding, with one `status` call, whether an empty answer or an
`unavailable` error means the agent has no clan (exit code 5, `Exit.NO_CLAN`)
and saying what to do about it.  Must never: be asked on the normal path
(only after an empty or refused answer, so a command costs no extra round
trip when all is well).
"""

from __future__ import annotations

from typing import Any

from ..control.client import ControlClient
from .errors import NOT_IN_CLAN_HINT, CommandError, Exit

__all__ = ["clan_of", "require_clan", "no_clan_error"]


def clan_of(client: ControlClient) -> dict[str, Any] | None:
    """The agent's clan ({"id", "name"}) or None."""
    clan = client.call("status").get("clan")
    return clan if isinstance(clan, dict) else None


def no_clan_error(client: ControlClient) -> CommandError | None:
    """The CommandError (exit 5) when the agent has no clan, or no inventory of it yet."""
    clan = clan_of(client)
    if clan is None:
        return CommandError(
            f"this agent is not in a clan yet: {NOT_IN_CLAN_HINT}", exit_code=Exit.NO_CLAN
        )
    shown = client.call("inventory.show")
    if shown.get("doc") is None:
        return CommandError(
            f"this agent joined clan '{clan.get('name')}' but its inventory has not arrived "
            "yet: is a member reachable? (see 'clanctl peers')",
            exit_code=Exit.NO_CLAN,
        )
    return None


def require_clan(client: ControlClient) -> None:
    """Raise the exit-5 CommandError unless the agent is in a clan with an inventory."""
    err = no_clan_error(client)
    if err is not None:
        raise err
