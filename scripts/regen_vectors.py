"""Rewrite tests/vectors/*.json from tests/vectors/build.py.

Run this only when a change of the wire format is deliberate (and say so in
docs/protocol.md and the commit message); `tests/test_vectors.py` fails on
any other change.  Usage, from the repository root:

    PYTHONPATH=. .venv/bin/python scripts/regen_vectors.py [--check]

With --check it writes nothing and exits 1 if a file would change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.vectors.build import build_all  # noqa: E402


def render(content: dict) -> str:
    return json.dumps(content, indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = []
    for name, content in build_all().items():
        path = ROOT / "tests" / "vectors" / name
        text = render(content)
        old = path.read_text() if path.exists() else None
        if old != text:
            changed.append(name)
            if not check:
                path.write_text(text)
    for name in changed:
        print(f"{'would change' if check else 'wrote'} tests/vectors/{name}")
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
