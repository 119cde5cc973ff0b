"""Shell completion (bash, zsh, fish) and man pages, generated from the argparse
parsers into share/: up to date, complete, and working in the real shells."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from clanagent.cli import agent_main, clanctl
from clanagent.cli._argtree import leaves, walk

ROOT = Path(__file__).resolve().parent.parent
SHARE = ROOT / "share"
PROGS = {"clanctl": walk(clanctl._parser()), "clanagent": walk(agent_main._parser())}


def _all_commands():
    for prog, tree in PROGS.items():
        for cmd in leaves(tree):
            yield prog, cmd


def test_share_is_up_to_date_with_the_parsers():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cli_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_every_command_is_in_each_completion_and_man_page():
    for prog, cmd in _all_commands():
        key = " ".join((prog, *cmd.path))
        fn = "_".join((prog, *cmd.path)).replace("-", "_")
        assert f"_{prog}_opts['{key}']=" in (SHARE / "completion/bash" / prog).read_text(), key
        assert f"\n_{fn}() {{" in (SHARE / "completion/zsh" / f"_{prog}").read_text(), key
        fish = (SHARE / "completion/fish" / f"{prog}.fish").read_text()
        assert f"__{prog}_at \\'{key}\\'" in fish, key
        man = (SHARE / "man/man1" / f"{prog}.1").read_text()
        assert f".SS \\fB{key.replace('-', chr(92) + '-')}\\fR" in man, key


def test_the_man_pages_render_without_warnings():
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    for prog in PROGS:
        page = SHARE / "man/man1" / f"{prog}.1"
        r = subprocess.run(
            ["groff", "-man", "-Tutf8", "-ww", str(page)], capture_output=True, text=True
        )
        assert r.returncode == 0 and r.stderr == "", r.stderr
        text = re.sub(".\x08", "", r.stdout)  # no bold by overstriking
        assert "EXIT STATUS" in text and "not in a clan" in text
        if prog == "clanctl":
            assert "clanctl inventory apply [options] FILE" in text and "--json" in text


# -- bash ------------------------------------------------------------------------------------


def bash_complete(prog: str, *words: str) -> list[str]:
    # compopt only works while bash runs a completion; outside it, a no-op
    script = (
        "compopt() { :; }\n"
        f"source {SHARE / 'completion/bash' / prog}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=()\n'
        f"_{prog}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(
        ["bash", "-c", script, "bash", prog, *words], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_bash_completes_commands_options_and_files(tmp_path):
    assert bash_complete("clanctl", "inventory", "") == [
        "show",
        "diff",
        "apply",
        "history",
        "conflicts",
    ]
    assert set(bash_complete("clanctl", "")) >= {"status", "peers", "inventory", "vm", "ui"}
    # options (and the one --json of every command), after an option with a value
    assert bash_complete("clanctl", "--socket", "/tmp/s", "sta") == ["status"]
    assert set(bash_complete("clanctl", "inventory", "apply", "--")) == {
        "--help",
        "--admin-key",
        "--message",
        "--yes",
        "--json",
    }
    assert bash_complete("clanctl", "status", "--j") == ["--json"]
    (tmp_path / "inventory.toml").write_text("")
    assert bash_complete("clanctl", "inventory", "diff", str(tmp_path / "inv")) == [
        str(tmp_path / "inventory.toml")
    ]
    assert bash_complete("clanctl", "ui", "--admin-key", str(tmp_path / "inv")) == [
        str(tmp_path / "inventory.toml")
    ]
    assert bash_complete("clanctl", "machine", "add", "--key", "") == []  # a key, not a file
    assert bash_complete("clanagent", "run", "--log-level", "") == [
        "debug",
        "info",
        "warning",
        "error",
    ]
    assert bash_complete("clanagent", "keygen", "--state-dir", str(tmp_path)) == [str(tmp_path)]


# -- fish ------------------------------------------------------------------------------------


def fish_complete(prog: str, line: str) -> list[str]:
    r = subprocess.run(
        [
            "fish",
            "--no-config",
            "-c",
            f"source {SHARE / 'completion/fish' / f'{prog}.fish'}; complete -C {line!r}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return [ln.split("\t")[0] for ln in r.stdout.splitlines()]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_completes_commands_options_and_files(tmp_path):
    assert fish_complete("clanctl", "clanctl inventory ") == sorted(
        ["show", "diff", "apply", "history", "conflicts"]
    )
    assert fish_complete("clanctl", "clanctl --timeout 3 sec") == ["secrets"]
    assert set(fish_complete("clanctl", "clanctl inventory apply --")) == {
        "--help",
        "--admin-key",
        "--message",
        "--yes",
        "--json",
    }
    (tmp_path / "inventory.toml").write_text("")
    assert fish_complete("clanctl", f"clanctl inventory diff {tmp_path}/inv") == [
        f"{tmp_path}/inventory.toml"
    ]
    assert fish_complete("clanagent", "clanagent run --log-level ") == [
        "debug",
        "error",
        "info",
        "warning",
    ]


# -- zsh -------------------------------------------------------------------------------------

_ZSH_HARNESS = r"""
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z "PS1='>'; fpath=($1 \$fpath); autoload -Uz compinit; compinit -u -d $2; LISTMAX=10000; print RE''ADY"
zpty -r z line '*READY*'
zpty -w -n z "$3"$'\t'
zpty -r z out "*$4*"
print -r -- "$out"
zpty -d z
"""


def zsh_complete(line: str, until: str, tmp_path: Path) -> str:
    """The screen after Tab at the end of `line` in an interactive zsh, read until `until`."""
    harness = tmp_path / "harness.zsh"
    harness.write_text(_ZSH_HARNESS)
    r = subprocess.run(
        [
            "zsh",
            "-f",
            str(harness),
            str(SHARE / "completion/zsh"),
            str(tmp_path / "zcompdump"),
            line,
            until,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"TERM": "dumb", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes_commands_and_options(tmp_path):
    out = zsh_complete("clanctl inventory ", "show", tmp_path)
    for name in ("apply", "conflicts", "diff", "history", "show"):
        assert name in out
    assert "validate, diff, sign and submit FILE" in out
    out = zsh_complete("clanctl inventory apply --", "--yes", tmp_path)
    for flag in ("--admin-key", "--message", "--json", "--yes"):
        assert flag in out
    out = zsh_complete("clanagent run --log-level ", "warning", tmp_path)
    assert all(level in out for level in ("debug", "info", "warning", "error"))


def test_every_shell_accepts_its_script():
    for prog in PROGS:
        subprocess.run(["bash", "-n", str(SHARE / "completion/bash" / prog)], check=True)
        if shutil.which("zsh"):
            subprocess.run(["zsh", "-n", str(SHARE / "completion/zsh" / f"_{prog}")], check=True)
        if shutil.which("fish"):
            subprocess.run(
                ["fish", "--no-execute", str(SHARE / "completion/fish" / f"{prog}.fish")],
                check=True,
            )
