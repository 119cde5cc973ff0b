"""Which WireGuard backend this machine uses, and why.

Owns: `decide` (pure: what the kernel attempt gave, whether wireguard-go
is there -> a `Choice` with the backend kind and the one-line reason that
`clanctl status` shows), `open_backend` (the shell: try the kernel first by
creating -- or adopting -- the interface through netlink, fall back to
wireguard-go, never fail the agent), `close_backend` (what the agent's
stop does to each kind) and `remove_leftover` (a start without a mesh --
WireGuard turned off, or not in a clan -- deletes the kernel interface a
previous run left, when it is ours).

The probe is the real thing: the kernel is used when it can create a
WireGuard link (the kernel autoloads the module for that, as for `ip link
add ... type wireguard`), not when some file suggests a module exists.  A
machine that gets the module later switches at the next agent start: a
running mesh never swaps its interface (that would drop every tunnel), and
the userspace interface goes away when the agent stops, so the next start
probes afresh.  The kernel interface, by contrast, outlives the agent and
is adopted by the next start (no flap on a restart or an upgrade).

Must never: fall back to wireguard-go when the name is taken by an
interface that is not ours (wireguard-go would collide with it too), load a
module itself, or raise: a missing backend is a reason, not an error.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .wireguard import BackendKind, WireGuardError

__all__ = [
    "KERNEL",
    "Choice",
    "KernelAttempt",
    "decide",
    "open_backend",
    "close_backend",
    "remove_leftover",
]

KERNEL = "kernel (netlink)"
USERSPACE = "userspace (wireguard-go)"


@dataclass(frozen=True, slots=True)
class KernelAttempt:
    """What trying the kernel gave: "created", "adopted", "unavailable" (the
    kernel could not make a WireGuard link: no module, or it failed) or
    "taken" (an interface of that name is there and is not ours)."""

    outcome: str
    error: str = ""

    def __post_init__(self) -> None:
        if self.outcome not in ("created", "adopted", "unavailable", "taken"):
            raise ValueError(f"bad kernel outcome {self.outcome!r}")


@dataclass(frozen=True, slots=True)
class Choice:
    kind: BackendKind | None
    reason: str


def decide(kernel: KernelAttempt, wireguard_go: str | None, tun_ok: bool) -> Choice:
    """The backend and the reason `clanctl status` shows for it."""
    if kernel.outcome == "created":
        return Choice("kernel", KERNEL)
    if kernel.outcome == "adopted":
        return Choice("kernel", f"{KERNEL}, adopted the interface of the previous run")
    if kernel.outcome == "taken":
        return Choice(None, kernel.error)
    why = f"kernel module not available: {kernel.error}"
    if wireguard_go is None:
        return Choice(
            None, f"no WireGuard: {why}; no wireguard-go on PATH (apt install wireguard-go)"
        )
    if not tun_ok:
        return Choice(None, f"no WireGuard: {why}; wireguard-go needs /dev/net/tun")
    return Choice("userspace", f"{USERSPACE}: {why}")


async def _try_kernel(backend: Any, private_key: bytes) -> KernelAttempt:
    from .wireguard import WireGuardLocalError

    try:
        return KernelAttempt(await backend.open(private_key))
    except WireGuardLocalError as exc:
        if "exists already" in str(exc):
            return KernelAttempt("taken", str(exc))
        return KernelAttempt("unavailable", str(exc))
    except Exception as exc:  # NetlinkError(EOPNOTSUPP) without the module, EPERM, ...
        code = getattr(exc, "code", None)
        if isinstance(code, int) and code > 0:  # pyroute2's NetlinkError: (code, text)
            return KernelAttempt(
                "unavailable", f"creating a wireguard link: {os.strerror(code)} (errno {code})"
            )
        return KernelAttempt("unavailable", str(exc) or type(exc).__name__)


async def open_backend(
    name: str,
    private_key: bytes,
    *,
    netns: str | None = None,
    kernel: Callable[[str], Any] | None = None,
    userspace: Callable[[str], Any] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    tun: Path = Path("/dev/net/tun"),
) -> tuple[Any, Choice]:
    """(backend or None, choice): the kernel interface NAME (created or
    adopted), else a wireguard-go one, else None with the reason."""
    if kernel is None:
        from .wgnetlink import KernelBackend

        def kernel(n: str) -> Any:
            return KernelBackend(n, netns=netns)

    kb = kernel(name)
    attempt = await _try_kernel(kb, private_key)
    wg_go = which("wireguard-go") if attempt.outcome == "unavailable" else None
    choice = decide(attempt, wg_go, tun.exists())
    if choice.kind == "kernel":
        return kb, choice
    if choice.kind is None:
        return None, choice
    if userspace is None:
        from .uapi import UserspaceBackend

        def userspace(n: str) -> Any:
            return UserspaceBackend(n, netns=netns)

    ub = userspace(name)
    try:
        await ub.create()
    except WireGuardError as exc:
        return None, Choice(None, f"{choice.reason}; wireguard-go failed: {exc}")
    return ub, choice


async def remove_leftover(
    name: str,
    private_key: bytes,
    *,
    netns: str | None = None,
    kernel: Callable[[str], Any] | None = None,
) -> bool:
    """The agent runs without a mesh: delete the kernel interface NAME that a
    previous run left (it outlives the agent on purpose), if it is ours.
    Never raises: a machine without the module, or without the right to ask,
    has nothing of ours to remove."""
    if kernel is None:
        if netns is None:
            # Cheap first: most starts without a mesh have no such interface,
            # and need not load pyroute2 to learn that.
            try:
                socket.if_nametoindex(name)
            except OSError:
                return False
        from .wgnetlink import KernelBackend

        def kernel(n: str) -> Any:
            return KernelBackend(n, netns=netns)

    try:
        return bool(await kernel(name).remove_leftover(private_key))
    except Exception:
        return False


async def close_backend(backend: Any) -> None:
    """The agent stops.  The kernel interface stays (the kernel keeps the
    tunnels up and the next start adopts it); wireguard-go is our child
    process, so it is stopped and its interface goes with it."""
    release = getattr(backend, "release", None)
    if release is not None:
        await release()
    else:
        await backend.destroy()
