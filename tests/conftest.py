"""Shared test fixtures and capability checks."""

from __future__ import annotations

import os
import shutil

import pytest


def have_root() -> bool:
    return os.geteuid() == 0


requires_root = pytest.mark.skipif(not have_root(), reason="needs root")


def requires_binary(name: str):
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"needs {name} on PATH")
