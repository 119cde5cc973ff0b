"""Building this project's wheel and sdist offline, and installing them without network.

Owns: `build_dists` (`python -m build --no-isolation` on a copy of the
sources, so the checkout gets no build/ or egg-info) and `runtime_files`
(the top-level site-packages entries of clanagent's runtime dependencies as
installed in this venv, to copy into a venv that has no network).  Used by
tests/test_packaging.py and tests/_systemd_guest/boot.py.

Must never: write into the checkout, or reach the network.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

TREE = Path(__file__).resolve().parent.parent


def missing() -> str | None:
    """None, or one line saying why this venv cannot build the dists offline."""
    try:
        import build  # noqa: F401
        import setuptools
    except ImportError:
        return "needs build and setuptools in this venv (pip install -e '.[test]')"
    if int(setuptools.__version__.split(".")[0]) < 68:
        return "needs setuptools >= 68 in this venv (pip install -e '.[test]')"
    return None


def build_dists(out: Path, *, sdist: bool = False) -> list[Path]:
    """[wheel] or [wheel, sdist] of this checkout, built in OUT without network."""
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "MANIFEST.in"):
        if (TREE / name).exists():
            shutil.copy(TREE / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(TREE / "clanagent", src / "clanagent", ignore=ignore)
    for extra in ("systemd", "share"):  # the unit; man pages and completions (MANIFEST.in)
        if (TREE / extra).is_dir():
            shutil.copytree(TREE / extra, src / extra, ignore=ignore)
    dist = out / "dist"
    kinds = ["--wheel", "--sdist"] if sdist else ["--wheel"]
    r = subprocess.run(
        [sys.executable, "-m", "build", *kinds, "--no-isolation", "--outdir", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        raise RuntimeError(f"building failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    wheels = sorted(dist.glob("clanagent-*.whl"))
    sdists = sorted(dist.glob("clanagent-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == (1 if sdist else 0), list(dist.iterdir())
    return [*wheels, *sdists]


def _requirements(dist: md.Distribution) -> list[str]:
    """The names DIST needs here: no extras, markers evaluated for this python."""
    from packaging.requirements import Requirement

    reqs = [Requirement(r) for r in dist.requires or []]
    return [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def runtime_files() -> list[Path]:
    """The top-level site-packages entries (packages, modules, dist-info) of every
    runtime dependency of clanagent, recursively, as installed in this venv."""
    seen: set[str] = set()
    todo = _requirements(md.distribution("clanagent"))
    entries: set[Path] = set()
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = md.distribution(name)
        base = Path(dist.locate_file(""))
        for f in dist.files or []:
            top = f.parts[0]
            if top in ("..", "__pycache__") or top.endswith(".pth"):
                continue
            entries.add(base / top)
        todo.extend(_requirements(dist))
    return sorted(p for p in entries if p.exists())
