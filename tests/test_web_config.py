"""The [web] section of agent.toml."""

from __future__ import annotations

import pytest

from clanagent.config import ConfigError, load_config


def test_the_console_is_off_by_default(tmp_path):
    cfg = load_config(tmp_path / "absent.toml")
    assert cfg.web.enabled is False and cfg.web.port == 7780 and cfg.web.admin_key == ""


def test_web_values_are_read(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text('[web]\nenabled = true\nport = 0\nadmin_key = "/etc/clanagent/admin.key"\n')
    cfg = load_config(f)
    assert cfg.web.enabled and cfg.web.port == 0 and cfg.web.admin_key.endswith("admin.key")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("[web]\nport = 70000\n", "web.port: 70000 is not a TCP port"),
        ("[web]\nport = -1\n", "web.port"),
        ('[web]\nport = "7780"\n', "web.port: expected an integer"),
        ('[web]\nenabled = "yes"\n', "web.enabled: expected true or false"),
        ('[web]\nlisten = "0.0.0.0:80"\n', "unknown key 'web.listen'"),
        ("web = 1\n", "web: expected a table [web]"),
    ],
)
def test_web_errors_name_the_key_and_the_fix(tmp_path, text, needle):
    f = tmp_path / "agent.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(f)
    assert needle in str(exc.value) and str(f) in str(exc.value)
