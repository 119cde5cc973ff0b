"""One CommandError for both CLIs: a user error is one line on stderr and an exit code."""

from __future__ import annotations

import pytest

from clanagent.cli import _inventory_cmds, _mesh_cmds, _services_cmds, agent_main, clanctl
from clanagent.cli.errors import CommandError


def test_every_command_module_raises_the_one_command_error():
    for module in (_inventory_cmds, _mesh_cmds, _services_cmds, clanctl, agent_main):
        assert module.CommandError is CommandError


def test_clanagent_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "agent.toml"
    bad.write_text("this is = = not toml\n")
    assert agent_main.main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clanagent: config error:") and err.count("\n") == 1
    assert agent_main.main(["join", "not-a-token", "--state-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clanagent: bad join token:") and "Traceback" not in err


def test_clanctl_prints_a_command_error_with_its_exit_code(tmp_path, capsys, monkeypatch):
    def fail(client, args):
        raise CommandError("no such thing: fix it like this", exit_code=3)

    monkeypatch.setattr(_inventory_cmds, "cmd_invite", fail)
    monkeypatch.setattr(clanctl.ControlClient, "connect", lambda self: None)
    assert clanctl.main(["--socket", str(tmp_path / "s"), "invite", "m1"]) == 3
    assert capsys.readouterr().err == "clanctl: no such thing: fix it like this\n"


def test_the_default_exit_code_is_1():
    assert CommandError("x").exit_code == 1
    with pytest.raises(CommandError, match="x"):
        raise CommandError("x")
