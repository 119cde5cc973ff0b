"""clanctl's and clanagent's conventions, for every command of the parser tree:
`--json` before or after the command, `--version`, usage errors, and the one
exit-code scheme (README "Exit codes" and `clanctl --help`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from clanagent.cli import agent_main, clanctl
from clanagent.cli._argtree import leaves, walk
from clanagent.cli.errors import EXIT_CODES_HELP, Exit
from clanagent.control.client import ClientError, ControlClient

ROOT = Path(__file__).resolve().parent.parent
TREE = walk(clanctl._parser())
LEAVES = [c for c in leaves(TREE)]
AGENT_LEAVES = [c for c in leaves(TREE) if c.path != ("tor-connect",)]


def sample_argv(cmd) -> list[str]:
    """The command with a value for each positional and required option."""
    argv = list(cmd.path)
    for action in cmd.parser._actions:
        if action.option_strings and action.required:
            argv += [action.option_strings[-1], "1"]
    for p in cmd.positionals:
        if not p.rest:
            argv.append("1")
    return argv


def ids(cmds):
    return [" ".join(c.path) for c in cmds]


def test_the_tree_has_the_commands_we_document():
    names = set(ids(LEAVES))
    assert {"status", "peers", "inventory diff", "machine add", "vm console", "ui"} <= names
    assert len(LEAVES) >= 28


@pytest.mark.parametrize("cmd", LEAVES, ids=ids(LEAVES))
def test_json_before_or_after_the_command(cmd):
    p = clanctl._parser()
    argv = sample_argv(cmd)
    assert p.parse_args(argv).json is False
    assert p.parse_args(["--json", *argv]).json is True
    # after the command (ssh passes everything after MACHINE to ssh: its
    # own options go before MACHINE, as its --help says)
    n = len(cmd.path)
    assert p.parse_args([*argv[:n], "--json", *argv[n:]]).json is True
    if not any(pos.rest for pos in cmd.positionals):
        assert p.parse_args([*argv, "--json"]).json is True


@pytest.mark.parametrize("cmd", LEAVES, ids=ids(LEAVES))
def test_every_commands_help_shows_json(cmd):
    text = cmd.parser.format_help()
    assert re.search(r"^\s+--json\s+print JSON", text, re.M), text


def test_version(capsys):
    from clanagent import __version__

    with pytest.raises(SystemExit) as exc:
        clanctl.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"clanctl {__version__}"


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf", "soon"])
def test_a_bad_timeout_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exc:
        clanctl.main(["--timeout", value, "status"])
    assert exc.value.code == Exit.USAGE
    err = capsys.readouterr().err
    assert "argument --timeout" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [
        ["events", "--count", "-3"],
        ["vm", "logs", "web", "--timeout", "-1"],
        ["vm", "console", "web", "--linger", "nan"],
    ],
)
def test_other_bad_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        clanctl.main(argv)
    assert exc.value.code == Exit.USAGE
    assert "Traceback" not in capsys.readouterr().err


# -- the exit-code scheme ---------------------------------------------------------------


def test_help_and_readme_show_the_same_exit_codes():
    text = clanctl._parser().format_help()
    assert EXIT_CODES_HELP in text
    assert EXIT_CODES_HELP in agent_main._parser().format_help()
    readme = (ROOT / "README.md").read_text()
    assert EXIT_CODES_HELP in readme, "README's exit-code table differs from errors.EXIT_CODES_HELP"
    for code in Exit:
        assert re.search(rf"^  {code.value}\s", EXIT_CODES_HELP, re.M), code


@pytest.mark.parametrize("cmd", LEAVES, ids=ids(LEAVES))
def test_usage_errors_exit_2(cmd, capsys):
    argv = sample_argv(cmd)
    n = len(cmd.path)
    with pytest.raises(SystemExit) as exc:
        clanctl.main([*argv[:n], "--no-such-option", *argv[n:]])
    assert exc.value.code == Exit.USAGE
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", AGENT_LEAVES, ids=ids(AGENT_LEAVES))
def test_no_agent_exits_3_for_every_command(cmd, tmp_path, capsys):
    for pre in ([], ["--json"]):
        rc = clanctl.main(["--socket", str(tmp_path / "nope.sock"), *pre, *sample_argv(cmd)])
        out = capsys.readouterr()
        assert rc == Exit.NO_AGENT, out.err
        assert out.out == "" and "clanagent is not running (no socket" in out.err


def test_a_directory_at_the_socket_path_is_named(tmp_path, capsys):
    rc = clanctl.main(["--socket", str(tmp_path), "status"])
    assert rc == Exit.NO_AGENT
    err = capsys.readouterr().err
    assert f"{tmp_path} is a directory, not the agent's control socket" in err
    assert "nobody listening" not in err


def test_a_file_at_the_socket_path_is_no_agent(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert clanctl.main(["--socket", str(tmp_path / "f"), "status"]) == Exit.NO_AGENT
    assert "f is a regular file, not the agent's control socket" in capsys.readouterr().err


def _fake_agent(monkeypatch, error: ClientError | None, *, on_connect: bool = False):
    def connect(self):
        if on_connect and error is not None:
            raise error

    def call(self, method, params=None, **kw):
        if error is not None:
            raise error
        return {"clan": None} if method == "status" else {}

    monkeypatch.setattr(ControlClient, "connect", connect)
    monkeypatch.setattr(ControlClient, "call", call)


@pytest.mark.parametrize("on_connect", [True, False])
def test_permission_denied_exits_4(monkeypatch, capsys, on_connect):
    _fake_agent(monkeypatch, ClientError("permission_denied", "no, not you"), on_connect=on_connect)
    assert clanctl.main(["--socket", "/x", "whoami"]) == Exit.DENIED
    assert capsys.readouterr().err == "clanctl: no, not you\n"


def test_no_answer_in_time_exits_3(monkeypatch, capsys):
    _fake_agent(monkeypatch, ClientError("timeout", "the agent did not answer in time"))
    assert clanctl.main(["--socket", "/x", "status"]) == Exit.NO_AGENT


def test_a_refused_request_exits_1(monkeypatch, capsys):
    _fake_agent(monkeypatch, ClientError("invalid_params", "no machine 'x'"))
    assert clanctl.main(["--socket", "/x", "invite", "x"]) == Exit.FAILED


def test_unavailable_for_another_reason_than_no_clan_exits_1(monkeypatch, capsys):
    """'unavailable' in a clan (the agent is starting, busy) is not exit 5."""

    def call(self, method, params=None, **kw):
        if method == "status":
            return {"clan": {"id": "00", "name": "home"}}
        if method == "inventory.show":
            return {"doc": {"clan": {}}}
        raise ClientError("unavailable", "the agent is still starting; try again")

    monkeypatch.setattr(ControlClient, "connect", lambda self: None)
    monkeypatch.setattr(ControlClient, "call", call)
    assert clanctl.main(["--socket", "/x", "path", "beta"]) == Exit.FAILED
    assert "still starting" in capsys.readouterr().err


# -- clanagent ----------------------------------------------------------------------------


def test_clanagent_version(capsys):
    with pytest.raises(SystemExit) as exc:
        agent_main.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.startswith("clanagent ")


@pytest.mark.parametrize(
    "flags",
    [["--listen", "nonsense"], ["--join", "nonsense"], ["--listen", "h:99999"], ["--join", ""]],
)
def test_a_bad_flag_value_blames_the_flag_not_the_config(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        agent_main.main(["run", *flags])
    assert exc.value.code == Exit.USAGE
    err = capsys.readouterr().err
    assert f"argument {flags[0]}" in err and "is not HOST:PORT" in err
    assert "agent.toml" not in err and "Traceback" not in err


def test_an_empty_listen_still_means_do_not_listen():
    args = agent_main._parser().parse_args(["run", "--listen", ""])
    assert args.listen == "" and agent_main._overrides(args)["gossip.listen"] == ""


def _token() -> str:
    import nacl.signing

    from clanagent.inventory.token import make_token

    admin = nacl.signing.SigningKey.generate()
    return make_token(b"\x07" * 16, "home", [bytes(admin.verify_key)], ["127.0.0.1:7946"], "m2")


def test_join_writes_to_the_state_dir_of_the_config(tmp_path, capsys, monkeypatch):
    from clanagent import config
    from clanagent.inventory.anchor import load_anchor

    state = tmp_path / "from-config"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'state_dir = "{state}"\n')
    assert agent_main.main(["join", _token(), "--config", str(cfg)]) == 0
    assert load_anchor(state).name == "home"
    # the default config file is read the same way (agent.toml without --config)
    other = tmp_path / "default-state"
    default = tmp_path / "default.toml"
    default.write_text(f'state_dir = "{other}"\n')
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", default)
    assert agent_main.main(["join", _token()]) == 0
    assert load_anchor(other).machine == "m2"
    # --state-dir still wins
    flag = tmp_path / "flag"
    assert agent_main.main(["join", _token(), "--config", str(cfg), "--state-dir", str(flag)]) == 0
    assert load_anchor(flag).name == "home"
    capsys.readouterr()


def test_join_with_a_missing_config_is_a_usage_error(tmp_path, capsys):
    rc = agent_main.main(["join", _token(), "--config", str(tmp_path / "nope.toml")])
    assert rc == Exit.USAGE
    assert "no such config file" in capsys.readouterr().err


def test_the_subcommand_json_flag_does_not_undo_the_global_one():
    """argparse copies a subparser's defaults over the parent's: ours is SUPPRESS."""
    p = clanctl._parser()
    for cmd in LEAVES:
        for action in cmd.parser._actions:
            if "--json" in action.option_strings:
                assert action.default is argparse.SUPPRESS, cmd.path
    assert p.parse_args(["--json", "inventory", "show"]).json is True
