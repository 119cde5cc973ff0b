"""The agent's configuration: a TOML file where every key has a default.

Owns: the schema of `agent.toml`, its defaults, and turning a file plus
command-line overrides into one frozen `Config`.

Must never: accept a key it does not know (a typo would silently keep a
default), or guess a type; every error names the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ConfigError",
    "Config",
    "ControlConfig",
    "GossipSection",
    "MeshSection",
    "WebSection",
    "MetricsSection",
    "DEFAULT_CONFIG_PATH",
    "load_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/clanagent/agent.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


@dataclass(frozen=True)
class ControlConfig:
    # Where clanctl finds the agent.
    socket: str = "/run/clanagent/control.sock"
    # Members of this group may read and change state (like root and the agent's uid).
    group: str = ""
    # Members of this group may only call read handlers (status, peers, ...).
    read_group: str = ""
    # Largest request accepted on the control socket, in bytes.
    max_request: int = 1 << 20
    # Connections open at once on the control socket, all users together.
    max_connections: int = 64
    # Of those, how many only root and the agent's own user may take, so a
    # local user holding every other slot cannot lock the admin out.
    reserved_connections: int = 8
    # Connections one other user (uid) may hold at once.
    max_connections_per_user: int = 8


@dataclass(frozen=True)
class GossipSection:
    # HOST:PORT the peer (WebSocket) listener binds; "" disables listening.
    listen: str = "0.0.0.0:7946"
    # Seed peers, HOST:PORT each.
    join: list[str] = field(default_factory=list)
    # Timing profile: "lan", "wan" or "local" (fast, for tests on loopback).
    profile: str = "lan"
    # Clan id (hex). Until the inventory exists, peers must share it to talk.
    clan_id: str = ""
    # Node public keys (hex Ed25519) admitted to the mesh; empty = only the clan id is checked.
    admitted_keys: list[str] = field(default_factory=list)
    # Human-friendly name announced to peers; "" = the host name.
    name: str = ""
    # Seconds an incoming peer connection may take from accept to a finished
    # handshake (raise it for clans that reach each other over slow Tor paths).
    handshake_timeout: float = 5.0
    # Store quotas: records and bytes one origin may have stored here, and in
    # all (docs/security.md). Beyond them a record is refused and counted.
    max_records_per_origin: int = 4096
    max_bytes_per_origin: int = 8 * 1024 * 1024
    max_records: int = 200_000
    max_bytes: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class MeshSection:
    # Build the WireGuard mesh (needs CAP_NET_ADMIN and WireGuard; otherwise
    # reported unavailable and skipped).
    wireguard: bool = True
    # Name of the WireGuard interface the agent creates (and only ever touches).
    interface: str = "clan0"
    # UDP port WireGuard listens on.
    wg_port: int = 51820
    # TCP port, on this machine's overlay address only, where other agents open
    # VM console sessions (`clanctl vm console`); 0 = no remote consoles.
    console_port: int = 7947
    # Optional IPv4 overlay range (e.g. "100.64.0.0/16"); "" = IPv6 overlay only.
    ipv4_range: str = ""
    # Advertise and browse on the LAN with mDNS.
    mdns: bool = True
    # Tor: "off", "attach" (to a running tor's control port/socket) or "start" (our own tor).
    tor: str = "off"
    # For tor = "attach": HOST:PORT of the control port, or the path of the control socket.
    tor_control: str = ""
    # This machine's own public HOST:PORT addresses to advertise (besides the inventory's).
    public_endpoints: list[str] = field(default_factory=list)
    # As a relay (tagged `relay`): forwarding limit across all relayed pairs
    # together, in MiB/s and packets/s, and per pair in MiB/s (its packet
    # rate and bursts scale with it: 4 MiB/s is 4000 packets/s, bursts of
    # 1 MiB and 1000 packets).
    relay_max_mibps: float = 16.0
    relay_max_pps: float = 16000.0
    relay_pair_mibps: float = 4.0


@dataclass(frozen=True)
class WebSection:
    # Serve the web console from the start (on 127.0.0.1 only). `clanctl ui`
    # starts it for the running agent's lifetime even when this is false.
    enabled: bool = False
    # TCP port on 127.0.0.1; 0 = any free port (`clanctl ui` prints the URL).
    port: int = 7780
    # Admin key file the console may sign with (VM orders, inventory edits);
    # "" = $CLANAGENT_ADMIN_KEY or ~/.config/clanagent/admin.key of the agent's
    # user, like clanctl.  Without a readable key those actions are disabled.
    admin_key: str = ""


@dataclass(frozen=True)
class MetricsSection:
    # HOST:PORT where Prometheus scrapes /metrics over HTTP (e.g.
    # "127.0.0.1:9946"); "" = no listener (`clanctl metrics` still answers).
    listen: str = ""


@dataclass(frozen=True)
class Config:
    state_dir: str = "/var/lib/clanagent"
    runtime_dir: str = "/run/clanagent"
    log_level: str = "info"
    # How often the agent tells systemd it is alive when WATCHDOG_USEC is set is
    # derived from that variable; this bounds shutdown time in seconds.
    shutdown_timeout: float = 2.0
    # Owner of secret files ("USER" or "USER:GROUP"); a service's settings can
    # override it with `secrets_owner`. "" = the agent's user.
    secrets_owner: str = ""
    control: ControlConfig = field(default_factory=ControlConfig)
    gossip: GossipSection = field(default_factory=GossipSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    web: WebSection = field(default_factory=WebSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)

    @property
    def control_socket(self) -> Path:
        return Path(self.control.socket)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got a boolean")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in known:
            choices = ", ".join(sorted(known))
            raise ConfigError(f"unknown key '{where}' (known keys here: {choices})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a table [{where}]")
            kwargs[key] = _build(tp, value, f"{where}.")
        else:
            kwargs[key] = _coerce(value, tp, where)
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level: '{cfg.log_level}' is not one of {', '.join(LOG_LEVELS)}")
    if cfg.gossip.profile not in ("lan", "wan", "local"):
        raise ConfigError(f"gossip.profile: '{cfg.gossip.profile}' is not lan, wan or local")
    if not 0 < cfg.gossip.handshake_timeout <= 60:
        raise ConfigError("gossip.handshake_timeout: must be in (0, 60] seconds")
    for key in ("max_records_per_origin", "max_bytes_per_origin", "max_records", "max_bytes"):
        if getattr(cfg.gossip, key) < 1:
            raise ConfigError(f"gossip.{key}: must be at least 1")
    if cfg.gossip.max_records_per_origin > cfg.gossip.max_records:
        raise ConfigError("gossip.max_records_per_origin: must not exceed gossip.max_records")
    if cfg.gossip.max_bytes_per_origin > cfg.gossip.max_bytes:
        raise ConfigError("gossip.max_bytes_per_origin: must not exceed gossip.max_bytes")
    if cfg.shutdown_timeout <= 0:
        raise ConfigError("shutdown_timeout: must be > 0")
    if cfg.control.max_request < 1024:
        raise ConfigError("control.max_request: must be at least 1024 bytes")
    ctl = cfg.control
    if not 0 <= ctl.reserved_connections < ctl.max_connections:
        raise ConfigError(
            "control.reserved_connections: must be 0 or more and below "
            f"control.max_connections ({ctl.max_connections})"
        )
    if ctl.max_connections_per_user < 1:
        raise ConfigError("control.max_connections_per_user: must be at least 1")
    for i, addr in enumerate(cfg.gossip.join):
        _split_hostport(addr, f"gossip.join[{i}]")
    if cfg.gossip.listen:
        _split_hostport(cfg.gossip.listen, "gossip.listen")
    if cfg.mesh.tor not in ("off", "attach", "start"):
        raise ConfigError(f"mesh.tor: '{cfg.mesh.tor}' is not off, attach or start")
    if not 0 < cfg.mesh.wg_port < 65536:
        raise ConfigError("mesh.wg_port: must be 1..65535")
    if not 0 <= cfg.mesh.console_port < 65536:
        raise ConfigError("mesh.console_port: must be 0..65535 (0 = off)")
    if not cfg.mesh.interface or len(cfg.mesh.interface) > 15 or "/" in cfg.mesh.interface:
        raise ConfigError("mesh.interface: must be 1..15 characters, no '/'")
    for i, addr in enumerate(cfg.mesh.public_endpoints):
        _split_hostport(addr, f"mesh.public_endpoints[{i}]")
    if not (cfg.mesh.relay_max_mibps > 0 and cfg.mesh.relay_max_pps > 0):
        raise ConfigError("mesh.relay_max_mibps, mesh.relay_max_pps: must be > 0")
    if not cfg.mesh.relay_pair_mibps > 0:
        raise ConfigError("mesh.relay_pair_mibps: must be > 0")
    if cfg.mesh.ipv4_range:
        import ipaddress

        try:
            net = ipaddress.IPv4Network(cfg.mesh.ipv4_range)
        except ValueError:
            raise ConfigError(
                f"mesh.ipv4_range: '{cfg.mesh.ipv4_range}' is not an IPv4 network"
            ) from None
        if net.num_addresses < 4:
            raise ConfigError("mesh.ipv4_range: needs at least a /30")
    if not 0 <= cfg.web.port < 65536:
        raise ConfigError(
            f"web.port: {cfg.web.port} is not a TCP port (1..65535, or 0 for any free port)"
        )
    if cfg.metrics.listen:
        _split_hostport(cfg.metrics.listen, "metrics.listen")
    if cfg.gossip.clan_id:
        try:
            bytes.fromhex(cfg.gossip.clan_id)
        except ValueError:
            raise ConfigError("gossip.clan_id: must be hex") from None
    for i, k in enumerate(cfg.gossip.admitted_keys):
        try:
            ok = len(bytes.fromhex(k)) == 32
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"gossip.admitted_keys[{i}]: must be a 64-digit hex Ed25519 key")


def _split_hostport(addr: str, where: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: '{addr}' is not HOST:PORT")
    return host.strip("[]"), int(port)


split_hostport = _split_hostport


def load_config(
    path: Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    required: bool = False,
) -> Config:
    """Read `path` (default /etc/clanagent/agent.toml), then apply `overrides`.

    Overrides use dotted keys ("control.socket") and are checked like file
    keys.  A missing default file is fine (every key has a default); a missing
    file that was named explicitly (`required`) is an error.
    """
    path = path or DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    if path.exists():
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    elif required:
        raise ConfigError(f"{path}: no such config file (omit --config to use the defaults)")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    try:
        cfg = _build(Config, data, "")
        _check(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return cfg
