"""Generate shell completion (bash, zsh, fish) and man pages for clanctl and clanagent
from their argparse parsers, into share/ (committed; the README's systemd steps
install them).

    python scripts/cli_docs.py           # write share/...
    python scripts/cli_docs.py --check   # exit 1 when share/ is out of date

Owns: which files are generated and the fixed man-page sections (exit
status, environment, files).  Must never: describe a command by hand: every
command, option and help text comes from the parsers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from clanagent import __version__  # noqa: E402
from clanagent.cli import agent_main, clanctl  # noqa: E402
from clanagent.cli._argtree import walk  # noqa: E402
from clanagent.cli._completion import bash, fish, zsh  # noqa: E402
from clanagent.cli._manpage import render  # noqa: E402
from clanagent.cli.errors import EXIT_CODES_HELP  # noqa: E402

SHARE = ROOT / "share"

_ENV_CLANCTL = """\
CLANAGENT_SOCKET     the control socket (default /run/clanagent/control.sock)
CLANAGENT_ADMIN_KEY  the admin key file (default ~/.config/clanagent/admin.key)"""

_FILES_CLANAGENT = """\
/etc/clanagent/agent.toml     configuration (every key has a default)
/var/lib/clanagent            state: keys, records, the clan anchor
/run/clanagent/control.sock   the control socket clanctl talks to"""


def _exit_status() -> str:
    return EXIT_CODES_HELP.split("\n", 1)[1]  # without the "exit codes:" title


def outputs() -> dict[Path, str]:
    """Every generated file (path under ROOT) and its text."""
    ctl = walk(clanctl._parser())
    agent = walk(agent_main._parser())
    out: dict[Path, str] = {}
    for prog, tree in (("clanctl", ctl), ("clanagent", agent)):
        out[SHARE / "completion" / "bash" / prog] = bash(prog, tree)
        out[SHARE / "completion" / "zsh" / f"_{prog}"] = zsh(prog, tree)
        out[SHARE / "completion" / "fish" / f"{prog}.fish"] = fish(prog, tree)
    out[SHARE / "man" / "man1" / "clanctl.1"] = render(
        "clanctl",
        ctl,
        version=__version__,
        summary="talk to the local clanagent",
        common=("--json",),
        sections={
            "EXIT STATUS": _exit_status(),
            "ENVIRONMENT": _ENV_CLANCTL,
            "SEE ALSO": "clanagent(1)",
        },
    )
    out[SHARE / "man" / "man1" / "clanagent.1"] = render(
        "clanagent",
        agent,
        version=__version__,
        summary="the clan's peer-to-peer agent",
        sections={
            "EXIT STATUS": _exit_status(),
            "FILES": _FILES_CLANAGENT,
            "SEE ALSO": "clanctl(1)",
        },
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only report files out of date")
    args = ap.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if args.check and stale:
        print("out of date (run 'make cli-docs'): " + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    for p in stale:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
