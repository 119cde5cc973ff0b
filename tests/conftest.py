"""Shared test fixtures and capability checks."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import settings

# Hypothesis checks what decoders do, not how fast: on a shared, loaded
# machine one example can take longer than its 200 ms default deadline
# (seen on test_mesh_tor's key decoder), which failed as "flaky". Speed is
# measured in bench/, never in tests.
settings.register_profile("clanagent", deadline=None)
settings.load_profile("clanagent")


def have_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not have_root(), reason="needs root")


def requires_binary(name: str):
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"needs {name} on PATH")
