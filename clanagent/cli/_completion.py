"""Shell completion for bash, zsh and fish, generated from a CLI's argparse tree.

Owns: turning an `_argtree.Command` tree into one completion script per
shell: subcommands with their help, each command's options (with file,
directory or choice values) and file positionals.  Must never: run the
program to complete (the scripts are static data plus a small walker, so a
completion costs no Python start-up), or hand-list a command that the
parser does not have.

Why not shtab: it writes bash and zsh (and tcsh) but not fish, so fish would
need this generator anyway; one generator for all three keeps them alike.
"""

from __future__ import annotations

from ._argtree import Command, Option

__all__ = ["bash", "zsh", "fish"]


def _nodes(root: Command) -> list[Command]:
    out = [root]
    for sub in root.subcommands:
        out.extend(_nodes(sub))
    return out


def _key(prog: str, cmd: Command) -> str:
    return " ".join((prog, *cmd.path))


def _file_kind(cmd: Command) -> str:
    """What the command's first non-rest positional completes to ("file", "dir" or "")."""
    for p in cmd.positionals:
        if not p.rest and p.kind:
            return p.kind
    return ""


# -- bash ----------------------------------------------------------------------------------


def _bq(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def bash(prog: str, root: Command) -> str:
    fn = "_" + prog.replace("-", "_")
    lines = [
        f"# bash completion for {prog}; generated from its argparse parser by",
        "# scripts/cli_docs.py: do not edit (make cli-docs).",
        f"declare -gA {fn}_subs {fn}_opts {fn}_valopts {fn}_kind {fn}_choices",
    ]
    for cmd in _nodes(root):
        key = _key(prog, cmd)
        if cmd.subcommands:
            names = " ".join(s.path[-1] for s in cmd.subcommands)
            lines.append(f"{fn}_subs[{_bq(key)}]={_bq(names)}")
        flags = [f for o in cmd.options for f in o.flags]
        lines.append(f"{fn}_opts[{_bq(key)}]={_bq(' '.join(flags))}")
        valued = [o for o in cmd.options if o.takes_value]
        if valued:
            lines.append(
                f"{fn}_valopts[{_bq(key)}]={_bq(' '.join(f for o in valued for f in o.flags))}"
            )
        for o in valued:
            for f in o.flags:
                if o.kind:
                    lines.append(f"{fn}_kind[{_bq(key + ' ' + f)}]={o.kind}")
                if o.choices:
                    lines.append(f"{fn}_choices[{_bq(key + ' ' + f)}]={_bq(' '.join(o.choices))}")
        kind = _file_kind(cmd)
        if kind:
            lines.append(f"{fn}_kind[{_bq(key)}]={kind}")
    lines += [
        "",
        f"{fn}() {{",
        '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        f"    local path={prog} i w",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w="${COMP_WORDS[i]}"',
        "        if [[ $w == -* ]]; then",
        f'            [[ " ${{{fn}_valopts[$path]}} " == *" $w "* ]] && ((i++))',
        f'        elif [[ " ${{{fn}_subs[$path]}} " == *" $w "* ]]; then',
        '            path="$path $w"',
        "        fi",
        "    done",
        f'    if ((COMP_CWORD > 1)) && [[ " ${{{fn}_valopts[$path]}} " == *" $prev "* ]]; then',
        f'        case "${{{fn}_kind[$path $prev]}}" in',
        '            file) compopt -o filenames; COMPREPLY=($(compgen -f -- "$cur")) ;;',
        '            dir) compopt -o filenames; COMPREPLY=($(compgen -d -- "$cur")) ;;',
        f'            *) COMPREPLY=($(compgen -W "${{{fn}_choices[$path $prev]}}" -- "$cur")) ;;',
        "        esac",
        "        return 0",
        "    fi",
        "    if [[ $cur == -* ]]; then",
        f'        COMPREPLY=($(compgen -W "${{{fn}_opts[$path]}}" -- "$cur"))',
        f'    elif [[ -n "${{{fn}_subs[$path]}}" ]]; then',
        f'        COMPREPLY=($(compgen -W "${{{fn}_subs[$path]}}" -- "$cur"))',
        f'    elif [[ "${{{fn}_kind[$path]}}" == file ]]; then',
        '        compopt -o filenames; COMPREPLY=($(compgen -f -- "$cur"))',
        f'    elif [[ "${{{fn}_kind[$path]}}" == dir ]]; then',
        '        compopt -o filenames; COMPREPLY=($(compgen -d -- "$cur"))',
        "    fi",
        "    return 0",
        "}",
        f"complete -F {fn} {prog}",
        "",
    ]
    return "\n".join(lines)


# -- zsh -----------------------------------------------------------------------------------


def _zq(text: str) -> str:
    """A single-quoted zsh word."""
    return "'" + text.replace("'", "'\\''") + "'"


def _zhelp(text: str) -> str:
    """Help text inside an _arguments spec's [...]."""
    return text.replace("\\", "\\\\").replace("[", "\\[").replace("]", "\\]").replace(":", "\\:")


def _zmsg(text: str) -> str:
    return text.replace(":", " ").replace("\\", "") or " "


def _zaction(kind: str, choices: tuple[str, ...]) -> str:
    if choices:
        return "(" + " ".join(choices) + ")"
    return {"file": "_files", "dir": "_files -/"}.get(kind, " ")


def _zoption(o: Option, repeatable: bool) -> str:
    help_ = f"[{_zhelp(o.help)}]" if o.help else ""
    value = f":{_zmsg(o.metavar)}:{_zaction(o.kind, o.choices)}" if o.takes_value else ""
    star = "*" if repeatable else ""
    if len(o.flags) == 1:
        return _zq(f"{star}{o.flags[0]}{help_}{value}")
    excl = "(" + " ".join(o.flags) + ")"
    return _zq(excl if not star else "") + "{" + ",".join(o.flags) + "}" + _zq(f"{help_}{value}")


def zsh(prog: str, root: Command) -> str:
    lines = [
        f"#compdef {prog}",
        f"# zsh completion for {prog}; generated from its argparse parser by",
        "# scripts/cli_docs.py: do not edit (make cli-docs).",
        "",
    ]
    for cmd in reversed(_nodes(root)):
        fn = "_" + "_".join((prog, *cmd.path)).replace("-", "_")
        specs = []
        for o in cmd.options:
            action = cmd.parser._option_string_actions[o.flags[0]]
            specs.append(_zoption(o, type(action).__name__ == "_AppendAction"))
        lines.append(f"{fn}() {{")
        if cmd.subcommands:
            lines.append('    local curcontext="$curcontext" state line')
            lines.append("    _arguments -C \\")
            for s in specs:
                lines.append(f"        {s} \\")
            lines.append("        '1: :->command' \\")
            lines.append("        '*:: :->args'")
            lines.append("    case $state in")
            lines.append("        command)")
            lines.append("            local -a commands")
            lines.append("            commands=(")
            for sub in cmd.subcommands:
                lines.append(f"                {_zq(sub.path[-1] + ':' + sub.help)}")
            lines.append("            )")
            title = " ".join((prog, *cmd.path, "command"))
            lines.append(f"            _describe -t commands {_zq(title)} commands")
            lines.append("            ;;")
            lines.append("        args)")
            lines.append("            case $line[1] in")
            for sub in cmd.subcommands:
                subfn = "_" + "_".join((prog, *sub.path)).replace("-", "_")
                lines.append(f"                {sub.path[-1]}) {subfn} ;;")
            lines.append("            esac")
            lines.append("            ;;")
            lines.append("    esac")
        else:
            n = 0
            for p in cmd.positionals:
                if p.rest:
                    specs.append(_zq(f"*::{_zmsg(p.name)}:_normal"))
                else:
                    n += 1
                    specs.append(_zq(f"{n}:{_zmsg(p.name)}:{_zaction(p.kind, p.choices)}"))
            if specs:
                lines.append("    _arguments \\")
                for i, s in enumerate(specs):
                    lines.append(f"        {s}" + (" \\" if i < len(specs) - 1 else ""))
            else:
                lines.append("    _arguments")
        lines.append("}")
        lines.append("")
    lines.append(f'_{prog.replace("-", "_")} "$@"')
    lines.append("")
    return "\n".join(lines)


# -- fish ----------------------------------------------------------------------------------


def _fq(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def fish(prog: str, root: Command) -> str:
    fn = "__" + prog.replace("-", "_")
    nodes = _nodes(root)
    lines = [
        f"# fish completion for {prog}; generated from its argparse parser by",
        "# scripts/cli_docs.py: do not edit (make cli-docs).",
        "",
        f"function {fn}_subs",
        "    switch $argv[1]",
    ]
    for cmd in nodes:
        if cmd.subcommands:
            names = " ".join(s.path[-1] for s in cmd.subcommands)
            lines.append(f"        case {_fq(_key(prog, cmd))}")
            lines.append(f"            string split -- ' ' {_fq(names)}")
    lines += ["    end", "end", "", f"function {fn}_valopts", "    switch $argv[1]"]
    for cmd in nodes:
        flags = [f for o in cmd.options if o.takes_value for f in o.flags]
        if flags:
            lines.append(f"        case {_fq(_key(prog, cmd))}")
            lines.append(f"            string split -- ' ' {_fq(' '.join(flags))}")
    lines += [
        "    end",
        "end",
        "",
        "# The command the words typed so far name (subcommands only, options skipped).",
        f"function {fn}_path",
        "    set -l words (commandline -opc)",
        f"    set -l path {prog}",
        "    set -l skip 0",
        "    for w in $words[2..-1]",
        "        if test $skip = 1",
        "            set skip 0",
        "            continue",
        "        end",
        "        switch $w",
        "            case '-*'",
        f'                if contains -- $w ({fn}_valopts "$path")',
        "                    set skip 1",
        "                end",
        "            case '*'",
        f'                if contains -- $w ({fn}_subs "$path")',
        '                    set path "$path $w"',
        "                end",
        "        end",
        "    end",
        '    echo "$path"',
        "end",
        "",
        f"function {fn}_at",
        f'    test "$({fn}_path)" = "$argv[1]"',
        "end",
        "",
        f"complete -c {prog} -f",
    ]
    for cmd in nodes:
        cond = f"-n {_fq(f'{fn}_at {_fq(_key(prog, cmd))}')}"
        for sub in cmd.subcommands:
            lines.append(
                f"complete -c {prog} {cond} -a {_fq(sub.path[-1])} -d {_fq(sub.help or sub.path[-1])}"
            )
        for o in cmd.options:
            parts = []
            for f in o.flags:
                parts.append(f"-l {f[2:]}" if f.startswith("--") else f"-s {f[1:]}")
            if o.takes_value:
                if o.choices:
                    parts.append(f"-x -a {_fq(' '.join(o.choices))}")
                elif o.kind == "file":
                    parts.append("-r -F")
                elif o.kind == "dir":
                    parts.append("-x -a '(__fish_complete_directories)'")
                else:
                    parts.append("-x")
            desc = f" -d {_fq(o.help)}" if o.help else ""
            lines.append(f"complete -c {prog} {cond} {' '.join(parts)}{desc}")
        kind = _file_kind(cmd) if not cmd.subcommands else ""
        if kind == "file":
            lines.append(f"complete -c {prog} {cond} -F")
        elif kind == "dir":
            lines.append(f"complete -c {prog} {cond} -a '(__fish_complete_directories)'")
    lines.append("")
    return "\n".join(lines)
