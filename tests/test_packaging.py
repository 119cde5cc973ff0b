"""The wheel and the sdist: what a user installs has both commands and the console's assets.

Builds both with `python -m build --no-isolation` from a copy of the sources
(tests/_wheel.py; offline), checks that the web console's static files are in
each, installs the wheel into a fresh venv (its runtime dependencies copied
from this venv: no network) and runs `clanctl --help`, `clanagent --version`
and the console's asset lookup from that venv, away from the checkout.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests import _wheel

REASON = _wheel.missing()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

STATIC = sorted(
    p.relative_to(_wheel.TREE).as_posix()
    for p in (_wheel.TREE / "clanagent" / "web" / "static").rglob("*")
    if p.is_file() and "__pycache__" not in p.parts
)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    wheel, sdist = _wheel.build_dists(tmp_path_factory.mktemp("dists"), sdist=True)
    return wheel, sdist


def test_the_checkout_has_static_assets():
    assert any(s.endswith(".html") for s in STATIC), STATIC


def test_wheel_holds_the_console_assets_and_both_commands(dists):
    wheel, _ = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(entry_points).decode()
    assert set(STATIC) <= names, set(STATIC) - names
    assert "clanagent = clanagent.cli.agent_main:main" in scripts
    assert "clanctl = clanagent.cli.clanctl:main" in scripts


def test_sdist_holds_the_sources_assets_and_unit(dists):
    _, sdist = dists
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert set(STATIC) <= names, set(STATIC) - names
    assert {"pyproject.toml", "README.md", "systemd/clanagent.service"} <= names
    # the man pages and completions the README's systemd steps install
    share = (_wheel.TREE / "share").rglob("*")
    shipped = {p.relative_to(_wheel.TREE).as_posix() for p in share if p.is_file()}
    assert shipped and shipped <= names, shipped - names


@pytest.fixture(scope="module")
def venv(dists, tmp_path_factory) -> Path:
    wheel, _ = dists
    v = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(v)], check=True, timeout=120)
    site = subprocess.run(
        [str(v / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # No network: the runtime dependencies come from this venv, as installed.
    subprocess.run(["cp", "-a", *map(str, _wheel.runtime_files()), site + "/"], check=True)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(v / "bin/python"), "install", "-q"]
        + ["--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return v


def _run(venv: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    # Away from the checkout, so nothing is imported from it.
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=venv,
        env={"PATH": "/usr/bin:/bin", "HOME": str(venv)},
    )


def test_installed_clanctl_and_clanagent_run(venv):
    r = _run(venv, "clanctl", "--help")
    assert r.returncode == 0 and "usage: clanctl" in r.stdout, r.stdout + r.stderr
    r = _run(venv, "clanagent", "--version")
    assert r.returncode == 0 and "0.1.0" in r.stdout + r.stderr, r.stdout + r.stderr


def test_installed_package_finds_its_console_assets(venv):
    code = (
        "import clanagent, importlib.resources as r; "
        "print(clanagent.__file__); "
        "print(*sorted(p.name for p in r.files('clanagent.web').joinpath('static').iterdir()))"
    )
    r = _run(venv, "python", "-c", code)
    assert r.returncode == 0, r.stderr
    where, files = r.stdout.splitlines()
    assert where.startswith(str(venv)), where  # the installed copy, not the checkout
    assert sorted(files.split()) == sorted(Path(s).name for s in STATIC)
