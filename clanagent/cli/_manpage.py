"""Man pages (roff, section 1) generated from a CLI's argparse tree.

Owns: NAME, SYNOPSIS, DESCRIPTION, OPTIONS, one subsection per command with
its usage, help and options, then the sections the caller adds (EXIT
STATUS, ENVIRONMENT, FILES, SEE ALSO).  Must never: carry a date or anything
else that changes between two runs on the same parser (a test compares the
committed pages with a fresh render).
"""

from __future__ import annotations

import re

from ._argtree import Command, Option

__all__ = ["render"]


def _esc(text: str) -> str:
    """Plain text for roff: backslashes and hyphens escaped, no line opening a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def _b(text: str) -> str:
    return f"\\fB{_esc(text)}\\fR"


def _i(text: str) -> str:
    return f"\\fI{_esc(text)}\\fR"


def _option_line(o: Option) -> str:
    flags = ", ".join(_b(f) for f in o.flags)
    return f"{flags} {_i(o.metavar)}" if o.takes_value else flags


def _usage(prog: str, cmd: Command) -> str:
    words = [_b(" ".join((prog, *cmd.path)))]
    if any(o for o in cmd.options if "--help" not in o.flags):
        words.append("[\\fIoptions\\fR]")
    if cmd.subcommands:
        words.append(_i("COMMAND"))
    for p in cmd.positionals:
        words.append(f"[{_i(p.name.upper())} ...]" if p.rest else _i(p.name.upper()))
    return " ".join(words)


def _options(cmd: Command, *, skip: tuple[str, ...] = ()) -> list[str]:
    out: list[str] = []
    for o in cmd.options:
        if "--help" in o.flags or o.flags[0] in skip:
            continue
        out += [".TP", _option_line(o), _esc(o.help or "")]
        if o.choices:
            out[-1] += f" (one of: {_esc(', '.join(o.choices))})"
    return out


def _commands(prog: str, cmd: Command, skip: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for sub in cmd.subcommands:
        if not sub.subcommands:
            out += [".SS " + _usage(prog, sub), _esc(sub.description or sub.help)]
            for p in sub.positionals:
                if p.help:
                    out += [".TP", _i(p.name.upper()), _esc(p.help)]
            out += _options(sub, skip=skip)
        out += _commands(prog, sub, skip)
    return out


def render(
    prog: str,
    root: Command,
    *,
    version: str,
    summary: str,
    sections: dict[str, str],
    common: tuple[str, ...] = (),
) -> str:
    """The man page; `sections` maps a title (e.g. "EXIT STATUS") to preformatted text.

    `common`: options every command takes (`--json`), described once under
    OPTIONS instead of under each command."""
    lines = [
        f'.\\" generated from the argparse parser of {prog} by scripts/cli_docs.py; do not edit',
        f'.TH {prog.upper()} 1 "" "clanagent {version}" "User Commands"',
        ".SH NAME",
        f"{prog} \\- {_esc(summary)}",
        ".SH SYNOPSIS",
        _usage(prog, root),
        ".SH DESCRIPTION",
        _esc(root.description),
        ".SH OPTIONS",
        *_options(root),
        ".SH COMMANDS",
        *_commands(prog, root, common),
    ]
    for title, text in sections.items():
        lines += [f".SH {title}", ".nf", _esc(text.rstrip("\n")), ".fi"]
    return "\n".join(lines) + "\n"
