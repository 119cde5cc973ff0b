"""systemd's notify protocol: one datagram to $NOTIFY_SOCKET per state change.

Owns: READY=1 / STOPPING=1 / WATCHDOG=1 / STATUS= messages.  Must never:
fail the agent when there is no systemd (no NOTIFY_SOCKET means do nothing),
or pull in a dependency for a one-line protocol.
"""

from __future__ import annotations

import os
import socket

__all__ = ["Notifier", "watchdog", "watchdog_interval"]


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace.
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        self.sent = 0
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *states: str) -> bool:
        if not self.address:
            return False
        msg = "\n".join(states).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(msg, self.address)
        except OSError:
            # systemd went away or the socket is gone: never fatal to the agent.
            self.errors += 1
            return False
        self.sent += 1
        return True


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC in seconds, if the watchdog is for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6 / 2


async def watchdog(notifier: Notifier, interval: float) -> None:
    """Tell systemd we are alive every `interval` seconds (WATCHDOG=1)."""
    import trio

    while True:
        notifier.notify("WATCHDOG=1")
        await trio.sleep(interval)
