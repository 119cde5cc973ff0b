"""The gossip service: the trio shell around `GossipNode`.

Owns: the peer listener, dialing peers by address and keeping one
authenticated session per peer, moving datagrams between sessions and the
node, the node's timers on trio's clock, persisting records in a worker
thread before the node acts on them, and turning node actions into events
and log lines.  Must never: put protocol logic here (it belongs in node.py
and below), block the event loop (store writes run in a thread), let one
peer's failure touch another's session, or reach for the agent: it is given
exactly what it uses (identity, store, name, config, clan anchor, the
admission and record-check hooks, where stored records and membership
changes go, the event sink, and how to reach our tor) as keyword arguments.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .. import __version__
from .._log import kv
from ..capabilities import Capability
from ..config import ConfigError, split_hostport
from ..fd_reserve import PROCESS as PROCESS_FDS
from ..records import soft_ttl
from ..wire import NodeInfo
from .admission import MAX_SESSIONS, AdmissionLimits, FaultLog, SessionTable
from .config import GossipConfig
from .errors import GossipError, PeerDisconnected, RemoteProtocolError
from .node import (
    SCORE_FLOOR,
    GossipNode,
    MemberChanged,
    NodeAction,
    PeerMisbehaved,
    Persist,
    RecordAccepted,
    SendTo,
)
from .peer import HANDSHAKE_DEADLINE, PeerListener, PeerSession, connect
from .rejoin import (
    MAX_PEERS,
    PEER_BOOK_FILE,
    PeerBookError,
    PeerEntry,
    load_peer_book,
    save_peer_book,
)

if TYPE_CHECKING:
    from ..config import GossipSection
    from ..identity import Identity
    from ..inventory.anchor import Anchor
    from ..ports import EventSink
    from ..wire import SignedRecord

__all__ = ["GossipService", "DEFAULT_CLAN_ID", "profile_config", "addr_to_url"]

log = logging.getLogger("clanagent.gossip")

# Until the inventory names a clan, agents that set no clan id share this one.
DEFAULT_CLAN_ID = b"clanagent-default-clan"
OUTBOX = 256  # datagrams queued per peer before we drop (like a full socket buffer)
MAX_DIALS = 64  # outgoing dials in progress at once; beyond, the datagram is dropped
DIAL_TIMEOUT = 5.0
ONION_DIAL_TIMEOUT = 120.0  # a Tor circuit to an onion service, then the handshake
# How a dial fails in the ordinary course of things (a bad address from a peer,
# DNS, a refused or silent port, a refused handshake): counted, not a fault.
_DIAL_FAILURES = (GossipError, ConfigError, OSError)
JOIN_RETRY = 2.0
MISBEHAVED_LOG_INTERVAL = 60.0  # seconds between "peer misbehaved" warnings per peer
MAX_MISBEHAVED_LOG = 1024  # peers remembered for that (the oldest is forgotten)
# Remembered peer addresses dialed per join round (besides the seeds); the
# rounds go through the whole peer book, most recently alive first.
JOIN_SAMPLE = 4
# The peer book is written when membership changed, after PEER_BOOK_SETTLE
# (a burst of joins makes one write) and at most every PEER_BOOK_INTERVAL,
# and once more on a graceful stop.
PEER_BOOK_SETTLE = 1.0
PEER_BOOK_INTERVAL = 10.0


def profile_config(name: str) -> GossipConfig:
    return {"lan": GossipConfig.lan, "wan": GossipConfig.wan, "local": GossipConfig.local}[name]()


def addr_to_url(addr: str) -> str:
    host, port = split_hostport(addr, "address")
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{port}/"


def _wildcard_host() -> str:
    """An address of ours that peers can dial, for a wildcard listener."""
    try:
        from ..mesh.localaddrs import local_addresses

        v4 = [a for a in local_addresses() if ":" not in a]
        if v4:
            return v4[0]
    except Exception:  # no netlink (unusual): fall back to the resolver
        pass
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _advertise(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


class _Link:
    """One live session and its writer queue."""

    def __init__(self, session: PeerSession) -> None:
        self.session = session
        self.send, self.recv = trio.open_memory_channel[bytes](OUTBOX)
        self.dropped = 0
        self.in_flight = 0

    @property
    def busy(self) -> bool:
        return self.in_flight > 0 or self.recv.statistics().current_buffer_used > 0


class _NoEvents:
    def publish(self, topic: str, **fields: Any) -> None:
        pass


class GossipService:
    """`admit_peer(public_key)` and `admit_record(record)` answer True/False,
    or None to leave it to the configured admitted keys; `validate(record)`
    raises `records.Refusal` for a body we must not take; `on_record(record)`
    hears every record stored (ours or a peer's); `on_member_changed(node_id)` hears
    joins, leaves and failures; `tor()` is our running tor (for onion
    addresses) or None.  All run on the event loop and must not block."""

    def __init__(
        self,
        cfg: GossipSection,
        *,
        identity: Identity,
        store: Any,
        name: str,
        state_path: Path | None = None,
        anchor: Anchor | None = None,
        admit_peer: Callable[[bytes], bool | None] | None = None,
        admit_record: Callable[[SignedRecord], bool | None] | None = None,
        validate: Callable[[SignedRecord], None] | None = None,
        on_record: Callable[[SignedRecord], None] | None = None,
        on_member_changed: Callable[[str], None] | None = None,
        events: EventSink | None = None,
        tor: Callable[[], Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.identity = identity
        self.store = store
        self.name = name
        self.anchor = anchor
        self._admit_peer = admit_peer
        self._admit_record = admit_record
        self._validate = validate
        self._on_record = on_record
        self._on_member_changed = on_member_changed
        self.events: EventSink = events if events is not None else _NoEvents()
        self._tor = tor
        self.config = profile_config(cfg.profile)
        if anchor is not None:
            self.clan = anchor.clan_id
            self.seeds = list(dict.fromkeys([*cfg.join, *anchor.seeds]))
        else:
            self.clan = bytes.fromhex(cfg.clan_id) if cfg.clan_id else DEFAULT_CLAN_ID
            self.seeds = list(cfg.join)
        self._admitted = {bytes.fromhex(k) for k in cfg.admitted_keys}
        self.node: GossipNode | None = None
        self.addr = ""
        self.port: int | None = None  # the port we listen on, once listening
        self.listen_host = ""
        self._links: OrderedDict[str, _Link] = OrderedDict()  # by node id
        self._by_addr: dict[str, str] = {}  # dialed address -> node id
        self._dialing: dict[str, list[bytes]] = {}  # address -> datagrams waiting for the dial
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()
        self._joined = False
        self.stats = {"dial_failures": 0, "dropped": 0, "persist_failures": 0}
        self.listener: PeerListener | None = None
        self.limits = AdmissionLimits(max_sessions=MAX_SESSIONS)
        self._sessions = SessionTable(self.limits)  # every live session, incoming and dialed
        self._faults = FaultLog()
        # peer -> (when we last warned, offences held back since)
        self._misbehaved_log: dict[str, tuple[float | None, int]] = {}
        self._counts = {
            "dials_refused": 0,
            "peer_book_writes": 0,
            "peer_book_failures": 0,
            "peer_book_skipped": 0,
        }
        # The peer book: addresses of peers remembered across restarts.
        self._book_path: Path | None = (
            None if state_path is None else Path(state_path) / PEER_BOOK_FILE
        )
        self._book: list[PeerEntry] = []  # as last loaded or written
        self._book_dirty = False
        self._book_changed = trio.Event()
        self._book_warned: set[str] = set()
        # Node ids of the members we may retry when lost: the inventory's
        # machines (see on_inventory); before one, the configured admitted keys.
        self._scope: frozenset[str] | None = None
        if self._admitted:
            from ..identity import node_id_of

            self._scope = frozenset(node_id_of(k) for k in self._admitted if len(k) == 32)

    # -- policy ----------------------------------------------------------------

    def admit(self, public_key: bytes) -> bool:
        """May this node key open a session with us?"""
        if self._admit_peer is not None:
            verdict = self._admit_peer(public_key)
            if verdict is not None:
                return verdict
        return not self._admitted or public_key in self._admitted

    def admit_record(self, rec: Any) -> bool:
        """May a record from this origin be stored and forwarded?"""
        if self._admit_record is not None:
            verdict = self._admit_record(rec)
            if verdict is not None:
                return verdict
        return self.admit(rec.origin)

    # -- views for the control API -------------------------------------------

    def capability(self) -> Capability:
        if self.node is None:
            return Capability("gossip", False, "not started")
        return Capability(
            "gossip", True, f"listening on {self.addr or '(not listening)'} ({self.cfg.profile})"
        )

    def member_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        if self.node is None:
            return counts
        for m in self.node.members():
            counts[m["state"]] = counts.get(m["state"], 0) + 1
        return counts

    def peer_table(self) -> list[dict[str, Any]]:
        if self.node is None:
            return []
        from ..identity import short_id_of

        now, wall = trio.current_time(), time.time()
        rows = []
        for m in self.node.members():
            if m["self"]:
                continue
            seen = m["last_seen"]
            rows.append(
                {
                    **m,
                    "short_id": short_id_of(m["node_id"]),
                    "last_seen": None if seen is None else wall - (now - seen),
                    "state_change": wall - (now - m["state_change"]),
                    "connected": m["node_id"] in self._links,
                }
            )
        rows.sort(key=lambda r: (r["name"], r["node_id"]))
        return rows

    def counters(self) -> dict[str, int]:
        """Every counter of the gossip part: the service's, the listener's and
        the node's (keys that appear in several are summed)."""
        out: dict[str, int] = {}
        parts = [self.stats, self._counts, self._faults.counts, self._sessions.counts]
        if self.listener is not None:
            parts.append(self.listener.counters())
        node_counters = getattr(self.node, "counters", None)
        if callable(node_counters):
            parts.append(node_counters())
        for part in parts:
            for key, value in part.items():
                out[key] = out.get(key, 0) + value
        out["sessions"] = len(self._sessions)
        out["dials_in_progress"] = len(self._dialing)
        return out

    # -- running ----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        identity = self.identity
        if not self.cfg.clan_id and self.anchor is None:
            log.warning(
                "no clan id configured; using the default clan (set gossip.clan_id)",
            )
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            port = 0
            if self.cfg.listen:
                host, want = split_hostport(self.cfg.listen, "gossip.listen")
                self.listener = PeerListener(
                    host,
                    want,
                    identity,
                    self.clan,
                    self.admit,
                    self._on_incoming,
                    timeout=getattr(self.cfg, "handshake_timeout", HANDSHAKE_DEADLINE),
                    limits=self.limits,
                )
                port = await nursery.start(self.listener.run)
                if host in ("", "0.0.0.0", "::"):
                    host_ip = await trio.to_thread.run_sync(_wildcard_host)
                else:
                    host_ip = host
                self.addr = _advertise(host_ip, port)
                self.port = port
                self.listen_host = host
            else:
                # Not listening: peers can still talk back over our outgoing sessions.
                self.addr = f"outbound-only:{identity.short_id}"
            await self._load_peer_book()
            self.node = GossipNode(
                identity,
                self.config,
                addr=self.addr,
                clan=self.clan,
                store=self.store,
                rng=random.Random(),
                now=trio.current_time(),
                name=self.name,
                admit=self.admit_record,
                # every record body is checked (clanagent/records.py) before
                # it is stored or forwarded
                validate=self._validate,
                wall_clock=time.time,
                soft_ttl=soft_ttl,
            )
            log.info(
                "gossip started",
                extra=kv(addr=self.addr, profile=self.cfg.profile, seeds=",".join(self.seeds)),
            )
            self.node.set_rejoin_scope(self._scope)
            nursery.start_soon(self._timer_loop)
            info = NodeInfo(name=self.name, version=__version__, addrs=[self.addr])
            self._publish("node-info", "", info.to_wire())
            if self.seeds or self._book:
                nursery.start_soon(self._join_loop)
            if self._book_path is not None:
                nursery.start_soon(self._peer_book_loop)
            task_status.started(self)

    def _publish(self, kind: str, key: str, body: Any, push: bool = True) -> None:
        assert self.node is not None
        _, actions = self.node.publish(trio.current_time(), kind, key, body, push=push)
        self._handle(actions)

    def publish(self, kind: str, key: str, body: Any, *, push: bool = True) -> None:
        """Sign and spread a record of ours (`push=False`: by anti-entropy only,
        see GossipNode.publish)."""
        self._publish(kind, key, body, push)

    def add_seed(self, addr: str) -> None:
        """A new way to reach the clan (LAN discovery): contact it now."""
        if addr == self.addr or self.node is None:
            return
        if addr not in self.seeds:
            self.seeds.append(addr)
        self._handle(self.node.join(trio.current_time(), [addr]))

    def on_inventory(self, node_keys: frozenset[bytes]) -> None:
        """A new inventory: close sessions of machines that are no longer in it,
        and retry lost members only while it lists them."""
        from ..identity import node_id_of

        self._scope = frozenset(node_id_of(k) for k in node_keys)
        if self.node is not None:
            self.node.set_rejoin_scope(self._scope)
        for node_id, link in list(self._links.items()):
            if link.session.peer_public_key not in node_keys:
                log.info(
                    "disconnecting a machine removed from the inventory",
                    extra=kv(node=node_id[:10]),
                )
                self._drop_link(node_id)

    async def _join_loop(self) -> None:
        """Contact the seeds and the remembered peers until some other member
        is alive (seeds may start later; remembered peers may have moved)."""
        assert self.node is not None
        book = [e.addr for e in self._book if e.addr != self.addr]
        turn = 0
        while True:
            sample = []
            if book:
                for i in range(min(JOIN_SAMPLE, len(book))):
                    sample.append(book[(turn + i) % len(book)])
                turn = (turn + JOIN_SAMPLE) % len(book)
            targets = list(dict.fromkeys([*self.seeds, *sample]))
            self._handle(self.node.join(trio.current_time(), targets))
            await trio.sleep(JOIN_RETRY)
            if self.node.membership.alive_count() > 1:
                if not self._joined:
                    self._joined = True
                    log.info(
                        "joined the clan", extra=kv(members=self.node.membership.alive_count())
                    )
                return

    async def _timer_loop(self) -> None:
        assert self.node is not None
        while True:
            with trio.move_on_at(self.node.next_deadline()):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            self._handle(self.node.tick(trio.current_time()))
            # `_handle` sets the event so that input from peers recomputes the
            # deadline; our own tick is not news (without this reset the loop
            # spins and an idle agent burns a whole core).
            self._wakeup = trio.Event()

    async def leave(self) -> None:
        """Announce a graceful leave and give it a moment to go out."""
        if self.node is None:
            return
        self._handle(self.node.leave(trio.current_time()))
        with trio.move_on_after(0.5):
            await trio.sleep(0.05)  # let dials started by the leave get going
            while self._dialing or any(link.busy for link in self._links.values()):
                await trio.sleep(0.02)
        if self._book_dirty:
            await self._save_peer_book()

    # -- the peer book ---------------------------------------------------------

    async def _load_peer_book(self) -> None:
        if self._book_path is None:
            return
        try:
            entries, skipped = await trio.to_thread.run_sync(load_peer_book, self._book_path)
        except (OSError, PeerBookError) as exc:
            log.warning(
                "ignoring an unusable peer file",
                extra=kv(path=self._book_path, error=f"{type(exc).__name__}: {exc}"),
            )
            self._counts["peer_book_skipped"] += 1
            return
        self._counts["peer_book_skipped"] += skipped
        self._book = entries
        if entries:
            log.info("remembered peers", extra=kv(count=len(entries)))

    def _book_entries(self) -> list[PeerEntry]:
        """What the peer book should hold now: alive members first, then what
        it held before (members lost or not heard of in this run), bounded."""
        assert self.node is not None
        out: dict[str, PeerEntry] = {}
        for m in self.node.members():
            if m["self"] or m["state"] != "alive" or m["addr"].startswith("outbound-only:"):
                continue
            out[m["node_id"]] = PeerEntry(m["node_id"], m["addr"], m["name"])
        for e in self._book:
            if e.node_id == self.node.node_id or e.node_id in out:
                continue
            if self._scope is not None and e.node_id not in self._scope:
                continue
            out[e.node_id] = e
        return list(out.values())[:MAX_PEERS]

    async def _save_peer_book(self) -> None:
        if self._book_path is None or self.node is None:
            return
        self._book_dirty = False
        entries = self._book_entries()
        try:
            await trio.to_thread.run_sync(save_peer_book, self._book_path, entries)
        except OSError as exc:
            # Disk full, read-only state dir: counted; logged once per kind of error.
            self._counts["peer_book_failures"] += 1
            kind = type(exc).__name__
            if kind not in self._book_warned:
                self._book_warned.add(kind)
                log.warning("could not write the peer file", extra=kv(error=exc))
            return
        self._book = entries
        self._counts["peer_book_writes"] += 1

    async def _peer_book_loop(self) -> None:
        """Write the peer book after membership changed, rarely."""
        while True:
            await self._book_changed.wait()
            self._book_changed = trio.Event()
            await trio.sleep(PEER_BOOK_SETTLE)
            await self._save_peer_book()
            await trio.sleep(PEER_BOOK_INTERVAL)

    # -- actions -------------------------------------------------------------------

    def _handle(self, actions: list[NodeAction]) -> None:
        for action in actions:
            if isinstance(action, SendTo):
                self._send(action)
            elif isinstance(action, Persist):
                assert self._nursery is not None
                self._nursery.start_soon(self._persist, action.records)
            elif isinstance(action, MemberChanged):
                self._member_changed(action)
            elif isinstance(action, RecordAccepted):
                rec = action.record
                if self._on_record is not None:
                    self._on_record(rec)
                self.events.publish(
                    "record.accepted",
                    origin=rec.origin.hex(),
                    kind=rec.kind,
                    key=rec.key,
                    version=rec.version,
                )
            elif isinstance(action, PeerMisbehaved):
                self._log_misbehaved(action)
                if action.score <= SCORE_FLOOR and action.node_id in self._links:
                    self._drop_link(action.node_id)
        self._wakeup.set()

    def _log_misbehaved(self, action: PeerMisbehaved) -> None:
        """One warning per peer a minute at most (with how many were held
        back): a member's datagram may carry thousands of bad records, and
        the journal must not be the thing it floods. Every offence is still
        counted by the node."""
        peer = action.node_id or action.addr
        now = trio.current_time()
        last, held = self._misbehaved_log.get(peer, (None, 0))
        if last is not None and now - last < MISBEHAVED_LOG_INTERVAL:
            self._misbehaved_log[peer] = (last, held + 1)
            return
        if len(self._misbehaved_log) >= MAX_MISBEHAVED_LOG and peer not in self._misbehaved_log:
            self._misbehaved_log.pop(next(iter(self._misbehaved_log)))
        self._misbehaved_log[peer] = (now, 0)
        log.warning(
            "peer misbehaved",
            extra=kv(peer=peer, reason=action.reason, score=action.score, held_back=held),
        )

    def _member_changed(self, ev: MemberChanged) -> None:
        assert self.node is not None
        if ev.node_id == self.node.node_id:
            return
        level = logging.WARNING if ev.change in ("suspect", "dead") else logging.INFO
        log.log(
            level,
            f"member {ev.change}",
            extra=kv(node=ev.node_id[:10], name=ev.name, addr=ev.addr, inc=ev.incarnation),
        )
        self.events.publish(
            f"member.{ev.change}",
            node_id=ev.node_id,
            name=ev.name,
            addr=ev.addr,
            state=ev.state,
            incarnation=ev.incarnation,
        )
        if ev.state in ("dead", "left") and ev.node_id in self._links:
            self._drop_link(ev.node_id)
        if ev.change in ("joined", "updated") and not self._book_dirty:
            self._book_dirty = True
            self._book_changed.set()
        if self._on_member_changed is not None:
            self._on_member_changed(ev.node_id)

    async def _persist(self, records: tuple) -> None:
        assert self.node is not None
        try:
            results = await trio.to_thread.run_sync(self.store.put_many, records)
        except Exception as exc:  # disk full, I/O error: the records can come again
            self.stats["persist_failures"] += 1
            log.error("could not persist records", extra=kv(count=len(records), error=exc))
            self.node.persist_failed(records)
            return
        self._handle(self.node.persisted(trio.current_time(), records, results))

    # -- sessions ------------------------------------------------------------------

    def _send(self, action: SendTo) -> None:
        node_id = action.node_id or self._by_addr.get(action.addr)
        link = self._links.get(node_id) if node_id else None
        if link is not None and not link.session.closed:
            try:
                link.send.send_nowait(action.data)
            except trio.WouldBlock:
                link.dropped += 1
                self.stats["dropped"] += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The link's writer ended (its session is closing) a moment
                # before `_serve_link` takes it out of the table: this one
                # datagram is lost, like any datagram; the session ends alone.
                link.dropped += 1
                self.stats["dropped"] += 1
                self._forget(link.session)
            return
        if action.addr.startswith("outbound-only:"):
            self.stats["dropped"] += 1
            return
        waiting = self._dialing.get(action.addr)
        if waiting is not None:
            if len(waiting) < OUTBOX:
                waiting.append(action.data)
            return
        if len(self._dialing) >= MAX_DIALS or PROCESS_FDS.lent:
            # (at the fd limit the reserve is lent to root's request: not ours to take)
            self._counts["dials_refused"] += 1
            self.stats["dropped"] += 1
            return
        self._dialing[action.addr] = [action.data]
        assert self._nursery is not None
        self._nursery.start_soon(self._dial, action.addr)

    async def _connect_onion(self, addr: str) -> PeerSession:
        """A session to an onion address, through our tor's SOCKS port."""
        from ..mesh.socks_codec import SocksError
        from ..mesh.tor import TorError
        from .peer import connect_stream

        tor = None if self._tor is None else self._tor()
        if tor is None or not tor.available:
            raise PeerDisconnected("no tor running here to reach an onion address")
        host, port = split_hostport(addr, "address")

        async def open_stream() -> trio.abc.Stream:
            try:
                return await tor.dial(host, port, timeout=ONION_DIAL_TIMEOUT / 2)
            except (TorError, SocksError) as exc:
                raise PeerDisconnected(f"cannot reach {addr} through tor: {exc}") from None

        assert self._nursery is not None
        return await connect_stream(
            self._nursery,
            open_stream,
            host,
            "/",
            self.identity,
            self.clan,
            self.admit,
            timeout=ONION_DIAL_TIMEOUT,
            faults=self._faults,
        )

    def _fault(self, peer: str, exc: BaseException, what: str) -> None:
        """The fault boundary of one peer's task: an unexpected error ends that
        dial or session only; it is counted and logged once per (peer, type).
        A cancellation (the service stopping) goes on."""
        to_log, rest = self._faults.absorb(peer, exc, (PeerDisconnected, RemoteProtocolError))
        for err in to_log:
            log.error(
                f"{what} failed unexpectedly; closed that connection",
                extra=kv(peer=peer, error=type(err).__name__),
                exc_info=(type(err), err, err.__traceback__),
            )
        if rest is not None:
            raise rest

    async def _dial(self, addr: str) -> None:
        assert self._nursery is not None
        try:
            if split_hostport(addr, "address")[0].endswith(".onion"):
                session = await self._connect_onion(addr)
            else:
                session = await connect(
                    self._nursery,
                    addr_to_url(addr),
                    self.identity,
                    self.clan,
                    self.admit,
                    timeout=DIAL_TIMEOUT,
                    faults=self._faults,
                )
        except _DIAL_FAILURES as exc:  # a malformed address, DNS, a refusal, ...
            self.stats["dial_failures"] += 1
            log.debug("dial failed", extra=kv(addr=addr, reason=getattr(exc, "reason", exc)))
            self._dialing.pop(addr, None)  # what waited is lost, like datagrams
            return
        except BaseException as exc:
            self._dialing.pop(addr, None)
            if isinstance(exc, Exception):
                self.stats["dial_failures"] += 1
            self._fault(addr, exc, "dialing a peer")
            return
        try:
            self._by_addr[addr] = session.peer_node_id
            link = self._add_link(session)
            for data in self._dialing.pop(addr, []):
                try:
                    link.send.send_nowait(data)
                except trio.WouldBlock:
                    self.stats["dropped"] += 1
        except BaseException as exc:
            self._dialing.pop(addr, None)
            self._forget(session)
            with trio.move_on_after(0.5) as cs:
                cs.shield = True
                await session.aclose()
            self._fault(session.peer_node_id[:10], exc, "a dialed peer session")
            return
        await self._serve_link(link)

    async def _on_incoming(self, session: PeerSession) -> None:
        link = self._add_link(session)
        await self._serve_link(link)

    def _add_link(self, session: PeerSession) -> _Link:
        node_id = session.peer_node_id
        old = self._links.pop(node_id, None)
        link = _Link(session)
        self._links[node_id] = link
        if old is not None:
            # Both sides dialed each other: send on the newest; the old session
            # stays open for what the peer sends on it (closing it would make
            # the peer dial again, and again).
            old.send.close()
        # At most a few sessions per peer and MAX_SESSIONS in all: the oldest go.
        for stale in self._sessions.open(session, node_id):
            self._close_session(stale)  # type: ignore[arg-type]
        return link

    def _forget(self, session: PeerSession) -> None:
        """Take `session` out of the tables (idempotent)."""
        self._sessions.close(session)
        link = self._links.get(session.peer_node_id)
        if link is not None and link.session is session:
            del self._links[session.peer_node_id]
            link.send.close()

    def _close_session(self, session: PeerSession) -> None:
        # Its link's reader then sees the session end, and `_serve_link` ends.
        self._forget(session)
        assert self._nursery is not None
        self._nursery.start_soon(session.aclose)

    def _drop_link(self, node_id: str) -> None:
        link = self._links.get(node_id)
        if link is not None:
            self._close_session(link.session)

    async def _serve_link(self, link: _Link) -> None:
        session = link.session
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, link, nursery.cancel_scope)
                await self._reader(session)
                nursery.cancel_scope.cancel()
        except (PeerDisconnected, RemoteProtocolError) as exc:
            log.debug(
                "peer session ended", extra=kv(peer=session.peer_node_id[:10], reason=exc.reason)
            )
        except BaseException as exc:
            self._fault(session.peer_node_id[:10], exc, "a peer session")
        finally:
            self._forget(session)
            # A clean close waits for the peer; a dead peer must not hold up a stop.
            with trio.move_on_after(0.5) as cs:
                cs.shield = True
                await session.aclose()

    async def _writer(self, link: _Link, done: trio.CancelScope) -> None:
        # A session closed under us (dropped link, stop) ends this link only:
        # raised inside the nursery it would arrive as an ExceptionGroup that
        # `_serve_link`'s except clause cannot match, and take the agent down.
        async with link.recv:
            async for data in link.recv:
                link.in_flight += 1
                try:
                    await link.session.send(data)
                except (PeerDisconnected, RemoteProtocolError) as exc:
                    log.debug(
                        "peer session ended while sending",
                        extra=kv(peer=link.session.peer_node_id[:10], reason=exc.reason),
                    )
                    done.cancel()
                    return
                finally:
                    link.in_flight -= 1

    async def _reader(self, session: PeerSession) -> None:
        node = self.node
        assert node is not None
        while True:
            try:
                data = await session.receive()
            except (PeerDisconnected, RemoteProtocolError):
                return
            info = node.membership.member(session.peer_node_id)
            from_addr = info.addr if info is not None else session.remote
            self._handle(
                node.receive(trio.current_time(), from_addr, data, from_node=session.peer_node_id)
            )
