"""Import files on disk (content, quoting, modes, change detection, removal) and the reload hook."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from clanagent.services.render import (
    IMPORTS_ENV,
    IMPORTS_JSON,
    env_text,
    render_imports,
    run_reload,
    service_dir,
)
from clanagent.services.wiring import ServicesLocalError, check_value, resolve_imports
from tests.test_services_wiring import WG_PUB, two_servers, vpn_doc

NASTY = 'it\'s a "quoted" $HOME `id` \\ value  with  spaces'


def rendered(doc, exports):
    return resolve_imports(doc, "beta", exports)


def read_env_with_sh(path) -> dict[str, str]:
    """What a POSIX shell gets from sourcing the env file (the file's real consumer)."""
    out = subprocess.run(
        ["sh", "-c", 'set -a && . "$1" && env -0', "sh", str(path)],
        check=True,
        capture_output=True,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    ).stdout
    pairs = (item.split(b"=", 1) for item in out.split(b"\0") if item)
    return {k.decode(): v.decode() for k, v in pairs if k.startswith(b"CLAN_")}


def test_files_content_and_modes(tmp_path):
    doc = vpn_doc()
    res = render_imports(tmp_path, rendered(doc, two_servers(doc)))
    assert res.changed == ("backup", "vpn")
    assert res.removed == ()
    d = service_dir(tmp_path, "vpn")
    assert d == tmp_path / "services" / "vpn"
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    for name in (IMPORTS_JSON, IMPORTS_ENV):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o644
    js = json.loads((d / IMPORTS_JSON).read_text())
    assert js["format"] == 1
    assert js["service"] == "vpn" and js["machine"] == "beta"
    assert js["roles"] == {"client": ["vpn.server"]}
    assert js["imports"]["vpn.server"][0] == {
        "machine": "alpha",
        "published": True,
        "values": {"address": "fd00::a", "port": "51820", "public_key": WG_PUB},
        "missing": [],
        "self": False,
    }
    assert js["imports"]["vpn.server"][1]["machine"] == "gamma"
    env = (d / IMPORTS_ENV).read_text()
    assert f'CLAN_VPN_SERVER_PUBLIC_KEY="{WG_PUB}"\n' in env
    assert 'CLAN_VPN_SERVER_MACHINES="alpha gamma"\n' in env
    lines = env.splitlines()
    assert lines == sorted(lines)
    # No temp files left behind.
    assert sorted(p.name for p in d.iterdir()) == [IMPORTS_ENV, IMPORTS_JSON]


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
def test_env_file_round_trips_through_a_shell(tmp_path):
    doc = vpn_doc()
    exports = two_servers(doc)
    exports[("vpn", "server", "alpha")] = {**exports[("vpn", "server", "alpha")], "port": NASTY}
    render_imports(tmp_path, rendered(doc, exports))
    got = read_env_with_sh(tmp_path / "services" / "vpn" / IMPORTS_ENV)
    want = rendered(doc, exports).services["vpn"].env
    assert got == want
    assert got["CLAN_VPN_SERVER_PORT"] == NASTY


_line = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\0"),
    max_size=40,
)


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
@given(st.lists(_line | st.sampled_from(["\u2028", "a\u2029b", '\\"', "\\$x"]), min_size=1))
def test_any_single_line_value_survives_the_shell(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("env") / "imports.env"
    env = {f"CLAN_X_{i}": v for i, v in enumerate(values)}
    path.write_text(env_text(env))
    assert read_env_with_sh(path) == env


def read_env_like_systemd(text: str) -> dict[str, str]:
    """The double-quote rules of systemd's env-file parser (src/basic/env-file.c), for our lines."""
    out = {}
    assert text.endswith("\n")
    for line in text[:-1].split("\n"):  # systemd splits on \n and \r only, not U+2028
        key, eq, rest = line.partition("=")
        assert eq and rest.startswith('"') and rest.endswith('"'), line
        body, value, i = rest[1:-1], [], 0
        while i < len(body):
            c = body[i]
            if c == "\\":
                nxt = body[i + 1]
                value.append(nxt if nxt in '"\\`$' else "\\" + nxt)
                i += 2
                continue
            assert c != '"', f"unescaped quote in {line!r}"
            value.append(c)
            i += 1
        out[key] = "".join(value)
    return out


@given(st.lists(_line | st.sampled_from(["\u2028", "a\u2029b", '\\"', "\\$x"]), min_size=1))
def test_any_single_line_value_survives_systemd(values):
    env = {f"CLAN_X_{i}": v for i, v in enumerate(values)}
    assert read_env_like_systemd(env_text(env)) == env


@pytest.mark.parametrize("bad", ["a\nb", "a\rb", "tab\there", "nul\0"])
def test_env_refuses_control_characters(bad):
    assert check_value(bad) is not None
    with pytest.raises(ServicesLocalError):
        env_text({"CLAN_X": bad})


def test_env_refuses_bad_names():
    with pytest.raises(ServicesLocalError):
        env_text({"clan x": "v"})
    with pytest.raises(ServicesLocalError):
        env_text({"A=B": "v"})


def test_no_change_means_no_reload_and_no_rewrite(tmp_path):
    doc = vpn_doc()
    r = rendered(doc, two_servers(doc))
    assert render_imports(tmp_path, r).changed == ("backup", "vpn")
    f = tmp_path / "services" / "vpn" / IMPORTS_ENV
    before = f.stat()
    res = render_imports(tmp_path, rendered(doc, two_servers(doc)))
    assert res.changed == () and res.removed == ()
    after = f.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_change_signals_only_that_service(tmp_path):
    doc = vpn_doc()
    exports = two_servers(doc)
    render_imports(tmp_path, rendered(doc, exports))
    exports[("vpn", "server", "gamma")] = {"address": "fd00::c", "port": "4242"}
    res = render_imports(tmp_path, rendered(doc, exports))
    assert res.changed == ("vpn",)
    env = (tmp_path / "services" / "vpn" / IMPORTS_ENV).read_text()
    assert 'CLAN_VPN_SERVER_PORT_1="4242"\n' in env
    # A provider that stops publishing is a change too.
    del exports[("vpn", "server", "gamma")]
    assert render_imports(tmp_path, rendered(doc, exports)).changed == ("vpn",)
    env = (tmp_path / "services" / "vpn" / IMPORTS_ENV).read_text()
    assert 'CLAN_VPN_SERVER_COUNT="1"\n' in env


def test_a_damaged_file_is_rewritten(tmp_path):
    doc = vpn_doc()
    r = rendered(doc, two_servers(doc))
    render_imports(tmp_path, r)
    f = tmp_path / "services" / "vpn" / IMPORTS_JSON
    f.write_text("{}")
    assert render_imports(tmp_path, r).changed == ("vpn",)
    assert json.loads(f.read_text())["service"] == "vpn"
    f.chmod(0o600)
    assert render_imports(tmp_path, r).changed == ("vpn",)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644


def test_files_go_when_the_machine_stops_consuming(tmp_path):
    doc = vpn_doc()
    render_imports(tmp_path, rendered(doc, two_servers(doc)))
    services = tmp_path / "services"
    (services / "backup" / "notes").write_text("not ours")
    (services / "Not-A-Service").mkdir()
    # what a crash in the middle of an atomic write leaves: removed with our files
    (services / "vpn" / ".imports.env.0123abcd.tmp").write_text("half")
    # beta leaves the laptop tag: it imports nothing any more.
    doc["machines"]["beta"]["tags"] = []
    r = rendered(doc, two_servers(doc))
    assert r.services == {}
    res = render_imports(tmp_path, r)
    assert res.changed == ()
    assert res.removed == ("backup", "vpn")
    assert not (services / "vpn").exists()
    # Only our files are removed; a directory holding something else stays.
    assert sorted(p.name for p in (services / "backup").iterdir()) == ["notes"]
    assert (services / "Not-A-Service").is_dir()
    # Nothing left to remove: nothing reported.
    assert render_imports(tmp_path, r).removed == ()


def test_empty_runtime_dir(tmp_path):
    doc = vpn_doc()
    doc["machines"]["beta"]["tags"] = []
    res = render_imports(tmp_path / "run", rendered(doc, {}))
    assert res.changed == () and res.removed == ()


def test_service_dir_refuses_paths(tmp_path):
    for bad in ("../etc", "a/b", "", "."):
        with pytest.raises(ServicesLocalError):
            service_dir(tmp_path, bad)


# ------------------------------------------------------------------ reload


async def test_reload_success():
    with trio.fail_after(10):
        assert await run_reload("true") == (True, "ok")


async def test_reload_empty_command_runs_nothing():
    with trio.fail_after(10):
        ok, msg = await run_reload("   ")
    assert ok and msg == "no reload command"


async def test_reload_failure_reports_status_and_stderr():
    with trio.fail_after(10):
        ok, msg = await run_reload("sh -c 'echo reload broke >&2; exit 3'")
    assert not ok
    assert "status 3" in msg and "reload broke" in msg


async def test_reload_is_not_a_shell(tmp_path):
    marker = tmp_path / "marker"
    with trio.fail_after(10):
        ok, msg = await run_reload(f"echo hi; touch {marker}")
    assert ok  # echo got "hi;" "touch" "PATH" as arguments
    assert not marker.exists()


async def test_reload_missing_program():
    with trio.fail_after(10):
        ok, msg = await run_reload("/nonexistent/clanagent-reload --now")
    assert not ok and "cannot run" in msg


async def test_reload_unparsable_command():
    with trio.fail_after(10):
        ok, msg = await run_reload("systemctl reload 'unclosed")
    assert not ok and "cannot parse" in msg


async def test_reload_timeout():
    # A real child process on the real clock: a virtual clock would also jump
    # over trio's SIGTERM grace period while the child is being reaped.
    with trio.fail_after(10):
        ok, msg = await run_reload("sleep 100", timeout=0.3)
    assert not ok and "timed out after 0.3 s" in msg
