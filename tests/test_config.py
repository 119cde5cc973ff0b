from pathlib import Path

import pytest

from clanagent.config import Config, ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_missing_default_file_gives_defaults(tmp_path):
    cfg = load_config(tmp_path / "absent.toml")
    assert cfg == Config()
    assert cfg.control.socket == "/run/clanagent/control.sock"
    assert cfg.gossip.listen == "0.0.0.0:7946"


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml", required=True)


def test_values_are_read(tmp_path):
    p = write(
        tmp_path,
        """
state_dir = "/srv/clan"
log_level = "debug"
[control]
socket = "/tmp/x.sock"
group = "wheel"
[gossip]
join = ["10.0.0.1:7946", "[fd00::1]:7946"]
profile = "wan"
""",
    )
    cfg = load_config(p)
    assert cfg.state_dir == "/srv/clan"
    assert cfg.log_level == "debug"
    assert cfg.control.socket == "/tmp/x.sock"
    assert cfg.control.group == "wheel"
    assert cfg.gossip.join == ["10.0.0.1:7946", "[fd00::1]:7946"]
    assert cfg.gossip.profile == "wan"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("stat_dir = '/x'", "unknown key 'stat_dir'"),
        ("[control]\nsockt = '/x'", "unknown key 'control.sockt'"),
        ("[gossip]\nlisen = ':1'", "unknown key 'gossip.lisen'"),
        ("log_level = 3", "log_level: expected a string, got int"),
        ("log_level = 'loud'", "log_level: 'loud' is not one of"),
        ("shutdown_timeout = true", "shutdown_timeout: expected a number, got a boolean"),
        ("control = 'x'", "control: expected a table"),
        ("[gossip]\njoin = 'a:1'", "gossip.join: expected a list of a string"),
        ("[gossip]\njoin = ['nope']", "gossip.join[0]: 'nope' is not HOST:PORT"),
        ("[gossip]\njoin = [1]", "gossip.join[0]: expected a string"),
        ("[gossip]\nprofile = 'moon'", "gossip.profile"),
        ("[gossip]\nadmitted_keys = ['abc']", "gossip.admitted_keys[0]"),
        ("[gossip]\nclan_id = 'zz'", "gossip.clan_id: must be hex"),
        ("this is not toml", "not valid TOML"),
        ("[gossip]\nhandshake_timeout = 0", "gossip.handshake_timeout: must be in (0, 60]"),
        ("[gossip]\nmax_records = 0", "gossip.max_records: must be at least 1"),
        (
            "[gossip]\nmax_records = 10\nmax_records_per_origin = 11",
            "gossip.max_records_per_origin: must not exceed gossip.max_records",
        ),
        (
            "[gossip]\nmax_bytes = 100\nmax_bytes_per_origin = 101",
            "gossip.max_bytes_per_origin: must not exceed gossip.max_bytes",
        ),
    ],
)
def test_errors_name_the_key(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert needle in str(exc.value)
    assert str(p) in str(exc.value)


def test_overrides_win_and_are_checked(tmp_path):
    p = write(tmp_path, "[control]\nsocket = '/a.sock'\n")
    cfg = load_config(p, overrides={"control.socket": "/b.sock", "state_dir": "/s"})
    assert cfg.control.socket == "/b.sock"
    assert cfg.state_dir == "/s"
    with pytest.raises(ConfigError, match="gossip.listen"):
        load_config(p, overrides={"gossip.listen": "bad"})


def test_int_is_accepted_for_float(tmp_path):
    cfg = load_config(write(tmp_path, "shutdown_timeout = 3"))
    assert cfg.shutdown_timeout == 3.0 and isinstance(cfg.shutdown_timeout, float)
