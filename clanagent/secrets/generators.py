"""Making a new secret value: the built-in generators and the command sandbox.

Owns: random-bytes (file "value"), password (file "password", from an
alphabet without look-alikes or shell-special characters), Ed25519, X25519
and WireGuard keypairs (secret "private", public "public"; Ed25519 and
X25519 raw 32 bytes, WireGuard base64 plus newline as `wg genkey` writes),
and `command`: a shell string run in a restricted sandbox.

The sandbox: a fresh temp dir holding `out/` (writable, the only place the
command should write) and `in/DEP/FILE` (the dependencies' files,
read-only); the environment is cleared except PATH, `out` and `in`; rlimits
via the shell's ulimit (CPU 60 s, address space 1 GiB, 256 open files,
files of at most 16 MiB); a wall-clock timeout kills the whole process
group.  When we are root, the command also runs in a fresh network
namespace (no interfaces but a down loopback: no network at all) and as
the user nobody, through util-linux `unshare --net --setuid --setgid`
(no preexec_fn: this runs in worker threads, where forking Python code is
unsafe).  When not root neither is possible and the command runs as our
user with network -- a weaker sandbox, which the agent as a system daemon
never uses.  Success needs every declared secret and public file to exist
in out/ as a regular file.

Must never: run a command with the agent's environment, follow a symlink
out of out/, return partial output after a failure, or raise anything but
GeneratorError for a failed generation (all errors carry a clear message).
"""

from __future__ import annotations

import base64
import os
import pwd
import secrets as _random
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing

from clanagent.durable import FileRefused, read_file
from clanagent.identity import clamp_curve25519
from clanagent.secrets.crypto import SecretsError
from clanagent.secrets.model import output_files, valid_file_name

__all__ = [
    "GeneratorError",
    "Generated",
    "SandboxLimits",
    "PASSWORD_ALPHABET",
    "generate",
    "run_command",
]

# No 0/O/1/l/I and nothing a shell or a config file would mangle.
PASSWORD_ALPHABET = "abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
_SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_STDERR_TAIL = 2000


class GeneratorError(SecretsError):
    """A generator failed; the message says why (exit code, stderr tail, missing file)."""


@dataclass(frozen=True, slots=True)
class Generated:
    """The files of one new generation."""

    secret: dict[str, bytes] = field(repr=False)
    public: dict[str, bytes]


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Bounds for one command run; the defaults are the spec's."""

    timeout: float = 60.0
    cpu_seconds: int = 60
    address_space_kib: int = 1 << 20
    open_files: int = 256
    file_size_kib: int = 16 * 1024
    max_output_file: int = 1 << 20
    # None: decide from our uid (root -> unshare + nobody); tests may force False.
    isolate: bool | None = None


def _keypair(generator: str) -> Generated:
    if generator == "ed25519":
        sk = nacl.signing.SigningKey.generate()
        return Generated({"private": bytes(sk)}, {"public": bytes(sk.verify_key)})
    if generator == "x25519":
        pk = nacl.public.PrivateKey.generate()
        return Generated({"private": bytes(pk)}, {"public": bytes(pk.public_key)})
    priv = clamp_curve25519(os.urandom(32))
    pub = bytes(nacl.public.PrivateKey(priv).public_key)
    return Generated(
        {"private": base64.b64encode(priv) + b"\n"}, {"public": base64.b64encode(pub) + b"\n"}
    )


def generate(
    spec: Mapping[str, Any],
    inputs: Mapping[str, Mapping[str, bytes]] | None = None,
    limits: SandboxLimits | None = None,
) -> Generated:
    """A new value for the secret whose inventory entry is `spec`.

    `inputs` maps dependency secret name -> its files (only `command` uses
    them).  Blocking for `command`: call it in a worker thread.
    """
    gen = spec["generator"]
    if gen == "random-bytes":
        return Generated({"value": os.urandom(spec["length"])}, {})
    if gen == "password":
        pw = "".join(_random.choice(PASSWORD_ALPHABET) for _ in range(spec["length"]))
        return Generated({"password": pw.encode()}, {})
    if gen in ("ed25519", "x25519", "wireguard"):
        return _keypair(gen)
    if gen == "command":
        secret_files, public_files = output_files(spec)
        return run_command(spec["command"], secret_files, public_files, inputs or {}, limits)
    raise GeneratorError(f"unknown generator {gen!r}")


def _tail(data: bytes) -> str:
    text = data[-_STDERR_TAIL:].decode("utf-8", "replace").strip()
    return text or "(no output)"


def _read_output(out: Path, name: str, max_size: int) -> bytes:
    try:
        # The command wrote this: never follow its links or block on its FIFOs.
        return read_file(out / name, max_size=max_size)
    except FileNotFoundError:
        raise GeneratorError(f"command did not write declared file out/{name}") from None
    except FileRefused as exc:
        if exc.reason == "too_large":
            raise GeneratorError(f"out/{name} is larger than {max_size} bytes") from None
        what = "a symlink (not followed)" if exc.reason == "symlink" else "not a regular file"
        raise GeneratorError(f"out/{name} is {what}") from None
    except OSError as exc:
        raise GeneratorError(f"cannot read out/{name}: {exc.strerror}") from None


def _stage_inputs(indir: Path, inputs: Mapping[str, Mapping[str, bytes]], uid: int | None) -> None:
    for dep, files in inputs.items():
        if not valid_file_name(dep):
            raise GeneratorError(f"bad dependency name {dep!r}")
        d = indir / dep
        d.mkdir(mode=0o500)
        for name, value in files.items():
            if not valid_file_name(name):
                raise GeneratorError(f"dependency {dep}: bad file name {name!r}")
            p = d / name
            p.write_bytes(value)
            p.chmod(0o400)
            if uid is not None:
                os.chown(p, uid, -1)
        if uid is not None:
            os.chown(d, uid, -1)
    indir.chmod(0o500)
    if uid is not None:
        os.chown(indir, uid, -1)


def run_command(
    command: str,
    secret_files: tuple[str, ...] | list[str],
    public_files: tuple[str, ...] | list[str],
    inputs: Mapping[str, Mapping[str, bytes]] | None = None,
    limits: SandboxLimits | None = None,
) -> Generated:
    """Run `command` in the sandbox and collect the declared files from out/."""
    limits = limits or SandboxLimits()
    for name in (*secret_files, *public_files):
        if not valid_file_name(name):
            raise GeneratorError(f"bad declared file name {name!r}")
    isolate = os.geteuid() == 0 if limits.isolate is None else limits.isolate
    nobody: pwd.struct_passwd | None = None
    if isolate:
        if os.geteuid() != 0:
            raise GeneratorError("an isolated sandbox needs root")
        if shutil.which("unshare") is None:
            raise GeneratorError("sandbox: unshare (util-linux) is not installed")
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            raise GeneratorError("sandbox: there is no user nobody") from None
    base = Path(tempfile.mkdtemp(prefix="clanagent-gen-"))
    try:
        # 0711: nobody may traverse to out/ and in/ but not list the base.
        base.chmod(0o711)
        out, indir = base / "out", base / "in"
        out.mkdir(mode=0o700)
        indir.mkdir(mode=0o700)
        uid = nobody.pw_uid if nobody else None
        if uid is not None:
            os.chown(out, uid, nobody.pw_gid)  # type: ignore[union-attr]
        _stage_inputs(indir, inputs or {}, uid)
        # dash's ulimit takes one limit per call.
        ulimits = (
            f"ulimit -t {limits.cpu_seconds} && ulimit -v {limits.address_space_kib} && "
            f"ulimit -n {limits.open_files} && ulimit -f {limits.file_size_kib} || exit 125; "
        )
        argv = ["/bin/sh", "-c", ulimits + command]
        if nobody is not None:
            argv = [
                "unshare",
                "--net",
                f"--setuid={nobody.pw_uid}",
                f"--setgid={nobody.pw_gid}",
                "--",
                *argv,
            ]
        env = {"PATH": _SAFE_PATH, "out": str(out), "in": str(indir)}
        try:
            proc = subprocess.Popen(
                argv,
                cwd=str(out),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise GeneratorError(f"cannot start the generator command: {exc.strerror}") from None
        try:
            _, stderr = proc.communicate(timeout=limits.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise GeneratorError(
                f"generator command timed out after {limits.timeout:g} s"
            ) from None
        finally:
            _kill_group(proc)
        if proc.returncode != 0:
            raise GeneratorError(
                f"generator command failed with exit code {proc.returncode}: {_tail(stderr)}"
            )
        secret = {n: _read_output(out, n, limits.max_output_file) for n in secret_files}
        public = {n: _read_output(out, n, limits.max_output_file) for n in public_files}
        return Generated(secret, public)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    # The command may have left children behind (background jobs); the
    # session we started for it is theirs too.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.returncode is None:
        proc.wait()
