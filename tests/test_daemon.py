"""The real daemon and clanctl as processes: start, talk, notify, stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import requires_root

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def clanagent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "clanagent.cli.agent_main", *args]


def clanctl(sock: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "clanagent.cli.clanctl", "--socket", str(sock), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"clanctl {args} failed: {r.returncode} {r.stderr}")
    return r


def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(10)
    try:
        yield path, s
    finally:
        s.close()


def recv_until(s: socket.socket, wanted: str) -> list[str]:
    seen = []
    while True:
        msg = s.recv(4096).decode()
        seen.extend(msg.split("\n"))
        if wanted in seen:
            return seen


@contextmanager
def agent(tmp_path: Path, *extra: str, env: dict | None = None):
    sock = tmp_path / "ctl.sock"
    log = (tmp_path / "agent.log").open("w+")
    proc = subprocess.Popen(
        clanagent_cmd(
            "run",
            "--config",
            "/dev/null",
            "--state-dir",
            str(tmp_path / "state"),
            "--control-socket",
            str(sock),
            "--listen",
            "",
            *extra,
        ),
        stderr=log,
        env={**os.environ, **(env or {})},
    )
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, what="control socket")
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"agent exited {proc.returncode}: {log.read()}")
        yield proc, sock, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_status_whoami_peers_and_json(tmp_path):
    with agent(tmp_path) as (proc, sock, _):
        st = clanctl(sock, "status").stdout
        assert "node id" in st and "CAPABILITY" in st and "wireguard" in st
        data = json.loads(clanctl(sock, "--json", "status").stdout)
        assert data["pid"] == proc.pid
        assert {c["name"] for c in data["capabilities"]} >= {
            "net_admin",
            "wireguard",
            "tor",
            "mdns",
            "kvm",
            "qemu",
        }
        for c in data["capabilities"]:
            assert isinstance(c["available"], bool) and c["reason"]
        who = json.loads(clanctl(sock, "--json", "whoami").stdout)
        assert who["node_id"] == data["node_id"]
        assert len(bytes.fromhex(who["signing_key"])) == 32
        assert "signing key" in clanctl(sock, "whoami").stdout
        assert json.loads(clanctl(sock, "--json", "peers").stdout) == []
        peers = clanctl(sock, "peers").stdout
        assert "not in a clan yet" in peers and "clanagent join TOKEN" in peers
        assert "--join" not in peers  # a clan is joined with a token, not an address
    # the same state dir keeps the same identity, and keygen agrees
    kg = subprocess.run(
        clanagent_cmd("keygen", "--state-dir", str(tmp_path / "state")),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "existing keys" in kg.stdout and who["node_id"] in kg.stdout


def test_events_stream(tmp_path):
    with agent(tmp_path) as (_, sock, _):
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "clanagent.cli.clanctl",
                "--socket",
                str(sock),
                "--json",
                "events",
                "--count",
                "1",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(0.5)  # let it subscribe
        # a stop publishes agent.stopping to every subscriber
        os.kill(_agent_pid(sock), signal.SIGTERM)
        out, _ = p.communicate(timeout=10)
        ev = json.loads(out.splitlines()[0])
        assert ev["type"] == "agent.stopping"


def _agent_pid(sock: Path) -> int:
    return json.loads(clanctl(sock, "--json", "status").stdout)["pid"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sd_notify_and_clean_stop_within_2s(tmp_path, sig):
    with notify_socket(tmp_path) as (npath, ns):
        env = {"NOTIFY_SOCKET": str(npath), "WATCHDOG_USEC": "200000", "WATCHDOG_PID": ""}
        with agent(tmp_path, env=env) as (proc, sock, log):
            seen = recv_until(ns, "READY=1")
            assert any(m.startswith("STATUS=") for m in seen)
            recv_until(ns, "WATCHDOG=1")
            recv_until(ns, "WATCHDOG=1")  # repeats: every WATCHDOG_USEC/2
            t0 = time.monotonic()
            proc.send_signal(sig)
            recv_until(ns, "STOPPING=1")
            rc = proc.wait(timeout=5)
            elapsed = time.monotonic() - t0
            assert rc == 0
            assert elapsed < 2.0, f"stop took {elapsed:.2f}s"
            assert not sock.exists()
            log.seek(0)
            text = log.read()
            assert "level=info" in text and 'msg="agent stopped"' in text
            assert "Traceback" not in text


def test_unknown_config_key_names_it(tmp_path):
    cfg = tmp_path / "agent.toml"
    cfg.write_text("[control]\nsokcet = '/tmp/x'\n")
    r = subprocess.run(
        clanagent_cmd("run", "--config", str(cfg)), capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert "unknown key 'control.sokcet'" in r.stderr
    assert "Traceback" not in r.stderr


def test_clanctl_without_agent(tmp_path):
    r = clanctl(tmp_path / "nope.sock", "status", check=False)
    assert r.returncode == 3  # no agent; 2 is a usage error
    assert r.stderr.strip() == (
        f"clanctl: clanagent is not running (no socket at {tmp_path / 'nope.sock'}): "
        "start it with 'systemctl start clanagent' or 'clanagent run'"
    )


def test_second_agent_on_same_socket_refuses(tmp_path):
    with agent(tmp_path) as (_, sock, _):
        r = subprocess.run(
            clanagent_cmd(
                "run",
                "--config",
                "/dev/null",
                "--state-dir",
                str(tmp_path / "s2"),
                "--control-socket",
                str(sock),
                "--listen",
                "",
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 2
        assert "already listening" in r.stderr
        clanctl(sock, "status")  # the first one is untouched


@requires_root
def test_runs_unprivileged(tmp_path):
    """As nobody, with a writable state dir: it runs and reports what needs root."""
    # The child imports after dropping to nobody; where the interpreter's own
    # library is not readable by nobody (a Python under /root, as here), the
    # modules the agent needs must already be loaded.
    import importlib
    import pwd
    import tempfile

    from clanagent.cli import agent_main

    for mod in (
        "clanagent.agent",
        "clanagent.gossip.service",
        "clanagent.mesh.service",
        "clanagent.secrets.service",
        "clanagent.services.service",
        "clanagent.vmhost.service",
        "clanagent.topology",
    ):
        importlib.import_module(mod)

    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="clanagent-unpriv-"))
    work.chmod(0o755)
    os.chown(work, nobody.pw_uid, nobody.pw_gid)
    sock = work / "ctl.sock"
    pid = os.fork()
    if pid == 0:  # the child becomes nobody and runs the real agent main()
        code = 1
        try:
            devnull = os.open("/dev/null", os.O_WRONLY)
            os.dup2(devnull, 2)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = agent_main.main(
                [
                    "run",
                    "--config",
                    "/dev/null",
                    "--state-dir",
                    str(work / "state"),
                    "--control-socket",
                    str(sock),
                    "--listen",
                    "",
                ]
            )
        finally:
            os._exit(code)
    try:
        wait_for(sock.exists, what="unprivileged agent socket")
        data = json.loads(clanctl(sock, "--json", "status").stdout)
        caps = {c["name"]: c for c in data["capabilities"]}
        assert caps["net_admin"]["available"] is False
        assert "CAP_NET_ADMIN" in caps["net_admin"]["reason"]
        assert caps["wireguard"]["available"] is False
        st = os.stat(work / "state")
        assert st.st_uid == nobody.pw_uid and (st.st_mode & 0o777) == 0o700
    finally:
        os.kill(pid, signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_gossip_port_in_use_is_one_clear_line(tmp_path):
    """A gossip port someone else holds ends the start with a message that
    names the setting and the fix, not a traceback."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        r = subprocess.run(
            clanagent_cmd(
                "run",
                "--config",
                "/dev/null",
                "--state-dir",
                str(tmp_path / "s"),
                "--control-socket",
                str(tmp_path / "c.sock"),
                "--listen",
                f"127.0.0.1:{port}",
            ),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.close()
    assert r.returncode == 2, r.stderr
    assert "address already in use" in r.stderr and f"127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr
