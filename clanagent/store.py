"""Durable, crash-safe store of signed records (the `store` part).

Owns: the latest accepted version of every record, keyed by
``(origin, kind, key)``, in memory and -- when opened on a directory -- on
disk, in one SQLite database (``records.db``, WAL mode, synchronous=FULL), one
row per key holding the record's own signed encoding.  A write is
acknowledged (``put`` returns True) only once it would survive ``kill -9``
and, as far as the OS promises, a power cut: its transaction committed, the
WAL fsynced.  Writes are group-committed: durable records offered by
concurrent callers within a short window (``group_window``, or until
``group_max`` records are waiting) are written in one transaction and share
one fsync, and every caller of the group returns only after it.  (The store
used to keep one file per key, with an fsync of the file and of the directory
per write; such files are moved into the database when a store is opened.)
Records whose kind is *soft* (the ``durable(kind)`` predicate says False) are
held in memory only: never written, never fsynced, gone after a restart
(anti-entropy brings them back); quotas count them all the same.  Every fsync
is counted in ``stats["fsyncs"]`` (SQLite's: one per commit, two per
checkpoint, as synchronous=FULL documents; bench/store.py checks the count
against strace).  Opening a directory cleans what a crash left behind and
quarantines anything unreadable (a row, a legacy file, or a database SQLite
cannot read at all) into ``corrupt/``.  It bounds what it holds
(`RecordLimits`: records and bytes per origin and in total, accounted by delta
when a newer version replaces a key) and never holds a record at or over
`MAX_RECORD_VERSION`, so an origin's versions cannot run out.

Must never: acknowledge a write before it is durable, let an older or equal
version replace a newer one, crash on (or silently drop) a damaged file, or
block readers while a writer waits on fsync.  It does not check signatures on
``put``: every record reaching it was verified when decoded or signed locally;
signatures *are* checked on load, where they double as an integrity check.

Threading: the trio agent runs writes in ``trio.to_thread.run_sync``, so every
method is thread-safe.  Durable writers queue up; the first one waiting leads
the next group (waits out the window, then writes everyone's records) while
the others sleep until their group is done.  One lock serialises the groups'
file I/O (so the file on disk always matches the version in memory); a second,
short-held lock guards the in-memory maps, so a ``get`` from the event loop --
or a put of soft records only -- never waits for a disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from clanagent._counters import LatencyHistogram
from clanagent.durable import fsync_dir, write_new
from clanagent.gossip.config import RecordLimits
from clanagent.wire import (
    DEFAULT_LIMITS,
    MAX_RECORD_VERSION,
    Limits,
    SignedRecord,
    WireError,
    pack,
)

__all__ = ["StoreError", "Store"]

log = logging.getLogger("clanagent.store")

_RECORD_SUFFIX = ".rec"
_TEMP_SUFFIX = ".tmp"
_CORRUPT_DIR = "corrupt"
_DB_NAME = "records.db"
_DB_FILES = (_DB_NAME, _DB_NAME + "-wal", _DB_NAME + "-shm", _DB_NAME + "-journal")
# Checkpoint the WAL into the database (and truncate it) after this much.
_CHECKPOINT_RECORDS = 1000
_CHECKPOINT_BYTES = 4 * 1024 * 1024
# Bumping this renames every file, so only do it together with a migration.
_NAME_DOMAIN = "clanagent.store.v1"

Triple = tuple[bytes, str, str]

# Group commit: how long the first durable write waits for others to join its
# fsync, and how many records end the wait early.
GROUP_WINDOW = 0.02
GROUP_MAX = 256


def _all_durable(kind: str) -> bool:
    return True


class _Ticket:
    """One caller's durable records waiting for a group commit."""

    __slots__ = ("recs", "since", "results", "error", "done")

    def __init__(self, recs: list[SignedRecord]) -> None:
        self.recs = recs
        self.since = time.monotonic()
        self.results: list[bool] = []
        self.error: BaseException | None = None
        self.done = False


# Upper bounds (seconds) of the commit latency buckets (metrics: fsync latency).
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class StoreError(Exception):
    """A local failure of the store: its directory is unusable or a write did not
    become durable (disk full, I/O error).  The store has no remote error kind:
    bad bytes on disk are quarantined and counted, never raised."""


def file_name(origin: bytes, kind: str, key: str) -> str:
    """The name (row key; the file name of the legacy layout) for a triple:
    hex of a hash of its canonical encoding.

    Hashing (rather than escaping kind/key) keeps names short, fixed-length and
    free of path tricks, whatever a remote origin puts in its keys.  256 bits,
    because origins choose their own keys and could otherwise hunt for a
    collision that overwrites another record's file.
    """
    digest = hashlib.blake2b(pack([_NAME_DOMAIN, origin, kind, key]), digest_size=32)
    return digest.hexdigest() + _RECORD_SUFFIX


def _as_bytes(data: object) -> bytes:
    """A database cell as bytes (to keep a damaged row's content)."""
    if isinstance(data, bytes):
        return data
    return b"" if data is None else str(data).encode("utf-8", "replace")


def _safe_name(name: object) -> str:
    """A damaged row's name, usable as a file name in ``corrupt/``."""
    if isinstance(name, str) and len(name) <= 80 and name.replace(".", "").isalnum():
        return name
    return "row-" + hashlib.blake2b(repr(name).encode(), digest_size=16).hexdigest()


class Store:
    """Latest version of every record by ``(origin, kind, key)``.

    Use `Store.open`.  In memory (``path=None``) a record costs one dict entry
    in its origin's map and nothing else, so a 1000-node simulation can hold a
    store per node.

    `durable` says which kinds are persisted (default: all); the others are
    soft.  `group_window` (seconds) and `group_max` (records) bound how long
    and for how many records a group commit gathers writes; a window of 0
    still groups the writes that queued up while the previous group was on
    disk.
    """

    def __init__(
        self,
        path: Path | None = None,
        limits: Limits = DEFAULT_LIMITS,
        quota: RecordLimits | None = None,
        *,
        durable: Callable[[str], bool] | None = None,
        group_window: float = GROUP_WINDOW,
        group_max: int = GROUP_MAX,
    ) -> None:
        self._dir = path
        self._durable = durable if durable is not None else _all_durable
        self._group_window = max(0.0, group_window)
        self._group_max = max(1, group_max)
        # Group commit: tickets waiting, and whether a writer is leading a group.
        self._gc = threading.Condition(threading.Lock())
        self._queue: list[_Ticket] = []
        self._queued = 0  # records in _queue
        self._leading = False
        self._last_commit = -1e9  # monotonic end of the last group commit
        self._last_tickets = 0  # callers in the last group
        self._limits = limits
        self._quota = quota if quota is not None else RecordLimits()
        # Usage by origin ([records, bytes]) and in total, kept with the maps.
        self._usage: dict[bytes, list[int]] = {}
        self._bytes = 0
        # Origins checked against the per-origin quota only (our own).
        self._reserved: set[bytes] = set()
        # origin -> {(kind, key): record}.  Nested so that by_origin / max_version
        # (asked for by anti-entropy on every round) do not scan every record.
        self._by_origin: dict[bytes, dict[tuple[str, str], SignedRecord]] = {}
        # kind -> {(origin, key): record}: the services read one kind each round
        # (`of_kind`), which must not cost a scan of every record in the clan.
        self._by_kind: dict[str, dict[tuple[bytes, str], SignedRecord]] = {}
        self._count = 0
        self._lock = threading.Lock()  # the maps and stats; never held across I/O
        self._write_lock = threading.Lock()  # orders writers, held across I/O
        self._db: sqlite3.Connection | None = None
        self._since_checkpoint = [0, 0]  # records, bytes committed since
        self.stats: dict[str, int] = {
            "loaded": 0,
            "corrupt": 0,
            "refused_older": 0,  # older *or equal* version offered
            "written": 0,
            "deleted": 0,
            "temp_removed": 0,
            "over_version": 0,  # quarantined at load: version at or over the bound
            "over_quota": 0,  # quarantined at load: beyond the quota
            "refused_over_version": 0,
            "refused_quota": 0,
            "fsyncs": 0,  # commits, checkpoints and directory fsyncs, load included
            "commits": 0,  # group commits that wrote at least one file
            "soft": 0,  # soft records accepted (held in memory only)
            "soft_removed": 0,  # records of soft kinds (from older runs) deleted at load
            "migrated": 0,  # legacy record files moved into the database
            "checkpoints": 0,
            "checkpoint_failures": 0,
        }
        # How long each commit's COMMIT took (the WAL fsync, with synchronous=FULL).
        self.commit_seconds = LatencyHistogram(COMMIT_BUCKETS)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        path: Path | str | None,
        limits: Limits = DEFAULT_LIMITS,
        quota: RecordLimits | None = None,
        *,
        durable: Callable[[str], bool] | None = None,
        group_window: float = GROUP_WINDOW,
        group_max: int = GROUP_MAX,
    ) -> Store:
        """Open (creating, mode 0700) the store under `path`, or an in-memory one
        for ``None``.  Raises `StoreError` if the directory cannot be used.

        Records at or over `MAX_RECORD_VERSION`, and records beyond `quota`
        (lowest versions are kept, as a running store would have), are moved
        aside into ``corrupt/`` and logged; they never stop the open.  Files of
        soft kinds (written before their kind became soft) are deleted."""
        opts = {"durable": durable, "group_window": group_window, "group_max": group_max}
        if path is None:
            return cls(None, limits, quota, **opts)
        store = cls(Path(path), limits, quota, **opts)
        try:
            store._prepare_dir()
            store._load()
            store._enforce_quota_after_load()
        except (OSError, sqlite3.Error) as exc:
            store.close()
            raise StoreError(f"cannot open store at {path}: {exc}") from exc
        return store

    def close(self) -> None:
        """Checkpoint and close the database (the store must not be used after)."""
        db, self._db = self._db, None
        if db is None:
            return
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        db.close()

    @property
    def path(self) -> Path | None:
        return self._dir

    def _prepare_dir(self) -> None:
        assert self._dir is not None
        d = self._dir
        if not d.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            d.mkdir(mode=0o700)
            # The new directory entry itself must survive a crash too.
            self._fsync_dir(d.parent)
        st = d.stat()
        if not stat.S_ISDIR(st.st_mode):
            raise StoreError(f"{d} is not a directory")
        if stat.S_IMODE(st.st_mode) != 0o700:
            log.warning("store dir %s had mode %o; setting 0700", d, stat.S_IMODE(st.st_mode))
            d.chmod(0o700)

    def _load(self) -> None:
        self._load_db()
        self._load_legacy_files()

    def _connect(self, path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode ({mode})")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # ours, counted
            db.execute(
                "CREATE TABLE IF NOT EXISTS records"
                " (name TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID"
            )
        except BaseException:
            db.close()
            raise
        return db

    def _load_db(self, *, retry: bool = True) -> None:
        assert self._dir is not None
        path = self._dir / _DB_NAME
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self._fsync_dir(self._dir)
        try:
            self._db = self._connect(path)
            rows = self._db.execute("SELECT name, data FROM records").fetchall()
        except sqlite3.OperationalError:
            raise  # locked, I/O error, permissions: the store cannot be used
        except sqlite3.DatabaseError as exc:
            if not retry:
                raise
            # SQLite cannot read it at all: set the whole database aside and
            # start empty (anti-entropy brings the clan's records back).
            if self._db is not None:
                self._db.close()
                self._db = None
            for name in _DB_FILES:
                if (self._dir / name).exists():
                    self._quarantine(name, f"database unreadable: {exc}")
            return self._load_db(retry=False)
        bad: list[tuple[str, bytes, str]] = []
        soft: list[str] = []
        for name, data in rows:
            rec, why = self._decode(data)
            if rec is not None:
                if file_name(rec.origin, rec.kind, rec.key) != name:
                    rec, why = None, "content does not match its name"
                elif rec.version >= MAX_RECORD_VERSION:
                    # Versions must never run out: a record at the bound would
                    # stop its origin (maybe us) from publishing that key again.
                    self.stats["over_version"] += 1
                    rec, why = None, f"version {rec.version} is at or over 2**53"
            if rec is None:
                bad.append((name, _as_bytes(data), why))
                continue
            if not self._durable(rec.kind):
                # Written before its kind became soft: soft state is not kept
                # across restarts.
                soft.append(name)
                self.stats["soft_removed"] += 1
                continue
            self._set_nolock((rec.origin, rec.kind, rec.key), rec)
            self.stats["loaded"] += 1
        for name, data, why in bad:
            self._quarantine_blob(_safe_name(name), data, why)
        if bad or soft:
            self._commit([], [name for name, _, _ in bad] + soft)

    def _decode(self, data: object) -> tuple[SignedRecord | None, str]:
        if not isinstance(data, bytes):
            return None, f"not a blob: {type(data).__name__}"
        if len(data) > self._limits.max_frame:
            return None, f"does not decode: {len(data)} bytes is over the frame limit"
        try:
            return SignedRecord.decode(data, self._limits, verify=True), ""
        except WireError as exc:
            return None, f"does not decode: {exc.reason}"

    def _load_legacy_files(self) -> None:
        """Move the record files of the one-file-per-key layout into the
        database (newer than its row only), then delete them."""
        assert self._dir is not None
        quarantined = False
        migrate: list[SignedRecord] = []
        done: list[str] = []  # legacy files loaded (or older than their row)
        with os.scandir(self._dir) as it:
            entries = sorted(it, key=lambda e: e.name)  # deterministic order for logs
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) or entry.name in _DB_FILES:
                continue  # corrupt/, anything an operator put there, the database
            if entry.name.endswith(_TEMP_SUFFIX):
                # Written but never renamed: its put() never returned True.
                os.unlink(entry.path)
                self.stats["temp_removed"] += 1
                continue
            if not entry.is_file(follow_symlinks=False):
                self._quarantine(entry.name, "not a regular file")
                quarantined = True
                continue
            rec, why = self._read_record(Path(entry.path))
            if rec is None:
                self._quarantine(entry.name, why)
                quarantined = True
                continue
            triple = (rec.origin, rec.kind, rec.key)
            if file_name(*triple) != entry.name:
                self._quarantine(entry.name, "content does not match file name")
                quarantined = True
                continue
            if rec.version >= MAX_RECORD_VERSION:
                self.stats["over_version"] += 1
                self._quarantine(entry.name, f"version {rec.version} is at or over 2**53")
                quarantined = True
                continue
            done.append(entry.name)
            if not self._durable(rec.kind):
                self.stats["soft_removed"] += 1
                continue
            held = self._get_nolock(triple)
            if held is not None and held.version >= rec.version:
                continue  # already in the database (a migration cut short)
            if held is None:
                self.stats["loaded"] += 1
            self._set_nolock(triple, rec)
            migrate.append(rec)
        if migrate:
            self._commit([(file_name(r.origin, r.kind, r.key), r.encode()) for r in migrate], [])
            self.stats["migrated"] += len(migrate)
        # Only once the database holds them (a crash before this re-migrates).
        for name in done:
            os.unlink(self._dir / name)
        if quarantined or done or self.stats["temp_removed"]:
            self._fsync_dir(self._dir)

    def _read_record(self, path: Path) -> tuple[SignedRecord | None, str]:
        try:
            with open(path, "rb") as f:
                # Read one byte past the limit so an oversized file is detected
                # without reading all of it.
                data = f.read(self._limits.max_frame + 1)
        except OSError as exc:
            return None, f"unreadable: {exc}"
        try:
            return SignedRecord.decode(data, self._limits, verify=True), ""
        except WireError as exc:
            return None, f"does not decode: {exc.reason}"

    def _enforce_quota_after_load(self) -> None:
        """Move aside what is beyond the quota (e.g. written before quotas, or
        under larger ones), keeping each origin's lowest versions first."""
        q = self._quota
        over = self._bytes > q.max_bytes or self._count > q.max_records
        over = over or any(
            c > q.max_records_per_origin or b > q.max_bytes_per_origin
            for c, b in self._usage.values()
        )
        if not over:
            return
        assert self._dir is not None
        recs = sorted(self.records(), key=lambda r: (r.version, r.origin, r.kind, r.key))
        keep: dict[bytes, list[int]] = {}
        total = [0, 0]
        dropped = 0
        moved: list[str] = []
        for rec in recs:
            use = keep.setdefault(rec.origin, [0, 0])
            if (
                use[0] + 1 > q.max_records_per_origin
                or use[1] + rec.size > q.max_bytes_per_origin
                or total[0] + 1 > q.max_records
                or total[1] + rec.size > q.max_bytes
            ):
                triple = (rec.origin, rec.kind, rec.key)
                with self._lock:
                    self._del_nolock(triple)
                self._quarantine_blob(file_name(*triple), rec.encode(), "", quiet=True)
                moved.append(file_name(*triple))
                self.stats["over_quota"] += 1
                dropped += 1
                continue
            use[0] += 1
            use[1] += rec.size
            total[0] += 1
            total[1] += rec.size
        if (self._dir / _CORRUPT_DIR).exists():
            self._fsync_dir(self._dir / _CORRUPT_DIR)
        self._commit([], moved)
        log.error("store: %d records beyond the quota moved to %s", dropped, _CORRUPT_DIR)

    def _quarantine(self, name: str, why: str, *, quiet: bool = False) -> None:
        assert self._dir is not None
        corrupt = self._dir / _CORRUPT_DIR
        if not quiet:
            self.stats["corrupt"] += 1
        try:
            if not corrupt.exists():
                corrupt.mkdir(mode=0o700)
            # Suffix so an earlier quarantined file of the same name is kept too.
            dest = corrupt / f"{name}.{time.time_ns()}"
            os.replace(self._dir / name, dest)
            if not quiet:  # quiet callers fsync once for the whole batch
                self._fsync_dir(corrupt)
        except OSError as exc:
            log.error("store file %s is corrupt (%s) and could not be moved: %s", name, why, exc)
            return
        if quiet:
            return
        log.error("store file %s is corrupt (%s); moved to %s", name, why, dest)

    def _quarantine_blob(self, name: str, data: bytes, why: str, *, quiet: bool = False) -> None:
        """Keep a database row's bytes in ``corrupt/`` (the caller deletes the row)."""
        assert self._dir is not None
        corrupt = self._dir / _CORRUPT_DIR
        if not quiet:
            self.stats["corrupt"] += 1
        dest = corrupt / f"{name}.{time.time_ns()}"
        try:
            if not corrupt.exists():
                corrupt.mkdir(mode=0o700)
            write_new(dest, data, mode=0o600)
            self._count_fsync()
            if not quiet:
                self._fsync_dir(corrupt)
        except OSError as exc:
            log.error("store row %s is corrupt (%s) and could not be saved: %s", name, why, exc)
            return
        if not quiet:
            log.error("store row %s is corrupt (%s); moved to %s", name, why, dest)

    # ------------------------------------------------------------------ reading

    def _get_nolock(self, triple: Triple) -> SignedRecord | None:
        per = self._by_origin.get(triple[0])
        return None if per is None else per.get((triple[1], triple[2]))

    def _set_nolock(self, triple: Triple, rec: SignedRecord) -> None:
        per = self._by_origin.setdefault(triple[0], {})
        use = self._usage.setdefault(triple[0], [0, 0])
        old = per.get((triple[1], triple[2]))
        if old is None:
            self._count += 1
            use[0] += 1
        else:
            use[1] -= old.size
            self._bytes -= old.size
        use[1] += rec.size
        self._bytes += rec.size
        per[(triple[1], triple[2])] = rec
        self._by_kind.setdefault(triple[1], {})[(triple[0], triple[2])] = rec

    def _del_nolock(self, triple: Triple) -> None:
        per = self._by_origin[triple[0]]
        old = per.pop((triple[1], triple[2]))
        of_kind = self._by_kind[triple[1]]
        del of_kind[(triple[0], triple[2])]
        if not of_kind:
            del self._by_kind[triple[1]]
        use = self._usage[triple[0]]
        use[0] -= 1
        use[1] -= old.size
        self._bytes -= old.size
        self._count -= 1
        if not per:
            del self._by_origin[triple[0]]
            del self._usage[triple[0]]

    def _over_quota_nolock(self, rec: SignedRecord, pending: dict[bytes, list[int]]) -> str | None:
        """Why storing `rec` would exceed the quota (None if it fits).

        `pending` holds usage deltas of a batch not yet applied (key None for
        the totals).  A newer version of a held key costs only its size delta,
        and an update that does not grow never counts as over."""
        q = self._quota
        origin = rec.origin
        old = self._get_nolock((origin, rec.kind, rec.key))
        dcount = 0 if old is not None else 1
        dbytes = rec.size - (old.size if old is not None else 0)
        use = self._usage.get(origin, (0, 0))
        pend = pending.get(origin, (0, 0))
        if dcount and use[0] + pend[0] + 1 > q.max_records_per_origin:
            return f"more than {q.max_records_per_origin} records from one origin"
        if dbytes > 0 and use[1] + pend[1] + dbytes > q.max_bytes_per_origin:
            return f"more than {q.max_bytes_per_origin} bytes from one origin"
        if origin not in self._reserved:
            tot = pending.get(b"", (0, 0))
            if dcount and self._count + tot[0] + 1 > q.max_records:
                return f"more than {q.max_records} records in the store"
            if dbytes > 0 and self._bytes + tot[1] + dbytes > q.max_bytes:
                return f"more than {q.max_bytes} bytes in the store"
        return None

    def over_quota(self, rec: SignedRecord) -> str | None:
        """Why `rec` would be refused for the quota now, or None if it fits."""
        with self._lock:
            return self._over_quota_nolock(rec, {})

    def reserve(self, origin: bytes) -> None:
        """Check `origin` (our own) against the per-origin quota only: others
        filling the store's totals must never stop us publishing."""
        with self._lock:
            self._reserved.add(origin)

    @property
    def quota(self) -> RecordLimits:
        return self._quota

    def usage(self, origin: bytes | None = None) -> tuple[int, int]:
        """(records, bytes) held from `origin`, or in total for None."""
        with self._lock:
            if origin is None:
                return self._count, self._bytes
            use = self._usage.get(origin)
            return (use[0], use[1]) if use else (0, 0)

    def get(self, origin: bytes, kind: str, key: str) -> SignedRecord | None:
        with self._lock:
            return self._get_nolock((origin, kind, key))

    def records(self) -> Iterator[SignedRecord]:
        """Every record (a snapshot, so writers may run while you iterate)."""
        with self._lock:
            snapshot = [r for per in self._by_origin.values() for r in per.values()]
        return iter(snapshot)

    def of_kind(self, kind: str) -> list[SignedRecord]:
        """Every record of one kind (a snapshot), from the per-kind index."""
        with self._lock:
            per = self._by_kind.get(kind)
            return list(per.values()) if per else []

    def by_origin(self, origin: bytes) -> list[SignedRecord]:
        """Records of one origin, lowest version first (ties by kind, key)."""
        with self._lock:
            recs = list(self._by_origin.get(origin, {}).values())
        recs.sort(key=lambda r: (r.version, r.kind, r.key))
        return recs

    def origins(self) -> list[bytes]:
        with self._lock:
            return list(self._by_origin)

    def max_version(self, origin: bytes) -> int:
        """Highest version held from `origin`, 0 if none."""
        with self._lock:
            per = self._by_origin.get(origin)
            return max((r.version for r in per.values()), default=0) if per else 0

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def __contains__(self, triple: object) -> bool:
        if not isinstance(triple, tuple) or len(triple) != 3:
            return False
        with self._lock:
            return self._get_nolock(triple) is not None  # type: ignore[arg-type]

    # ------------------------------------------------------------------ writing

    def is_durable(self, kind: str) -> bool:
        """Whether a put of this kind waits for a disk (False in memory)."""
        return self._dir is not None and self._durable(kind)

    def counters(self) -> dict[str, int]:
        """The store's counters (a copy of `stats`) with what it holds."""
        with self._lock:
            out = dict(self.stats)
            out["records"] = self._count
            out["bytes"] = self._bytes
        return out

    def _fsync(self, fd: int) -> None:
        # A counted fsync of a file (bench/store.py's one-file-per-key variant).
        os.fsync(fd)
        self._count_fsync()

    def _count_fsync(self) -> None:
        with self._lock:
            self.stats["fsyncs"] += 1

    def _fsync_dir(self, path: Path) -> None:
        fsync_dir(path)
        self._count_fsync()

    def put(self, rec: SignedRecord) -> bool:
        """Store `rec` if it is newer than what is held for its triple.

        Returns True once it is durable (at once for a soft kind or an
        in-memory store), False (and writes nothing) for an older or equal
        version or one over the quota.  Raises `StoreError` if the write failed:
        the store then still holds the previous version (in memory; on disk
        too, unless it was the commit's own fsync that failed), and the caller
        must not treat the record as acknowledged."""
        return self.put_many([rec])[0]

    def put_many(self, recs: Iterable[SignedRecord]) -> list[bool]:
        """`put` for a batch: its durable records join one group commit.

        Within the batch (and within the group it joins), only the highest
        version of a triple can win; the others get False, as they would one
        by one.  On `StoreError` nothing of the group is applied (its
        transaction rolled back) and every caller in the group gets the error.  Soft records
        never wait for the group: they are applied before this joins it."""
        recs = list(recs)
        results = [False] * len(recs)
        hard: list[int] = []
        soft: list[int] = []
        for i, rec in enumerate(recs):
            (hard if self.is_durable(rec.kind) else soft).append(i)
        if soft:
            got = self._apply_in_memory([recs[i] for i in soft], count_soft=self._dir is not None)
            for i, ok in zip(soft, got, strict=True):
                results[i] = ok
        if hard:
            got = self._group_commit([recs[i] for i in hard])
            for i, ok in zip(hard, got, strict=True):
                results[i] = ok
        return results

    def _select_nolock(self, recs: list[SignedRecord]) -> tuple[list[bool], dict[Triple, int]]:
        """Which of `recs` would be stored (by version and quota): the winners
        by triple (index into recs).  Counts the refusals."""
        results = [False] * len(recs)
        winners: dict[Triple, int] = {}
        for i, rec in enumerate(recs):
            if rec.version >= MAX_RECORD_VERSION:
                self.stats["refused_over_version"] += 1
                continue
            triple = (rec.origin, rec.kind, rec.key)
            best = winners.get(triple)
            held = recs[best] if best is not None else self._get_nolock(triple)
            if held is not None and rec.version <= held.version:
                self.stats["refused_older"] += 1
                continue
            if best is not None:
                self.stats["refused_older"] += 1  # superseded within the batch
            winners[triple] = i
        # Quotas, with the usage of this batch's earlier winners.
        pending: dict[bytes, list[int]] = {}
        for triple, i in list(winners.items()):
            rec = recs[i]
            if self._over_quota_nolock(rec, pending) is not None:
                self.stats["refused_quota"] += 1
                del winners[triple]
                continue
            old = self._get_nolock(triple)
            dc = 0 if old is not None else 1
            db = rec.size - (old.size if old is not None else 0)
            for k in (rec.origin, b""):
                p = pending.setdefault(k, [0, 0])
                p[0] += dc
                p[1] += db
        return results, winners

    def _apply_in_memory(self, recs: list[SignedRecord], *, count_soft: bool) -> list[bool]:
        with self._lock:
            results, winners = self._select_nolock(recs)
            for triple, i in winners.items():
                self._set_nolock(triple, recs[i])
                results[i] = True
            self.stats["soft" if count_soft else "written"] += len(winners)
        return results

    def _group_commit(self, recs: list[SignedRecord]) -> list[bool]:
        """Queue `recs`, and return once the group that wrote them is durable.

        The first caller to find no group leading becomes the leader: it waits
        until the oldest queued ticket is `group_window` old (or `group_max`
        records queue up), takes the whole queue, writes it, and wakes everyone.
        Callers arriving meanwhile queue for the next group.  The window is
        waited only while writers are concurrent (the last group had several
        callers and ended within the window): a lone writer, or a trickle,
        would only pay latency for it."""
        if self._dir is None:
            return self._apply_in_memory(recs, count_soft=False)
        ticket = _Ticket(recs)
        group: list[_Ticket] = []
        with self._gc:
            self._queue.append(ticket)
            self._queued += len(recs)
            self._gc.notify_all()  # a leader waiting for group_max may go now
            while self._leading and not ticket.done:
                self._gc.wait()
            if not ticket.done:
                self._leading = True
                deadline = self._queue[0].since + self._group_window
                if (
                    self._last_tickets < 2
                    or self._queue[0].since - self._last_commit > self._group_window
                ):
                    # No concurrent writers lately (one caller writing in a
                    # loop, or a write after a pause): go at once, the window
                    # would only add latency.
                    deadline = 0.0
                while self._queued < self._group_max:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._gc.wait(left)
                group, self._queue, self._queued = self._queue, [], 0
        leader = not ticket.done
        if leader:
            self._lead(group)
        err = ticket.error
        if err is not None:
            if leader or not isinstance(err, StoreError):
                raise err
            raise StoreError(str(err)) from err  # its own, not the leader's, traceback
        return ticket.results

    def _lead(self, group: list[_Ticket]) -> None:
        """Write a group's records (one transaction) and wake its callers."""
        flat = [rec for t in group for rec in t.recs]
        error: BaseException | None = None
        results: list[bool] = []
        try:
            results = self._write_batch(flat)
        except BaseException as exc:  # every caller must learn of it, not only the leader
            error = exc
        with self._gc:
            pos = 0
            for t in group:
                if error is not None:
                    t.error = error
                else:
                    t.results = results[pos : pos + len(t.recs)]
                pos += len(t.recs)
                t.done = True
            self._leading = False
            self._last_commit = time.monotonic()
            self._last_tickets = len(group)
            self._gc.notify_all()

    def _write_batch(self, recs: list[SignedRecord]) -> list[bool]:
        """Write the winners of `recs` in one transaction (one fsync)."""
        assert self._dir is not None
        with self._write_lock:
            with self._lock:
                results, winners = self._select_nolock(recs)
            if not winners:
                return results
            rows = [(file_name(*triple), recs[i].encode()) for triple, i in winners.items()]
            try:
                self._commit(rows, [])
            except sqlite3.Error as exc:
                # Rolled back (or, if the commit's own fsync failed, perhaps on
                # disk): either way not acknowledged, and memory keeps the old.
                raise StoreError(f"write to {self._dir} failed: {exc}") from exc
            with self._lock:
                for triple, i in winners.items():
                    self._set_nolock(triple, recs[i])
                    results[i] = True
                self.stats["written"] += len(winners)
                self.stats["commits"] += 1
            self._since_checkpoint[0] += len(rows)
            self._since_checkpoint[1] += sum(len(d) for _, d in rows)
            if (
                self._since_checkpoint[0] >= _CHECKPOINT_RECORDS
                or self._since_checkpoint[1] >= _CHECKPOINT_BYTES
            ):
                self._checkpoint()
            return results

    def _commit(self, upserts: list[tuple[str, bytes]], deletes: list[str]) -> None:
        """One transaction: committed (and the WAL fsynced) or rolled back."""
        db = self._db
        if db is None:
            raise sqlite3.OperationalError("the store is closed")
        db.execute("BEGIN IMMEDIATE")
        try:
            if upserts:
                db.executemany("INSERT OR REPLACE INTO records (name, data) VALUES (?, ?)", upserts)
            if deletes:
                db.executemany("DELETE FROM records WHERE name = ?", [(n,) for n in deletes])
            started = time.perf_counter()
            db.execute("COMMIT")
            self.commit_seconds.observe(time.perf_counter() - started)
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise
        with self._lock:
            self.stats["fsyncs"] += 1  # WAL, synchronous=FULL: one per commit

    def _checkpoint(self) -> None:
        """Copy the WAL into the database and truncate it (bounds its size)."""
        assert self._db is not None
        self._since_checkpoint = [0, 0]
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # retried after the next writes
            self.stats["checkpoint_failures"] += 1
            log.warning("store checkpoint failed: %s", exc)
            return
        with self._lock:
            self.stats["checkpoints"] += 1
            self.stats["fsyncs"] += 2  # the WAL, then the database

    def delete(self, origin: bytes, kind: str, key: str) -> bool:
        """Forget a record, durably.  Returns whether there was one.

        This is local housekeeping, not a tombstone: gossip may deliver the
        same or an older version again and it will be accepted."""
        triple = (origin, kind, key)
        if not self.is_durable(kind):
            with self._lock:
                if self._get_nolock(triple) is None:
                    return False
                self._del_nolock(triple)
                self.stats["deleted"] += 1
            return True
        assert self._dir is not None
        with self._write_lock:
            with self._lock:
                if self._get_nolock(triple) is None:
                    return False
            try:
                self._commit([], [file_name(*triple)])
            except sqlite3.Error as exc:
                raise StoreError(f"delete in {self._dir} failed: {exc}") from exc
            with self._lock:
                self._del_nolock(triple)
                self.stats["deleted"] += 1
            return True

    def __repr__(self) -> str:
        where = "memory" if self._dir is None else str(self._dir)
        return f"<Store {where} records={len(self)}>"
