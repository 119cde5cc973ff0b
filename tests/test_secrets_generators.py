"""Generators: built-ins, and the command sandbox (files, errors, timeout, no network, nobody)."""

from __future__ import annotations

import base64
import os
import pwd
import shutil
import socket
import subprocess

import nacl.public
import nacl.signing
import pytest

from clanagent.secrets import files
from clanagent.secrets.generators import (
    PASSWORD_ALPHABET,
    GeneratorError,
    SandboxLimits,
    generate,
    run_command,
)

T0 = 1_700_000_000


def spec(generator, **kw):
    base = {"generator": generator, "length": 0, "command": "", "depends": [], "scope": "machine"}
    base.update(secret_files=[], public_files=[], rotate_days=0)
    base.update(kw)
    return base


def test_random_bytes_and_password():
    a = generate(spec("random-bytes", length=48))
    b = generate(spec("random-bytes", length=48))
    assert len(a.secret["value"]) == 48 and a.public == {} and a.secret != b.secret
    pw = generate(spec("password", length=40)).secret["password"].decode()
    assert len(pw) == 40 and set(pw) <= set(PASSWORD_ALPHABET)


def test_keypairs_match():
    g = generate(spec("ed25519"))
    assert bytes(nacl.signing.SigningKey(g.secret["private"]).verify_key) == g.public["public"]
    g = generate(spec("x25519"))
    assert bytes(nacl.public.PrivateKey(g.secret["private"]).public_key) == g.public["public"]
    g = generate(spec("wireguard"))
    priv = base64.b64decode(g.secret["private"].strip())
    pub = base64.b64decode(g.public["public"].strip())
    assert g.secret["private"].endswith(b"\n") and len(priv) == 32
    assert bytes(nacl.public.PrivateKey(priv).public_key) == pub
    if shutil.which("wg"):
        out = subprocess.run(["wg", "pubkey"], input=g.secret["private"], capture_output=True)
        assert out.stdout == g.public["public"]


def cmd(command, secret_files=("s",), public_files=(), **kw):
    return spec(
        "command",
        command=command,
        secret_files=list(secret_files),
        public_files=list(public_files),
        **kw,
    )


# Sandbox tests run both ways when root: isolated (the real thing) and plain.
MODES = [False] + ([True] if os.geteuid() == 0 and shutil.which("unshare") else [])


@pytest.mark.parametrize("isolate", MODES)
def test_command_collects_declared_files_and_reads_inputs(isolate):
    g = generate(
        cmd(
            'cat "$in/dep/value" > "$out/s"; printf pub > "$out/p"; echo extra > "$out/x"',
            public_files=("p",),
        ),
        {"dep": {"value": b"from-dep"}},
        SandboxLimits(isolate=isolate),
    )
    assert g.secret == {"s": b"from-dep"} and g.public == {"p": b"pub"}


@pytest.mark.parametrize("isolate", MODES)
def test_environment_is_cleared(isolate):
    os.environ["CLANAGENT_TEST_LEAK"] = "leak"
    try:
        g = run_command("env > $out/s", ["s"], [], {}, SandboxLimits(isolate=isolate))
    finally:
        del os.environ["CLANAGENT_TEST_LEAK"]
    names = {line.split("=", 1)[0] for line in g.secret["s"].decode().splitlines()}
    assert "CLANAGENT_TEST_LEAK" not in names
    assert {"PATH", "out", "in"} <= names
    assert names <= {"PATH", "out", "in", "PWD", "SHLVL", "_", "OLDPWD"}


def test_missing_declared_file_is_an_error():
    with pytest.raises(GeneratorError, match=r"did not write declared file out/p"):
        generate(cmd("echo x > $out/s", public_files=("p",)))


def test_failing_command_gives_exit_code_and_stderr():
    with pytest.raises(GeneratorError, match=r"exit code 3: boom happened"):
        generate(cmd("echo 'boom happened' >&2; exit 3"))


def test_failure_leaves_the_previous_generation_in_place(tmp_path):
    files.install(tmp_path, "svc", "key", 1, {"s": b"old"}, {}, T0)
    with pytest.raises(GeneratorError):
        g = generate(cmd("exit 1"))
        files.install(tmp_path, "svc", "key", 2, g.secret, g.public, T0 + 1)
    assert (tmp_path / "secrets" / "svc" / "key" / "s").read_bytes() == b"old"
    assert files.installed_generation(tmp_path, "svc", "key") == 1


def test_symlink_out_is_refused(tmp_path):
    target = tmp_path / "t"
    target.write_bytes(b"host secret")
    with pytest.raises(GeneratorError, match="out/s is a symlink"):
        run_command(f"ln -s {target} $out/s", ["s"], [], {}, SandboxLimits(isolate=False))


def test_timeout_kills_the_command():
    with pytest.raises(GeneratorError, match="timed out after 0.5 s"):
        run_command("sleep 30 & sleep 30", ["s"], [], {}, SandboxLimits(timeout=0.5, isolate=False))


def test_bad_names_refused():
    with pytest.raises(GeneratorError, match="bad declared"):
        run_command("true", ["../s"], [])
    with pytest.raises(GeneratorError, match="dependency"):
        run_command("true", ["s"], [], {"../d": {"v": b""}})


needs_isolation = pytest.mark.skipif(
    True not in MODES, reason="needs root and util-linux unshare for the isolated sandbox"
)


def _unshare_works() -> bool:
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


def _probe(port: int) -> str:
    # bash's /dev/tcp: no interpreter that nobody might not be allowed to read
    return (
        f"if bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' 2>$out/err; "
        "then echo connected > $out/net; else echo refused > $out/net; fi; "
        "id -u > $out/uid; id -G > $out/groups"
    )


@needs_isolation
@pytest.mark.root
def test_isolated_runs_as_nobody_without_network():
    if not _unshare_works():
        pytest.skip("unshare --net is not permitted here")
    # something listening on the host's loopback that the command must not reach
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        inside = run_command(
            _probe(port), ["net", "uid", "groups"], [], {}, SandboxLimits(isolate=True)
        )
        # the same probe outside the sandbox connects, so the check above is honest
        outside = run_command(_probe(port), ["net", "uid"], [], {}, SandboxLimits(isolate=False))
    nobody = pwd.getpwnam("nobody")
    assert inside.secret["uid"].strip() == str(nobody.pw_uid).encode()
    # supplementary groups (root's) are dropped too
    assert inside.secret["groups"].split() == [str(nobody.pw_gid).encode()]
    assert inside.secret["net"].startswith(b"refused"), inside.secret["net"]
    assert outside.secret["net"].startswith(b"connected"), outside.secret["net"]


@needs_isolation
@pytest.mark.root
def test_isolated_cannot_read_root_files(tmp_path):
    secret = tmp_path / "root-only"
    secret.write_bytes(b"x")
    secret.chmod(0o600)
    with pytest.raises(GeneratorError, match="exit code"):
        run_command(f"cat {secret} > $out/s", ["s"], [], {}, SandboxLimits(isolate=True))


def test_rlimits_apply():
    g = run_command(
        "ulimit -t > $out/t; ulimit -n > $out/n", ["t", "n"], [], {}, SandboxLimits(isolate=False)
    )
    assert g.secret["t"].strip() == b"60" and g.secret["n"].strip() == b"256"
