"""`clanagent`: run the daemon, or do local admin work (keygen).

Owns: argument parsing, config loading with flag overrides, signal handling
and exit codes.  Must never: print a traceback for a user error (bad config,
unwritable state dir): a CommandError, printed as one line naming the
problem and the fix, exit 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import resource
import signal
import sys
from pathlib import Path

import trio

from .. import __version__
from .._log import kv, setup_logging
from ..config import DEFAULT_CONFIG_PATH, ConfigError, load_config, split_hostport
from .errors import EXIT_CODES_HELP, CommandError, Exit

log = logging.getLogger("clanagent.cli")

FD_LIMIT_CAP = 65536  # the unit's LimitNOFILE; more buys nothing but kernel memory


def raise_fd_limit(cap: int = FD_LIMIT_CAP) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to min(hard, cap); the (soft, hard) now in force.

    Every peer, control client and console connection costs an fd, and the default
    soft limit (1024) is low enough that a flood on one listener could leave the
    agent unable to open its store.  Never lowers the limit; a refusal is logged
    and the agent runs on with what it has.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open file limit", extra=kv(soft=soft, error=str(exc)))
            return soft, hard
        log.info("open file limit raised", extra=kv(was=soft, now=want, hard=hard))
        return want, hard
    log.info("open file limit", extra=kv(soft=soft, hard=hard))
    return soft, hard


def _listen(text: str) -> str:
    """--listen: HOST:PORT, or "" for do not listen."""
    return text if text == "" else _hostport(text)


def _hostport(text: str) -> str:
    """A HOST:PORT flag value, checked where the flag is named (not blamed on agent.toml)."""
    try:
        split_hostport(text, "HOST:PORT")
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"'{text}' is not HOST:PORT (e.g. 0.0.0.0:7946 or [::]:7946)"
        ) from None
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clanagent",
        description="The clan's peer-to-peer agent.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"clanagent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent in the foreground (what systemd starts)")
    run.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    run.add_argument("--state-dir", help="where keys and records live")
    run.add_argument("--control-socket", help="path of the control socket")
    run.add_argument(
        "--listen",
        type=_listen,
        metavar="HOST:PORT",
        help='address for peer connections (default 0.0.0.0:7946; "" = do not listen)',
    )
    run.add_argument(
        "--join",
        action="append",
        type=_hostport,
        metavar="HOST:PORT",
        help="seed peer address (repeatable)",
    )
    run.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="how much to log"
    )

    kg = sub.add_parser("keygen", help="create this node's keys (run also does it on first start)")
    kg.add_argument("--state-dir", required=True, type=Path, help="where the keys live")

    vi = sub.add_parser("vm-image", help="build a minimal VM image (kernel + busybox initramfs)")
    vi.add_argument("dir", type=Path, help="where to write vmlinux and initramfs.cpio.gz")

    jn = sub.add_parser("join", help="make this machine a member of a clan (token from an admin)")
    jn.add_argument("token", help="the token printed by 'clanctl machine add' or 'clanctl invite'")
    jn.add_argument("--config", type=Path, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    jn.add_argument(
        "--state-dir",
        type=Path,
        help="where keys and records live (default: state_dir of the config)",
    )
    return p


def _overrides(args: argparse.Namespace) -> dict:
    o: dict = {}
    if args.state_dir:
        o["state_dir"] = str(args.state_dir)
    if args.control_socket:
        o["control.socket"] = args.control_socket
    if args.log_level:
        o["log_level"] = args.log_level
    if args.listen is not None:
        o["gossip.listen"] = args.listen
    if args.join:
        o["gossip.join"] = args.join
    return o


async def _run_agent(cfg) -> int:
    from ..agent import Agent

    agent = Agent(cfg)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                async for signum in signals:
                    log.info("signal received", extra=kv(signal=signal.Signals(signum).name))
                    agent.stop()
                    # Bound the stop: whatever still runs after the timeout is cancelled.
                    await trio.sleep(cfg.shutdown_timeout)
                    log.warning("stop took too long; cancelling")
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(on_signal)
            await agent.run()
            nursery.cancel_scope.cancel()
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, overrides=_overrides(args), required=args.config is not None)
    except ConfigError as exc:
        raise CommandError(f"config error: {exc}", exit_code=Exit.USAGE) from None
    setup_logging(cfg.log_level)
    raise_fd_limit()
    try:
        try:
            return trio.run(_run_agent, cfg)
        except BaseExceptionGroup as group:
            # A start-up failure inside a nursery arrives wrapped; show the one cause.
            leaves = _leaves(group)
            if len(leaves) == 1 and isinstance(leaves[0], Exception):
                raise leaves[0] from None
            raise
    except PermissionError as exc:
        raise CommandError(
            f"permission denied: {exc.filename or exc}: run as root, or point "
            "--state-dir and --control-socket at directories this user can write",
            exit_code=Exit.USAGE,
        ) from None
    except ValueError as exc:  # AnchorError: a damaged clan anchor file
        from ..inventory.anchor import AnchorError

        if isinstance(exc, AnchorError):
            raise CommandError(str(exc), exit_code=Exit.USAGE) from None
        raise
    except RuntimeError as exc:
        if "already listening" in str(exc):
            raise CommandError(str(exc), exit_code=Exit.USAGE) from None
        raise
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            # The gossip port: the other listeners (web console, mesh probes)
            # degrade to a capability instead of stopping the agent.
            raise CommandError(
                f"cannot listen on gossip.listen = {cfg.gossip.listen!r}: "
                "address already in use (another agent or program holds that port); "
                "stop it, or set gossip.listen (or --listen) to a free port",
                exit_code=Exit.USAGE,
            ) from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _cmd_keygen(args: argparse.Namespace) -> int:
    from ..identity import IdentityError, load_or_create, machine_key_string, wg_key_base64

    try:
        ident, created = load_or_create(args.state_dir)
    except (IdentityError, PermissionError) as exc:
        raise CommandError(str(exc), exit_code=Exit.USAGE) from None
    print(f"{'created' if created else 'existing'} keys in {args.state_dir}")
    print(f"node id:        {ident.node_id}")
    print(f"short id:       {ident.short_id}")
    print(f"signing key:    {ident.public_key.hex()}")
    print(f"wireguard key:  {wg_key_base64(ident.wg_public)}")
    print(f"machine key:    {machine_key_string(ident)}")
    print("give the machine key to a clan admin: clanctl machine add NAME --key MACHINE_KEY")
    return 0


def _cmd_join(args: argparse.Namespace) -> int:
    from ..identity import IdentityError, load_or_create, machine_key_string
    from ..inventory.anchor import Anchor, save_anchor
    from ..inventory.token import TokenError, parse_token

    try:
        token = parse_token(args.token)
    except TokenError as exc:
        raise CommandError(f"bad join token: {exc}", exit_code=Exit.USAGE) from None
    state_dir = args.state_dir
    if state_dir is None:  # the agent's own, so 'clanagent run' finds the anchor
        try:
            cfg = load_config(args.config, required=args.config is not None)
        except ConfigError as exc:
            raise CommandError(f"config error: {exc}", exit_code=Exit.USAGE) from None
        state_dir = Path(cfg.state_dir)
    try:
        ident, _ = load_or_create(state_dir)
        anchor = Anchor(
            token.clan_id, token.name, tuple(token.admins), tuple(token.seeds), token.machine
        )
        path = save_anchor(state_dir, anchor)
    except (IdentityError, OSError) as exc:
        raise CommandError(f"cannot join: {exc}", exit_code=Exit.USAGE) from None
    print(f"joined clan '{token.name}' ({token.clan_id.hex()}) as machine '{token.machine}'")
    print(f"seeds: {', '.join(token.seeds) or '(none)'}; anchor written to {path}")
    print(f"this machine's key: {machine_key_string(ident)}")
    print("now start the agent: systemctl restart clanagent (or 'clanagent run')")
    return 0


def _cmd_vm_image(args: argparse.Namespace) -> int:
    from ..vmhost.image import build_image
    from ..vmhost.spec import VmHostError

    try:
        kernel, initrd = build_image(args.dir)
    except VmHostError as exc:
        raise CommandError(f"cannot build a VM image: {exc}", exit_code=Exit.USAGE) from None
    print(f'kernel = "{kernel}"\ninitrd = "{initrd}"')
    return 0


_COMMANDS = {"run": _cmd_run, "keygen": _cmd_keygen, "join": _cmd_join, "vm-image": _cmd_vm_image}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except CommandError as exc:
        print(f"clanagent: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
