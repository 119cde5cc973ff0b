import io
import logging
import socket

from clanagent._log import kv, setup_logging
from clanagent._sdnotify import Notifier, watchdog_interval


def test_log_lines_are_single_key_value_lines(monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # journald adds time: we leave ours out
    buf = io.StringIO()
    setup_logging("debug", stream=buf)
    log = logging.getLogger("clanagent.test")
    log.info('hello "world"', extra=kv(peer="a b", n=3, empty="", nl="x\ny"))
    log.debug("quiet")
    lines = buf.getvalue().splitlines()
    assert lines[0] == (
        'level=info logger=clanagent.test msg="hello \\"world\\"" peer="a b" n=3 empty="" '
        'nl="x\\ny"'
    )
    assert lines[1].startswith("level=debug")
    setup_logging("warning", stream=buf)
    log.info("hidden")
    assert "hidden" not in buf.getvalue()


def test_notify_sends_datagrams(tmp_path):
    path = tmp_path / "n.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    n = Notifier(str(path))
    assert n.enabled and n.notify("READY=1", "STATUS=ok")
    assert s.recv(100) == b"READY=1\nSTATUS=ok"
    s.close()
    path.unlink()
    assert n.notify("WATCHDOG=1") is False and n.errors == 1  # gone systemd is not fatal


def test_abstract_socket_address():
    assert Notifier("@foo").address == "\0foo"


def test_no_notify_socket_means_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier().notify("READY=1") is False


def test_watchdog_interval(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # for another process
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert watchdog_interval() is None
