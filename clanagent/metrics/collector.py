"""The agent's Prometheus metrics, built from what the parts already count.

Owns: `AgentCollector`, which reads, at scrape time, each part's counters
and views through getters (a part may not run yet, and gossip restarts on a
clan change) -- membership, gossip, record checks, the store, the mesh,
secrets, VMs, and the control socket and web console -- into plain families
(`read`, on the event loop, cheap), which `Snapshot` builds into
prometheus-client's objects and `render` formats (text or OpenMetrics),
anywhere; `MetricsSources`, the few objects it reads.
Must never: instrument a hot path (the parts keep plain counters; this only
reads them), touch the disk or the network while reading (it runs on the
event loop and must answer at the fd limit), let one part's failure to
report hide the others' metrics, or take a label value from a peer without
a bound (machine names come from the signed inventory; kinds and methods
are capped where they are counted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from .. import __version__
from .sources import MetricsSources

__all__ = [
    "AgentCollector",
    "MEMBER_STATES",
    "MetricsSources",
    "OPENMETRICS_TYPE",
    "TEXT_TYPE",
    "Snapshot",
    "process_collector",
    "registry",
    "render",
]

log = logging.getLogger("clanagent.metrics")


MEMBER_STATES = ("alive", "suspect", "dead", "left")
# What Prometheus 2.x asks for and parses; OpenMetrics when the scraper says so.
TEXT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# gossip node stats -> the result label of clanagent_gossip_records_total
_RECORD_RESULTS = {
    "records_accepted": "accepted",
    "records_duplicate": "duplicate",
    "records_stale": "stale",
    "records_invalid": "invalid",
    "records_refused": "refused",
    "records_deferred": "deferred",
    "records_over_quota": "over_quota",
    "records_over_version": "over_version",
    "records_undecodable": "undecodable",
}
_SENT_TYPES = ("membership", "gossip", "ae", "records", "ae_records")


class _Family:
    """A family read but not built: plain tuples, cheap to make on the event
    loop; `metric()` builds prometheus-client's object (anywhere)."""

    __slots__ = ("kind", "name", "doc", "labels", "rows")

    def __init__(
        self,
        kind: str,
        name: str,
        doc: str,
        value: float | None = None,
        labels: Iterable[str] = (),
    ) -> None:
        self.kind, self.name, self.doc, self.labels = kind, name, doc, tuple(labels)
        self.rows: list[tuple[tuple[str, ...], Any, float | None]] = []
        if value is not None:
            self.rows.append(((), value, None))

    def add_metric(self, values: Iterable[str], value: Any, sum_value: float | None = None) -> None:
        self.rows.append((tuple(values), value, sum_value))

    def metric(self) -> Metric:
        if self.kind == "histogram":
            fam: Any = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
            for values, buckets, total in self.rows:
                fam.add_metric(list(values), buckets, sum_value=total)
            return fam
        cls = GaugeMetricFamily if self.kind == "gauge" else CounterMetricFamily
        fam = cls(self.name, self.doc, labels=self.labels)
        for values, value, _ in self.rows:
            fam.add_metric(list(values), value)
        return fam


def _gauge(name: str, doc: str, value: float | None = None, labels: Iterable[str] = ()) -> _Family:
    return _Family("gauge", name, doc, value, labels)


def _counter(
    name: str, doc: str, value: float | None = None, labels: Iterable[str] = ()
) -> _Family:
    return _Family("counter", name, doc, value, labels)


def _histogram(name: str, doc: str) -> _Family:
    return _Family("histogram", name, doc)


class AgentCollector:
    """One scrape: every family, each part's in its own try (a fault in one
    part is logged and counted in clanagent_scrape_errors_total)."""

    def __init__(self, sources: MetricsSources) -> None:
        self.src = sources
        self.scrape_errors: dict[str, int] = {}

    def describe(self) -> list[Metric]:
        return []  # families depend on what runs: no describe-time collection

    def collect(self) -> Iterator[Metric]:
        """prometheus-client's Collector: read and build here."""
        for fam in self.read():
            yield fam.metric()

    def read(self) -> list[_Family]:
        """Every family's values, read from the parts (on the event loop)."""
        out: list[_Family] = []
        for part, fn in (
            ("agent", self._agent),
            ("membership", self._membership),
            ("gossip", self._gossip),
            ("records", self._records),
            ("store", self._store),
            ("mesh", self._mesh),
            ("secrets", self._secrets),
            ("vms", self._vms),
            ("requests", self._requests),
        ):
            try:
                families = list(fn())
            except Exception:  # noqa: BLE001 -- one part's fault must not end the scrape
                self.scrape_errors[part] = self.scrape_errors.get(part, 0) + 1
                if self.scrape_errors[part] == 1:
                    log.exception("metrics of part %s failed", part)
                continue
            out += families
        errors = _counter(
            "clanagent_scrape_errors", "Parts whose metrics failed to collect", labels=["part"]
        )
        for part, n in sorted(self.scrape_errors.items()):
            errors.add_metric([part], n)
        out.append(errors)
        return out

    # -- the agent ---------------------------------------------------------------

    def _agent(self) -> Iterable[_Family]:
        ident = self.src.identity()
        info = _gauge(
            "clanagent_info",
            "This agent: version, node id and name (always 1)",
            labels=["version", "node_id", "name"],
        )
        info.add_metric([__version__, "" if ident is None else ident.node_id, self.src.name], 1)
        yield info
        yield _gauge(
            "clanagent_start_time_seconds",
            "When the agent started (unix seconds)",
            value=self.src.started_wall,
        )
        caps = _gauge(
            "clanagent_capability_available",
            "Whether a capability works on this machine (1) or not (0)",
            labels=["capability"],
        )
        for row in self.src.capabilities():
            caps.add_metric([str(row["name"])], 1 if row["available"] else 0)
        yield caps
        clan = _gauge("clanagent_in_clan", "Whether this agent is in a clan")
        clan.add_metric([], 0 if self.src.inventory() is None else 1)
        yield clan

    # -- membership ----------------------------------------------------------------

    def _membership(self) -> Iterable[_Family]:
        gossip = self.src.gossip()
        node = None if gossip is None else gossip.node
        counts = {s: 0 for s in MEMBER_STATES}
        if gossip is not None:
            counts.update(gossip.member_counts())
        members = _gauge(
            "clanagent_members",
            "Members of the clan this node knows, by state (itself included)",
            labels=["state"],
        )
        for state, n in sorted(counts.items()):
            members.add_metric([state], n)
        yield members
        # Transitions this node saw (the gossip part publishes one event each).
        events = self.src.events()
        changes = _counter(
            "clanagent_member_changes",
            "Member state changes this node saw, by change (suspect = a suspicion)",
            labels=["change"],
        )
        seen = dict.fromkeys(("joined", "alive", "suspect", "dead", "left", "updated"), 0)
        for type_, n in (events.counts if events is not None else {}).items():
            if type_.startswith("member."):
                seen[type_[len("member.") :]] = n
        for change, n in sorted(seen.items()):
            changes.add_metric([change], n)
        yield changes
        mstats = dict(node.membership.stats) if node is not None else {}
        yield _counter(
            "clanagent_membership_refutations",
            "Times this node refuted a suspicion or death of itself",
            value=mstats.get("refutes", 0),
        )
        # Probes of suspected members outside the probe round: as a witness
        # of another's suspicion, at the nominal timeout of an under-confirmed
        # one, and before declaring one dead.
        checks, finals = mstats.get("suspicion_checks", 0), mstats.get("final_checks", 0)
        probes = _counter(
            "clanagent_membership_suspect_probes",
            "Probes of suspected members outside the probe round, by why",
            labels=["why"],
        )
        probes.add_metric(["witness"], max(0, mstats.get("witness_probes", 0) - checks - finals))
        probes.add_metric(["check"], checks)
        probes.add_metric(["final"], finals)
        yield probes

    # -- gossip ---------------------------------------------------------------------

    def _gossip(self) -> Iterable[_Family]:
        gossip = self.src.gossip()
        node = None if gossip is None else gossip.node
        stats: dict[str, int] = {} if node is None else dict(node.counters())
        msgs = _counter(
            "clanagent_gossip_messages",
            "Gossip datagrams sent and received",
            labels=["direction"],
        )
        msgs.add_metric(["out"], stats.get("msgs_sent", 0))
        msgs.add_metric(["in"], stats.get("msgs_received", 0))
        yield msgs
        sent = _counter(
            "clanagent_gossip_bytes",
            "Gossip bytes by direction and type (out: membership, gossip and ae add up "
            "to all; records and ae_records are the record bytes inside them)",
            labels=["direction", "type"],
        )
        sent.add_metric(["out", "all"], stats.get("bytes_sent", 0))
        for t in _SENT_TYPES:
            sent.add_metric(["out", t], stats.get(f"bytes_sent_{t}", 0))
        sent.add_metric(["in", "all"], stats.get("bytes_received", 0))
        yield sent
        records = _counter(
            "clanagent_gossip_records",
            "Records received from peers, by what became of them",
            labels=["result"],
        )
        for key, result in _RECORD_RESULTS.items():
            records.add_metric([result], stats.get(key, 0))
        yield records
        queue = _gauge(
            "clanagent_gossip_queue_depth",
            "Broadcasts waiting to be gossiped, by queue",
            labels=["queue"],
        )
        for label, depth in (node.queue_depths() if node is not None else {}).items():
            queue.add_metric([label], depth)
        yield queue
        sessions = _gauge("clanagent_gossip_sessions", "Live peer sessions")
        sessions.add_metric([], gossip.counters().get("sessions", 0) if gossip else 0)
        yield sessions
        # Everything `clanctl status` counts, for what has no family of its own.
        allc = _gauge(
            "clanagent_status_counter",
            "The counters of `clanctl status`, by part and name",
            labels=["part", "name"],
        )
        for part, getter in (
            ("gossip", self.src.gossip),
            ("control", self.src.control),
            ("web", self.src.web),
            ("mesh", self.src.mesh),
            ("secrets", self.src.secrets),
            ("metrics_http", self.src.listener),
        ):
            obj = getter()
            counters = getattr(obj, "counters", None)
            values = counters() if callable(counters) else getattr(obj, "stats", None)
            if isinstance(values, dict):
                for name, v in sorted(values.items()):
                    if isinstance(v, int | float) and not isinstance(v, bool):
                        allc.add_metric([part, str(name)], v)
        yield allc

    # -- record checks -----------------------------------------------------------------

    def _records(self) -> Iterable[_Family]:
        checks = self.src.record_checks()
        fam = _counter(
            "clanagent_record_checks",
            "Peers' records by kind and body check result (passed, refused, deferred)",
            labels=["kind", "result"],
        )
        for (kind, result), n in sorted(checks.by_kind.items()) if checks is not None else ():
            fam.add_metric([kind, result], n)
        yield fam

    # -- store ---------------------------------------------------------------------------

    def _store(self) -> Iterable[_Family]:
        store = self.src.store()
        if store is None:
            return
        c = store.counters()
        for name, key, doc in (
            ("clanagent_store_writes", "written", "Durable records written"),
            ("clanagent_store_commits", "commits", "Group commits that wrote records"),
            ("clanagent_store_fsyncs", "fsyncs", "fsyncs (commits, checkpoints, directories)"),
            ("clanagent_store_soft", "soft", "Soft records accepted (memory only)"),
        ):
            yield _counter(name, doc, value=c.get(key, 0))
        yield _gauge("clanagent_store_records", "Records held", value=c["records"])
        yield _gauge("clanagent_store_bytes", "Bytes of records held", value=c["bytes"])
        hist = getattr(store, "commit_seconds", None)
        if hist is not None:
            buckets, total, _count = hist.snapshot()
            fam = _histogram(
                "clanagent_store_commit_seconds",
                "Time of each store commit's COMMIT (the WAL fsync)",
            )
            fam.add_metric([], [(_le(b), n) for b, n in buckets], sum_value=total)
            yield fam

    # -- mesh ---------------------------------------------------------------------------

    def _mesh(self) -> Iterable[_Family]:
        mesh, inv, ident = self.src.mesh(), self.src.inventory(), self.src.identity()
        if mesh is None:
            return
        stats = dict(getattr(mesh, "stats", {}))
        yield _counter(
            "clanagent_mesh_failovers",
            "Paths in use given up for another (failovers)",
            value=stats.get("paths_failed", 0),
        )
        probes = _counter("clanagent_mesh_probes", "Path probes, by result", labels=["result"])
        for key, label in (
            ("probes_sent", "sent"),
            ("probes_answered", "answered"),
            ("probes_bad", "bad"),
        ):
            probes.add_metric([label], stats.get(key, 0))
        yield probes
        if inv is None or ident is None:
            return
        selector = getattr(mesh, "selector", None)
        device = getattr(mesh, "device", None)  # the WireGuard state at the last reconcile
        status = getattr(device, "status", None) or {}
        path = _gauge(
            "clanagent_mesh_path",
            "The path chosen to each peer machine, by kind (none: no usable path)",
            labels=["peer", "kind"],
        )
        rtt = _gauge(
            "clanagent_mesh_probe_rtt_seconds",
            "The chosen path's probe RTT estimate to each peer",
            labels=["peer"],
        )
        age = _gauge(
            "clanagent_wireguard_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with each peer",
            labels=["peer"],
        )
        wg_bytes = _counter(
            "clanagent_wireguard_bytes",
            "WireGuard bytes with each peer, by direction",
            labels=["peer", "direction"],
        )
        wall = self.src.wall()
        for name, m in sorted(inv.doc["machines"].items()):
            if m["node_key"] == ident.public_key:
                continue
            # Without WireGuard there is no path choice to report (not "none").
            current = selector.current(m["node_key"]) if selector is not None else None
            if selector is not None:
                path.add_metric([name, "none" if current is None else current.kind], 1)
            if current is not None:
                est = selector.rtt(m["node_key"], current)
                if est is not None:
                    rtt.add_metric([name], est)
            st = status.get(m["wg_key"])
            if st is not None:
                if st.last_handshake is not None:
                    age.add_metric([name], max(0.0, wall - st.last_handshake))
                wg_bytes.add_metric([name, "rx"], st.rx_bytes)
                wg_bytes.add_metric([name, "tx"], st.tx_bytes)
        yield from (path, rtt, age, wg_bytes)

    # -- secrets --------------------------------------------------------------------------

    def _secrets(self) -> Iterable[_Family]:
        secrets = self.src.secrets()
        if secrets is None:
            return
        stats = dict(secrets.counters())
        yield _counter(
            "clanagent_secret_rotations",
            "New generations of secrets this machine generated",
            value=stats.get("generated", 0),
        )
        ops = _counter(
            "clanagent_secret_operations",
            "Secret file operations on this machine, by operation",
            labels=["op"],
        )
        for op in ("installed", "verified", "removed", "failed"):
            ops.add_metric([op], stats.get(op, 0))
        yield ops
        age = _gauge(
            "clanagent_secret_age_seconds",
            "Age of each secret's current generation",
            labels=["secret"],
        )
        gen = _gauge(
            "clanagent_secret_generation", "Each secret's current generation", labels=["secret"]
        )
        due = _gauge(
            "clanagent_secret_next_rotation_timestamp_seconds",
            "When each secret is due for rotation (unix seconds; absent: never)",
            labels=["secret"],
        )
        pending = _gauge(
            "clanagent_secret_pending",
            "Whether a secret waits for its generator (1)",
            labels=["secret"],
        )
        for row in secrets.rows():
            sid = str(row["id"])
            gen.add_metric([sid], row["generation"] or 0)
            if row["age_s"] is not None:
                age.add_metric([sid], row["age_s"])
            if row["next_rotation"] is not None:
                due.add_metric([sid], row["next_rotation"])
            pending.add_metric([sid], 1 if row["pending"] else 0)
        yield from (age, gen, due, pending)

    # -- VMs ---------------------------------------------------------------------------------

    def _vms(self) -> Iterable[_Family]:
        vms = self.src.vms()
        if vms is None:
            return
        me = vms.my_machine()
        state = _gauge(
            "clanagent_vm_state",
            "Each VM placed on this machine, by state (1 for the current one)",
            labels=["vm", "state"],
        )
        restarts = _counter(
            "clanagent_vm_restarts",
            "Restarts of each VM on this machine after it crashed",
            labels=["vm"],
        )
        for row in vms.clan_vms():
            if row["machine"] != me:
                continue
            state.add_metric([row["vm"], str(row["state"])], 1)
            restarts.add_metric([row["vm"]], int(row.get("crashes") or 0))
        yield from (state, restarts)

    # -- control and web requests -----------------------------------------------------------

    def _requests(self) -> Iterable[_Family]:
        fam = _counter(
            "clanagent_control_requests",
            "Control API requests by surface (socket, web), method and result",
            labels=["surface", "method", "result"],
        )
        control, web = self.src.control(), self.src.web()
        if control is not None:
            for (method, result), n in sorted(control.by_method.items()):
                fam.add_metric(["socket", method, result], n)
        app = getattr(web, "app", None)
        if app is not None:
            for (method, result), n in sorted(app.stats.by_method.items()):
                fam.add_metric(["web", method, result], n)
        yield fam


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def process_collector() -> Collector:
    """The process's CPU, memory and fds (procfs; fine in a worker thread)."""
    from prometheus_client import ProcessCollector

    return ProcessCollector(registry=None)


def registry(sources: MetricsSources) -> CollectorRegistry:
    """A registry of the agent's collector and the process's: one whole
    scrape on the calling thread (tests, tools)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AgentCollector(sources))
    reg.register(process_collector())
    return reg


class Snapshot:
    """Families already read: what the exposition formats render.

    Reading the parts' live state must run on the event loop; building the
    families and formatting them (most of a scrape's time) uses only these
    copies, so it may run in a worker thread."""

    def __init__(self, families: list[_Family], *collectors: Collector) -> None:
        self.families = families
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for fam in self.families:
            yield fam.metric()
        for c in self.collectors:
            yield from c.collect()


def render(reg: CollectorRegistry | Snapshot, *, openmetrics: bool = False) -> tuple[bytes, str]:
    """(exposition bytes, content type) of one scrape (or of a snapshot)."""
    if openmetrics:
        from prometheus_client.openmetrics.exposition import generate_latest as om_latest

        return om_latest(reg), OPENMETRICS_TYPE  # type: ignore[arg-type]
    from prometheus_client.exposition import generate_latest

    return generate_latest(reg), TEXT_TYPE  # type: ignore[arg-type]
