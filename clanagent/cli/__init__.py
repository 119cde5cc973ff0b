"""Command-line entry points: `clanagent` (the daemon and admin commands) and `clanctl`."""

__all__: list[str] = []
