"""Run a small control-socket client as another, unprivileged user (tests only).

The client is a fresh interpreter that subprocess starts with the user's
uid, gid and supplementary groups (as login would), so the agent's side sees
a real other caller: SO_PEERCRED, SO_PEERGROUPS and the socket file's mode
all apply.  It uses only the standard library (root's virtualenv may not be
readable by that user): the test builds the request frames and decodes the
replies.  Users and groups are created with useradd/groupadd, so this needs
root; `skip_unless_root()` says so in one line otherwise.
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_CHILD = r"""
import os, select, socket, struct, sys

def read_frame(s):
    buf = b""
    while True:
        if len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) >= 4 + n:
                return buf[4 : 4 + n]
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return None
        buf += chunk

def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
    except OSError as exc:
        print("CONNERR", exc.errno, flush=True)
        sys.exit(0)
    return s

mode, path = sys.argv[1], sys.argv[2]
if mode == "call":  # send each frame, print each reply
    s = connect(path)
    for hexframe in sys.argv[3:]:
        try:
            s.sendall(bytes.fromhex(hexframe))
        except OSError:
            pass  # refused already: the reply (if any) says why
        reply = read_frame(s)
        if reply is None:
            print("EOF", flush=True)
            break
        print("REPLY", reply.hex(), flush=True)
elif mode == "hold":  # open N connections, report which the agent refused, hold the rest
    conns = [connect(path) for _ in range(int(sys.argv[3]))]
    print("OPEN", len(conns), flush=True)
    sys.stdin.readline()  # the test saw the agent take them all in
    held = []
    for s in conns:
        ready, _, _ = select.select([s], [], [], 0)
        if ready:
            reply = read_frame(s)
            print("REFUSED", reply.hex() if reply else "", flush=True)
            s.close()
        else:
            held.append(s)
    print("HELD", len(held), flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


def have_root() -> bool:
    return os.geteuid() == 0


def skip_unless_root() -> None:
    if not have_root():
        pytest.skip("needs root to create test users and run a client as one")


def ensure_group(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", name], check=True, capture_output=True)
        return grp.getgrnam(name).gr_gid


def ensure_user(name: str, groups: tuple[str, ...] = ()) -> pwd.struct_passwd:
    """A system user with its own primary group, and `groups` as supplementary ones."""
    extra = ["-G", ",".join(groups)] if groups else []
    try:
        pwd.getpwnam(name)
    except KeyError:
        cmd = ["useradd", "--system", "-M", "-U", "-s", "/usr/sbin/nologin", *extra, name]
        subprocess.run(cmd, check=True, capture_output=True)
    else:
        subprocess.run(["usermod", "-G", ",".join(groups), name], check=True, capture_output=True)
    return pwd.getpwnam(name)


def remove_user(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True)
    try:  # the user's own group, if userdel left it
        grp.getgrnam(name)
    except KeyError:
        return
    subprocess.run(["groupdel", name], capture_output=True)


def remove_group(name: str) -> None:
    subprocess.run(["groupdel", name], capture_output=True)


def shared_dir(prefix: str) -> Path:
    """A directory every user can traverse (pytest's tmp_path sits under a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


_interpreters: dict[int, str] = {}


def interpreter_for(user: pwd.struct_passwd) -> str:
    """A Python the user may run (root's own may live under /root)."""
    if user.pw_uid in _interpreters:
        return _interpreters[user.pw_uid]
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            ok = (
                subprocess.run(
                    [candidate, "-I", "-c", "pass"], capture_output=True, **_as(user), timeout=10
                ).returncode
                == 0
            )
        except OSError:
            ok = False
        if ok:
            _interpreters[user.pw_uid] = candidate
            return candidate
    pytest.skip(f"no Python interpreter that user {user.pw_name} may run")


def _as(user: pwd.struct_passwd) -> dict:
    return {
        "user": user.pw_uid,
        "group": user.pw_gid,
        "extra_groups": os.getgrouplist(user.pw_name, user.pw_gid),
        "cwd": "/",
        "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    }


def call_as(user: pwd.struct_passwd, sock: Path | str, *frames: bytes) -> list[str]:
    """Send `frames` on one connection as `user`; lines "REPLY <hex>", "EOF" or "CONNERR <n>"."""
    out = subprocess.run(
        [interpreter_for(user), "-I", "-c", _CHILD, "call", str(sock), *(f.hex() for f in frames)],
        capture_output=True,
        text=True,
        timeout=20,
        **_as(user),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


class Holder:
    """A process of `user` holding `n` connections open to the control socket."""

    def __init__(self, user: pwd.struct_passwd, sock: Path | str, n: int) -> None:
        self.proc = subprocess.Popen(
            [interpreter_for(user), "-I", "-c", _CHILD, "hold", str(sock), str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            **_as(user),
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["OPEN"], line
        self.opened = int(line[1])

    def check(self) -> tuple[int, list[bytes]]:
        """(connections still held, the replies of those the agent refused)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        refused = []
        while True:
            word, _, rest = self.proc.stdout.readline().strip().partition(" ")
            if word == "REFUSED":
                refused.append(bytes.fromhex(rest))
            elif word == "HELD":
                return int(rest), refused
            else:
                raise AssertionError(f"unexpected output from the holder: {word} {rest}")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
