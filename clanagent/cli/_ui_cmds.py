"""`clanctl ui`: open the web console of the local agent.

Owns: asking the agent (over the control socket, `ui.open`) to start its
console on 127.0.0.1 for this session and printing the one-time login URL;
`--open` hands it to the desktop's browser.  Must never: send the admin key
itself (only the path of its file, for the agent to read when it signs),
or print the URL anywhere but the terminal of the user who asked.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..control.client import ControlClient

__all__ = ["add_parsers"]


def cmd_ui(client: ControlClient, args: argparse.Namespace) -> Any:
    from ..inventory.edit import admin_key_path

    params: dict[str, Any] = {}
    key = admin_key_path(args.admin_key)
    if args.admin_key or key.exists():
        params["admin_key"] = os.path.abspath(key)
    result = client.call("ui.open", params)
    if args.json:
        return result
    print(f"web console: {result['url']}")
    minutes = max(1, int(result["expires_in"] // 60))
    print(
        f"open it in a browser on this machine (the link works once, within {minutes} min; "
        "the console listens on 127.0.0.1 only)"
    )
    admin = result["admin_key"]
    if not admin["available"]:
        print(f"read-only for admin actions (VM start/stop, inventory edits): {admin['reason']}")
    if args.open and not _open_privately(result["url"]):
        print("could not start a browser here: open the link yourself")
    return None


def _open_privately(url: str) -> bool:
    """Open `url` in the desktop's browser without putting it on a command line.

    A browser started with the URL as an argument shows the one-time token
    in /proc/PID/cmdline to every local user.  Instead the browser gets a
    file only we can read (0600 in a 0700 directory) that redirects to the
    URL (the token in it is single use and expires in minutes anyway)."""
    import contextlib
    import html
    import tempfile
    import time
    import webbrowser

    d = tempfile.mkdtemp(prefix="clanctl-ui-")  # 0700
    page = os.path.join(d, "open.html")
    fd = os.open(page, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            '<!doctype html><meta http-equiv="refresh" content="0;url='
            + html.escape(url, quote=True)
            + '"><title>clanagent</title>'
        )

    try:
        opened = webbrowser.open("file://" + page)
    except Exception:
        opened = False
    if opened:
        time.sleep(3)  # let the browser read it, then remove the only copy
    for p in (page, d):
        with contextlib.suppress(OSError):
            os.unlink(p) if p == page else os.rmdir(p)
    return opened


def add_parsers(sub: Any) -> None:
    ui = sub.add_parser("ui", help="start the web console and print a one-time login URL")
    ui.add_argument("--open", action="store_true", help="also open it in the default browser")
    ui.add_argument(
        "--admin-key",
        help="admin key file the console may sign with (default $CLANAGENT_ADMIN_KEY or "
        "~/.config/clanagent/admin.key, when it exists); the agent reads it itself",
    )
    ui.set_defaults(handler=cmd_ui)
