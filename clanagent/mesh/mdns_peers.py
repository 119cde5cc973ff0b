"""What we announce over mDNS and what answers mean, sans-IO.

Owns: the TXT record (a personalised hash of the clan id, never the id or
name; our node key; our WireGuard port), decoding answers (malformed ones are
dropped, never raised), filtering other clans and ourselves, and the table of
instances -> LAN candidates per node key.  Must never: import trio or
zeroconf, or do any I/O.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .paths import Candidate

SERVICE_TYPE = "_clan._tcp.local."


TXT_VERSION = "1"


_TAG_PERSON = b"clan-mdns"


_TAG_BYTES = 8  # 64 bits: no accidental collision between clans on one LAN


NODE_KEY_LEN = 32


MAX_ADDRESSES = 16  # per announcement; more is someone flooding us


def clan_tag(clan_id: bytes) -> str:
    """The clan's mDNS tag: first 8 bytes (hex) of BLAKE2b(clan_id, person=b"clan-mdns")."""
    return hashlib.blake2b(clan_id, digest_size=_TAG_BYTES, person=_TAG_PERSON).hexdigest()


def encode_txt(clan_id: bytes, node_key: bytes, *, wg_port: int | None = None) -> dict[str, str]:
    """Our TXT properties."""
    if len(node_key) != NODE_KEY_LEN:
        raise ValueError("node key must be 32 bytes")
    txt = {"v": TXT_VERSION, "c": clan_tag(clan_id), "n": node_key.hex()}
    if wg_port:
        txt["w"] = str(wg_port)
    return txt


@dataclass(frozen=True, slots=True)
class Announcement:
    """A decoded TXT record of some node on the LAN (of any clan)."""

    clan_tag: str
    node_key: bytes
    wg_port: int | None


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


def decode_txt(properties: Mapping[Any, Any] | None) -> Announcement | None:
    """Our TXT fields from zeroconf's properties (bytes or str keys), or None when malformed.

    Never raises: every byte here comes from any host on the LAN. An unknown
    version is "malformed" too: a future format is free to change fields.
    """
    if not isinstance(properties, Mapping):
        return None
    fields: dict[str, str] = {}
    for k, v in properties.items():
        key, value = _text(k), _text(v)
        if key is not None and value is not None:
            fields[key] = value
    if fields.get("v") != TXT_VERSION:
        return None
    tag, key_hex = fields.get("c", ""), fields.get("n", "")
    if len(tag) != 2 * _TAG_BYTES or len(key_hex) != 2 * NODE_KEY_LEN:
        return None
    try:
        bytes.fromhex(tag)
        node_key = bytes.fromhex(key_hex)
    except ValueError:
        return None
    if tag != tag.lower() or key_hex != key_hex.lower():
        return None  # one canonical spelling, so equal means equal
    wg_port: int | None = None
    if "w" in fields:
        w = fields["w"]
        if not w.isdigit() or not 0 < int(w) < 65536 or w != str(int(w)):
            return None
        wg_port = int(w)
    return Announcement(tag, node_key, wg_port)


def format_address(ip: str, port: int) -> str | None:
    """'ip:port' / '[v6]:port' for an address a peer can dial, else None.

    Loopback, unspecified, multicast and link-local addresses are dropped:
    link-local needs a scope (the interface) that means nothing to the
    peer's path selection and WireGuard endpoint.
    """
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if addr.is_loopback or addr.is_unspecified or addr.is_multicast or addr.is_link_local:
        return None
    return f"[{addr.compressed}]:{port}" if addr.version == 6 else f"{addr.compressed}:{port}"


Change = tuple[bytes, tuple[Candidate, ...]]  # node key -> its full mDNS candidate set now


class MdnsPeers:
    """Sans-IO table: mDNS service instances -> LAN candidates per node key.

    Feed it `resolved(...)` for an added/updated instance and `gone(name)`
    for a removed one; each returns the changes: (node key, the node's full
    candidate set now), an empty set meaning "no longer seen". A node may
    show up under several instance names (a restart that had to rename);
    its candidates are the union. `ignored` counts what was dropped, by why.
    """

    def __init__(self, clan_id: bytes, own_key: bytes) -> None:
        self._tag = clan_tag(clan_id)
        self._own = own_key
        self._by_name: dict[str, tuple[bytes, frozenset[Candidate]]] = {}
        self._current: dict[bytes, tuple[Candidate, ...]] = {}
        self.ignored: dict[str, int] = {"other_clan": 0, "own": 0, "malformed": 0}

    def candidates(self) -> dict[bytes, tuple[Candidate, ...]]:
        return dict(self._current)

    def resolved(
        self, name: str, properties: Mapping[Any, Any] | None, addresses: Iterable[str], port: int
    ) -> list[Change]:
        ann = decode_txt(properties)
        why = None
        if ann is None:
            why = "malformed"
        elif ann.clan_tag != self._tag:
            why = "other_clan"
        elif ann.node_key == self._own:
            why = "own"
        if why is not None or ann is None:
            self.ignored[why or "malformed"] += 1
            # An instance that turned into garbage (or left the clan) is gone for us.
            return self.gone(name)
        cands = set()
        for ip in list(addresses)[:MAX_ADDRESSES]:
            address = format_address(ip, port)
            if address is not None:
                cands.add(Candidate(ann.node_key, "lan", address, "mdns", ann.wg_port))
        old = self._by_name.get(name)
        self._by_name[name] = (ann.node_key, frozenset(cands))
        keys = {ann.node_key} | ({old[0]} if old else set())
        return self._recompute(keys)

    def gone(self, name: str) -> list[Change]:
        old = self._by_name.pop(name, None)
        return self._recompute({old[0]}) if old else []

    def _recompute(self, keys: set[bytes]) -> list[Change]:
        changes: list[Change] = []
        for key in sorted(keys):
            union: set[Candidate] = set()
            for k, cands in self._by_name.values():
                if k == key:
                    union |= cands
            new = tuple(sorted(union, key=lambda c: c.address))
            if new == self._current.get(key, ()):
                continue
            if new:
                self._current[key] = new
            else:
                self._current.pop(key, None)
            changes.append((key, new))
        return changes


__all__ = [
    "SERVICE_TYPE",
    "TXT_VERSION",
    "_TAG_PERSON",
    "_TAG_BYTES",
    "NODE_KEY_LEN",
    "MAX_ADDRESSES",
    "clan_tag",
    "encode_txt",
    "Announcement",
    "_text",
    "decode_txt",
    "format_address",
    "Change",
    "MdnsPeers",
]
