"""Every module imports on its own in a fresh interpreter (catches import cycles)."""

import pkgutil
import subprocess
import sys

import pytest

import clanagent

MODULES = sorted(m.name for m in pkgutil.walk_packages(clanagent.__path__, prefix="clanagent."))


def test_there_are_modules():
    assert "clanagent.wire" in MODULES and "clanagent.agent" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_module_imports_alone(name):
    r = subprocess.run(
        [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
