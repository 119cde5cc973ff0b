"""Every module imports on its own in a fresh interpreter (catches import cycles);
no module imports a private name of another package."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

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


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports_across_packages() -> list[str]:
    """Imports of a private name (a `_x` module or object) from outside the package owning it.

    A private name belongs to the package it sits in (a module's private
    names to the module's package): `clanagent._log` is clanagent's (every
    module may use it), `clanagent.cli._inventory_cmds` is clanagent.cli's
    alone.
    """
    root = Path(clanagent.__file__).parent
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        is_package = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_package else rel.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node)
                targets = [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                if parts[0] != "clanagent":
                    continue
                first = next((i for i, p in enumerate(parts) if _private(p)), None)
                if first is None:
                    continue
                # The package a private name belongs to: its module's package.
                owner_parts = parts[:first]
                while not root.parent.joinpath(*owner_parts, "__init__.py").exists():
                    owner_parts = owner_parts[:-1]
                owner = ".".join(owner_parts)
                if not (module + ".").startswith(owner + "."):
                    bad.append(f"{path.relative_to(root.parent)}:{node.lineno}: {target}")
    return bad


def test_no_module_imports_a_private_name_of_another_package():
    assert private_imports_across_packages() == []


def test_the_private_import_check_sees_one(tmp_path, monkeypatch):
    """The checker itself: a web -> cli private import is found, a package's own is not."""
    pkg = tmp_path / "clanagent"
    for d in ("cli", "web"):
        (pkg / d).mkdir(parents=True)
        (pkg / d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "_log.py").write_text("kv = 1\n")
    (pkg / "cli" / "_cmds.py").write_text("def _helper(): pass\n")
    (pkg / "cli" / "main.py").write_text(
        "from ._cmds import _helper\nfrom .._log import kv\nfrom .main2 import _x\n"
    )
    (pkg / "web" / "actions.py").write_text(
        "from .._log import kv\ndef f():\n    from ..cli._cmds import _helper\n"
    )
    monkeypatch.setattr(clanagent, "__file__", str(pkg / "__init__.py"))
    assert private_imports_across_packages() == [
        "clanagent/web/actions.py:3: clanagent.cli._cmds._helper"
    ]
