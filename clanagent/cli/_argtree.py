"""The argparse tree of a CLI as plain data: what completion scripts, man pages
and the tests read, so all three follow the parser and never a copy of it.

Owns: walking an `ArgumentParser` into `Command`s (path, help, options,
positionals, subcommands).  Must never: change the parser it walks.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Option", "Positional", "Command", "walk", "leaves"]


@dataclass(frozen=True, slots=True)
class Option:
    flags: tuple[str, ...]  # "-f", "--follow"
    help: str
    takes_value: bool
    metavar: str
    choices: tuple[str, ...] = ()
    kind: str = ""  # "file", "dir" or "" (what a shell should complete)


@dataclass(frozen=True, slots=True)
class Positional:
    name: str
    help: str
    choices: tuple[str, ...] = ()
    kind: str = ""
    rest: bool = False  # takes everything after it (ssh's arguments)


@dataclass(slots=True)
class Command:
    path: tuple[str, ...]  # () for the program itself, ("inventory", "show") ...
    help: str
    description: str
    parser: argparse.ArgumentParser
    options: list[Option] = field(default_factory=list)
    positionals: list[Positional] = field(default_factory=list)
    subcommands: list[Command] = field(default_factory=list)


# What a shell completes for a value, by the argument's dest (explicit: a
# heuristic would offer files for `machine add --key`, which takes a key text).
FILE_DESTS = frozenset({"socket", "control_socket", "config", "admin_key", "out", "file"})
DIR_DESTS = frozenset({"state_dir", "dir"})


def _kind(action: argparse.Action) -> str:
    if action.dest in DIR_DESTS:
        return "dir"
    return "file" if action.dest in FILE_DESTS else ""


def _text(value: str | None) -> str:
    return "" if not value or value == argparse.SUPPRESS else " ".join(value.split())


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = (), help: str = "") -> Command:
    cmd = Command(path, _text(help), _text(parser.description), parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            seen: set[int] = set()
            for name, child in action.choices.items():
                if id(child) in seen:  # an alias
                    continue
                seen.add(id(child))
                cmd.subcommands.append(walk(child, (*path, name), helps.get(name) or ""))
        elif action.option_strings:
            if action.help == argparse.SUPPRESS:
                continue
            takes = action.nargs != 0
            metavar = action.metavar or action.dest.upper()
            cmd.options.append(
                Option(
                    tuple(action.option_strings),
                    _text(action.help),
                    takes,
                    str(metavar) if takes else "",
                    tuple(str(c) for c in action.choices or ()) if takes else (),
                    _kind(action) if takes else "",
                )
            )
        else:
            cmd.positionals.append(
                Positional(
                    str(action.metavar or action.dest),
                    _text(action.help),
                    tuple(str(c) for c in action.choices or ()),
                    _kind(action),
                    action.nargs == argparse.REMAINDER,
                )
            )
    return cmd


def leaves(root: Command) -> Iterator[Command]:
    """Every command that runs something (has no subcommands), depth first."""
    if not root.subcommands:
        yield root
    for sub in root.subcommands:
        yield from leaves(sub)
