"""The clan this node belongs to, before it holds any inventory.

Owns: the anchor file in the state dir (clan id, name, admin keys and seed
addresses), written by `clanagent join TOKEN` or by `clanctl clan init`, and
read at start.  Must never: be written half (atomic replace), or be changed
by the network: only a local admin (CLI, control socket) sets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..durable import atomic_write
from ..wire import Limits, WireError, pack, unpack

__all__ = ["Anchor", "AnchorError", "ANCHOR_FILE", "load_anchor", "save_anchor"]

ANCHOR_FILE = "clan.anchor"
_LIMITS = Limits(max_frame=64 * 1024, max_depth=3, max_str=512, max_array=128, max_map=16)


class AnchorError(ValueError):
    pass


@dataclass(frozen=True)
class Anchor:
    clan_id: bytes
    name: str
    admins: tuple[bytes, ...]
    seeds: tuple[str, ...] = field(default_factory=tuple)
    machine: str = ""

    def to_wire(self) -> dict:
        return {
            "v": 1,
            "clan": self.clan_id,
            "name": self.name,
            "admins": sorted(self.admins),
            "seeds": list(self.seeds),
            "machine": self.machine,
        }

    @classmethod
    def from_wire(cls, value: object) -> Anchor:
        if not isinstance(value, dict) or value.get("v") != 1:
            raise AnchorError("not a clan anchor (version 1)")
        try:
            clan = value["clan"]
            admins = tuple(value["admins"])
            seeds = tuple(value["seeds"])
            name = value["name"]
            machine = value.get("machine", "")
        except (KeyError, TypeError):
            raise AnchorError("clan anchor is missing fields") from None
        if not isinstance(clan, bytes) or len(clan) != 16:
            raise AnchorError("clan anchor: clan id must be 16 bytes")
        if not admins or not all(isinstance(a, bytes) and len(a) == 32 for a in admins):
            raise AnchorError("clan anchor: admins must be 32-byte keys")
        if not all(isinstance(s, str) for s in seeds) or not isinstance(name, str):
            raise AnchorError("clan anchor: bad seeds or name")
        if not isinstance(machine, str):
            raise AnchorError("clan anchor: bad machine name")
        return cls(clan, name, admins, seeds, machine)


def load_anchor(state_dir: Path) -> Anchor | None:
    path = Path(state_dir) / ANCHOR_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return Anchor.from_wire(unpack(data, _LIMITS))
    except (WireError, AnchorError) as exc:
        raise AnchorError(
            f"{path}: {exc}: remove it and join again with 'clanagent join TOKEN'"
        ) from None


def save_anchor(state_dir: Path, anchor: Anchor) -> Path:
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / ANCHOR_FILE
    atomic_write(path, pack(anchor.to_wire()), mode=0o600)
    return path
