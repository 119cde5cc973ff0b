"""Every record kind the agent publishes, and the check a record's body must pass.

Owns: the one registry (`KINDS`) of record kinds, each a `KindSpec` with its
body schema (a `wire.Record` where the kind has one, else the kind's own
strict parser) and its semantic rules; `validate(record, ctx)`, which the
gossip node calls before it stores or forwards a record and the agent
calls before it publishes one of its own.

Each kind also has a class: *durable* (persisted by the store, fsynced:
what the clan must not forget across a restart -- the inventory, secrets,
endpoints, exports, VM orders, node-info) or *soft* (held in memory only,
dropped `ttl` seconds after it was last received, re-learned from the
publisher's periodic refresh or from anti-entropy after a restart:
topology, VM status and console tails).  `min_interval` is the shortest
time between two publications of one (kind, key) by one machine (the
publisher adds jitter on top); `refresh` is how often the publisher of a
soft kind republishes an unchanged record so it never expires while the
publisher lives (None: a one-shot record that may expire).

The rules: no timestamp beyond `now + MAX_FUTURE_SKEW`; a rotate request
asks for at most the generation after the current one (and never beyond
`MAX_GENERATION`); `vm-status` / `vm-logs` count only from a machine the
inventory places that VM on; a log tail is at most `MAX_LOG_TAIL` bytes.

Must never: raise anything but `Refusal` (a malformed body of any shape is a
Refusal), or decide on anything but the record and the `RecordContext`
(no I/O, no clock: `ctx.now` is the time).  A rule that needs state we do
not have yet (no inventory) raises a *transient* Refusal: the sender is
not to blame, the record is simply not taken now.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .wire import NodeInfo, Record, SignedRecord, WireError, record_type

__all__ = [
    "MAX_FUTURE_SKEW",
    "MAX_GENERATION",
    "MAX_LOG_TAIL",
    "KINDS",
    "KindSpec",
    "Refusal",
    "RecordContext",
    "VmStatusBody",
    "VmLogsBody",
    "VmLogsRequestBody",
    "is_durable",
    "min_interval",
    "soft_ttl",
    "spec",
    "validate",
]

MAX_FUTURE_SKEW = 300  # seconds a record's timestamp may run ahead of our clock
MAX_GENERATION = 2**48  # no secret ever gets this far by rotating (1/s for 8 million years)
MAX_LOG_TAIL = 16 * 1024  # bytes of console tail in a vm-logs record (the host's LOG_TAIL)
MAX_TEXT = 4096  # a free-text field (a reason, a state)


class Refusal(ValueError):
    """A record this agent does not take.  `transient`: we cannot decide yet (retry later)."""

    def __init__(self, kind: str, reason: str | None = None, *, transient: bool = False) -> None:
        # Refusal(kind, reason), or Refusal(reason) where no kind applies.
        if reason is None:
            kind, reason = "", kind
        super().__init__(f"{kind}: {reason}" if kind else reason)
        self.kind = kind
        self.reason = reason
        self.transient = transient


@dataclass(frozen=True, slots=True)
class RecordContext:
    """What the rules need to know about the agent's state.

    `inventory`: the current inventory (clanagent.inventory.model.Inventory)
    or None before one is known.  `secret_generation(instance_id)`: the
    current (highest known) generation of a secret instance, 0 before the
    first.  `vm_hosts(vm)`: the node keys of the machines the inventory
    places `vm` on, None when the inventory is not known; defaults to the
    inventory's placement."""

    now: float
    inventory: Any = None
    secret_generation: Callable[[str], int] = lambda _id: 0
    vm_hosts: Callable[[str], frozenset[bytes] | None] | None = None

    def hosts_of(self, vm: str) -> frozenset[bytes] | None:
        if self.vm_hosts is not None:
            return self.vm_hosts(vm)
        return placed_on(self.inventory, vm)


def placed_on(inv: Any, vm: str) -> frozenset[bytes] | None:
    """Node keys of the machines `inv` places `vm` on; None without an inventory."""
    if inv is None:
        return None
    machines = inv.doc["machines"]
    return frozenset(machines[m]["node_key"] for m in inv.placement(vm) if m in machines)


# --------------------------------------------------------------- body schemas


@record_type
@dataclass(frozen=True, slots=True)
class VmStatusBody(Record):
    """A host's word on one of its VMs (key = the VM name)."""

    KIND: ClassVar[str] = "vm-status"
    vm: str
    machine: str
    state: str
    reason: str
    accel: str
    pid: int
    crashes: int
    booted: int
    overlay: str
    at: int

    def __post_init__(self) -> None:
        for name in ("vm", "machine", "accel", "overlay"):
            if len(getattr(self, name)) > 255:
                raise WireError(f"body.{name}: too long")
        for name in ("state", "reason"):
            if len(getattr(self, name)) > MAX_TEXT:
                raise WireError(f"body.{name}: too long")
        for name in ("pid", "crashes", "booted", "at"):
            if not 0 <= getattr(self, name) < 2**63:
                raise WireError(f"body.{name}: out of range")


@record_type
@dataclass(frozen=True, slots=True)
class VmLogsRequestBody(Record):
    """Someone asks the VM's host for a console tail at least as new as `at`."""

    KIND: ClassVar[str] = "vm-logs-request"
    at: int

    def __post_init__(self) -> None:
        if not 0 <= self.at < 2**63:
            raise WireError("body.at: out of range")


@record_type
@dataclass(frozen=True, slots=True)
class VmLogsBody(Record):
    """The host's console tail of a VM (key = the VM name)."""

    KIND: ClassVar[str] = "vm-logs"
    at: int
    machine: str
    tail: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.at < 2**63:
            raise WireError("body.at: out of range")
        if len(self.machine) > 255:
            raise WireError("body.machine: too long")
        if len(self.tail) > MAX_LOG_TAIL:
            raise WireError(f"body.tail: more than {MAX_LOG_TAIL} bytes")


# --------------------------------------------------------------- the registry


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One record kind: how its body parses and what must hold of it.

    `parse(body)` returns the checked body or raises WireError (any other
    exception from a malformed body is a bug the tests look for);
    `rules(record, parsed, ctx)` raises Refusal.

    `durable`: persisted (and fsynced) by the store; else soft: in memory
    only, expired `ttl` seconds after it was last received.
    `min_interval`: seconds between two publications of one (kind, key) by
    one machine, at least (publishers add jitter on top).  `refresh`: a
    soft kind's publisher republishes an unchanged record this often (plus
    jitter, always well inside `ttl`); None for one-shot records."""

    kind: str
    parse: Callable[[Any], Any]
    rules: Callable[[SignedRecord, Any, RecordContext], None]
    schema: type[Record] | None = None
    durable: bool = True
    ttl: float | None = None
    min_interval: float = 0.0
    refresh: float | None = None

    def check(self) -> None:
        """The class invariants (raised as AssertionError when the table is wrong)."""
        if self.min_interval < 0:
            raise AssertionError(f"{self.kind}: negative min_interval")
        if self.durable:
            if self.ttl is not None or self.refresh is not None:
                raise AssertionError(f"{self.kind}: a durable kind has no ttl nor refresh")
            return
        if self.ttl is None or self.ttl <= 0:
            raise AssertionError(f"{self.kind}: a soft kind needs a positive ttl")
        if self.min_interval >= self.ttl:
            raise AssertionError(f"{self.kind}: min_interval must be well inside the ttl")
        if self.refresh is not None and not self.min_interval <= self.refresh <= self.ttl / 2:
            # Two refreshes per ttl: one lost datagram never expires a live record.
            raise AssertionError(f"{self.kind}: refresh must lie in [min_interval, ttl / 2]")


def _future(kind: str, what: str, t: int, ctx: RecordContext) -> None:
    if t > ctx.now + MAX_FUTURE_SKEW:
        raise Refusal(kind, f"{what} {t} is more than {MAX_FUTURE_SKEW} s in the future")


def _key_is(kind: str, rec: SignedRecord, expected: str) -> None:
    if rec.key != expected:
        raise Refusal(kind, f"record key {rec.key[:64]!r} is not {expected[:64]!r}")


def _no_rules(rec: SignedRecord, parsed: Any, ctx: RecordContext) -> None:
    return None


def _schema_parse(cls: type[Record]) -> Callable[[Any], Any]:
    return lambda body: cls.from_wire(body, path="body")


# -- inventory


def _parse_inventory(body: Any) -> Any:
    from .inventory.versions import InventoryVersion

    return InventoryVersion.from_wire(body)


def _inventory_rules(rec: SignedRecord, v: Any, ctx: RecordContext) -> None:
    # The admins' signatures and the history are the inventory manager's
    # check (admit_record); here only what ties the record to its body.
    _key_is(rec.kind, rec, v.hash.hex())


# -- node-info, endpoints, topology


def _singleton(rec: SignedRecord, parsed: Any, ctx: RecordContext) -> None:
    _key_is(rec.kind, rec, "")


def _node_info_rules(rec: SignedRecord, info: NodeInfo, ctx: RecordContext) -> None:
    _singleton(rec, info, ctx)
    if len(info.name) > 255 or len(info.version) > 64 or len(info.addrs) > 64:
        raise Refusal(rec.kind, "name, version or addresses too long")
    if any(len(a) > 300 for a in info.addrs):
        raise Refusal(rec.kind, "an address is too long")


def _parse_endpoints(body: Any) -> Any:
    from .mesh.candidates import parse_endpoints_body

    return parse_endpoints_body(body)


def _parse_topology(body: Any) -> Any:
    from .topology import parse_body

    return parse_body(body)


def _topology_rules(rec: SignedRecord, body: Any, ctx: RecordContext) -> None:
    _singleton(rec, body, ctx)
    _future(rec.kind, "at", body.at, ctx)


# -- services


def _parse_export(body: Any) -> Any:
    from .services.wiring import parse_export_body

    return parse_export_body(body)


def _export_rules(rec: SignedRecord, body: Any, ctx: RecordContext) -> None:
    _key_is(rec.kind, rec, f"{body.service}.{body.role}")
    inv = ctx.inventory
    if inv is None:
        return  # the services part checks the signer against the inventory it has
    m = inv.machine_by_node_key(rec.origin)
    if m is not None and m.name != body.machine:
        raise Refusal(rec.kind, f"signed by {m.name}, not by the machine it names")
    if m is not None:
        from .inventory.select import roles_of

        if (body.service, body.role) not in roles_of(inv.doc, m.name):
            # our inventory may be older than the one that gave it the role
            raise Refusal(
                rec.kind,
                f"{m.name} does not hold {body.service}.{body.role}",
                transient=True,
            )


# -- secrets


def _parse_secret(body: Any) -> Any:
    from .secrets.record import SecretBody

    return SecretBody.from_wire(body, path="body")


def _secret_rules(rec: SignedRecord, body: Any, ctx: RecordContext) -> None:
    _key_is(rec.kind, rec, body.instance.id)
    if body.generation > MAX_GENERATION:
        raise Refusal(rec.kind, f"generation beyond {MAX_GENERATION}")
    _future(rec.kind, "created", body.created, ctx)


def _parse_rotate(body: Any) -> Any:
    from .secrets.record import RotateRequest

    return RotateRequest.from_wire(body, path="body")


def _rotate_rules(rec: SignedRecord, body: Any, ctx: RecordContext) -> None:
    from .secrets.model import parse_instance_id

    if body.generation > MAX_GENERATION:
        raise Refusal(rec.kind, f"generation beyond {MAX_GENERATION}")
    _future(rec.kind, "requested", body.requested, ctx)
    if ctx.inventory is None:
        raise Refusal(rec.kind, "no inventory yet to check the secret against", transient=True)
    try:
        parse_instance_id(rec.key, ctx.inventory.doc)
    except WireError as exc:
        raise Refusal(rec.kind, f"key: {exc.reason}") from None
    current = ctx.secret_generation(rec.key)
    if body.generation > current + 1:
        # A member may know a generation that has not reached us yet: not its fault.
        raise Refusal(
            rec.kind,
            f"asks to rotate generation {body.generation}, the current one is {current}",
            transient=True,
        )


# -- VMs


def _parse_vm_request(body: Any) -> Any:
    from .vmhost.requests import parse_body

    return parse_body(body)


def _vm_request_rules(rec: SignedRecord, body: Any, ctx: RecordContext) -> None:
    from .vmhost.requests import verify_request

    _key_is(rec.kind, rec, body.vm)
    _future(rec.kind, "at", body.at, ctx)
    if ctx.inventory is None:
        raise Refusal(rec.kind, "no inventory yet to check the admin against", transient=True)
    try:
        verify_request(body, frozenset(ctx.inventory.admins))
    except WireError as exc:
        raise Refusal(rec.kind, exc.reason) from None


def _from_host(rec: SignedRecord, machine: str, ctx: RecordContext) -> None:
    """The record comes from the machine it names, and the inventory places the VM there."""
    if ctx.inventory is None:
        raise Refusal(rec.kind, "no inventory yet to say where the VM runs", transient=True)
    m = ctx.inventory.machine_by_node_key(rec.origin)
    if m is None or m.name != machine:
        raise Refusal(rec.kind, f"names machine {machine[:64]!r} but is signed by another")
    hosts = ctx.hosts_of(rec.key)
    if not hosts or rec.origin not in hosts:
        # An honest host whose VM the admins just moved (or declared) may see
        # another inventory than ours: not taken, but not held against it.
        raise Refusal(
            rec.kind,
            f"{machine[:64]} is not where the inventory places VM {rec.key[:64]!r}",
            transient=True,
        )


def _vm_status_rules(rec: SignedRecord, body: VmStatusBody, ctx: RecordContext) -> None:
    _key_is(rec.kind, rec, body.vm)
    _future(rec.kind, "at", body.at, ctx)
    _from_host(rec, body.machine, ctx)


def _vm_logs_rules(rec: SignedRecord, body: VmLogsBody, ctx: RecordContext) -> None:
    _future(rec.kind, "at", body.at, ctx)
    _from_host(rec, body.machine, ctx)


def _vm_logs_request_rules(rec: SignedRecord, body: VmLogsRequestBody, ctx: RecordContext) -> None:
    # A request "newer than the future" would hold every host's answer hostage.
    _future(rec.kind, "at", body.at, ctx)


# -- nat (mesh/nat.py: reflexive endpoints, punch requests, relay asks and grants)


def _nat_rules(rec: SignedRecord, body: Any, ctx: RecordContext) -> None:
    from .mesh.nat import nat_semantics

    _singleton(rec, body, ctx)
    inv = ctx.inventory
    members = None if inv is None else frozenset(inv.node_keys())
    why = nat_semantics(rec.origin, body, members)
    if why is not None:
        raise Refusal(rec.kind, why)
    for p in body.punch:
        _future(rec.kind, "punch at", p.at // 1000, ctx)


def _nat_specs() -> list[KindSpec]:
    from .mesh.nat import NAT_KIND, REFRESH, TTL, NatBody

    return [
        KindSpec(
            NAT_KIND,
            _schema_parse(NatBody),
            _nat_rules,
            NatBody,
            durable=False,  # observations and punch rounds are re-learned in seconds
            ttl=TTL,
            min_interval=1.0,  # a punch request must not wait long
            refresh=REFRESH,
        )
    ]


def _registry() -> dict[str, KindSpec]:
    from .inventory.manager import RECORD_KIND
    from .inventory.versions import InventoryVersionWire
    from .mesh.candidates import ENDPOINTS_KIND, EndpointsBody
    from .secrets.record import ROTATE_KIND, SECRET_KIND, RotateRequest, SecretBody
    from .services.wiring import EXPORT_KIND, ExportBody
    from .topology import MAX_REFRESH as TOPOLOGY_REFRESH
    from .topology import MIN_INTERVAL as TOPOLOGY_MIN_INTERVAL
    from .topology import STALE as TOPOLOGY_TTL
    from .topology import TOPOLOGY_KIND, TopologyBody
    from .vmhost.requests import REQUEST_KIND, VmRequest
    from .vmhost.service import LOGS_KIND, LOGS_REQUEST_KIND, VM_STATUS_KIND

    # Durable: what must survive a restart of every machine at once.
    # Soft: re-learned within seconds to minutes; losing it costs a refresh.
    specs = [
        KindSpec(RECORD_KIND, _parse_inventory, _inventory_rules, InventoryVersionWire),
        # node-info is durable: published once per start (no steady cost, so
        # nothing to save) and with no refresh a TTL could rely on; it holds
        # the addresses a restarted agent dials before it re-learns anything.
        KindSpec(NodeInfo.KIND, _schema_parse(NodeInfo), _node_info_rules, NodeInfo),
        KindSpec(ENDPOINTS_KIND, _parse_endpoints, _singleton, EndpointsBody, min_interval=5.0),
        KindSpec(
            TOPOLOGY_KIND,
            _parse_topology,
            _topology_rules,
            TopologyBody,
            durable=False,
            ttl=TOPOLOGY_TTL,  # three of the longest refreshes
            min_interval=TOPOLOGY_MIN_INTERVAL,
            refresh=TOPOLOGY_REFRESH,  # the longest: it stretches with the clan (topology.refresh_for)
        ),
        KindSpec(EXPORT_KIND, _parse_export, _export_rules, ExportBody, min_interval=1.0),
        KindSpec(SECRET_KIND, _parse_secret, _secret_rules, SecretBody),
        KindSpec(ROTATE_KIND, _parse_rotate, _rotate_rules, RotateRequest, min_interval=1.0),
        KindSpec(REQUEST_KIND, _parse_vm_request, _vm_request_rules, VmRequest),
        KindSpec(
            VM_STATUS_KIND,
            _schema_parse(VmStatusBody),
            _vm_status_rules,
            VmStatusBody,
            durable=False,
            ttl=1800.0,
            min_interval=1.0,
            refresh=600.0,
        ),
        KindSpec(
            LOGS_REQUEST_KIND,
            _schema_parse(VmLogsRequestBody),
            _vm_logs_request_rules,
            VmLogsRequestBody,
            durable=False,
            ttl=600.0,
            min_interval=1.0,  # agent.LOGS_ASK_INTERVAL
        ),
        KindSpec(
            LOGS_KIND,
            _schema_parse(VmLogsBody),
            _vm_logs_rules,
            VmLogsBody,
            durable=False,
            ttl=600.0,
            min_interval=1.0,  # vmhost.LOGS_ANSWER_INTERVAL
        ),
    ]
    specs += _nat_specs()
    for s in specs:
        if s.schema is not None and s.kind != s.schema.KIND:
            raise AssertionError(f"{s.kind}: schema {s.schema.__name__} is for {s.schema.KIND}")
        s.check()
    return {s.kind: s for s in specs}


_KINDS: dict[str, KindSpec] | None = None


def kinds() -> dict[str, KindSpec]:
    """The registry, kind -> KindSpec (built on first use: its modules import us lazily)."""
    global _KINDS
    if _KINDS is None:
        _KINDS = _registry()
    return _KINDS


class _Kinds:
    """`KINDS[kind]` / `kind in KINDS` / iteration over the registry."""

    def __getitem__(self, kind: str) -> KindSpec:
        return kinds()[kind]

    def __contains__(self, kind: object) -> bool:
        return kind in kinds()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(kinds())

    def __len__(self) -> int:
        return len(kinds())


KINDS = _Kinds()


def spec(kind: str) -> KindSpec | None:
    """The KindSpec of `kind`, None for a kind the registry does not know."""
    return kinds().get(kind)


def is_durable(kind: str) -> bool:
    """Is `kind` persisted by the store?  False for soft kinds.  True for an
    unknown kind, the safe default (`validate` refuses those before they
    reach a store, so only a test or a bug puts one there)."""
    s = kinds().get(kind)
    return s is None or s.durable


def min_interval(kind: str) -> float:
    """Seconds between two publications of one (kind, key) of ours, at least
    (0 for a kind the registry does not know)."""
    s = kinds().get(kind)
    return 0.0 if s is None else s.min_interval


def soft_ttl(kind: str) -> float | None:
    """Seconds a peer's record of a soft `kind` lives after its last new
    version arrived (the gossip node expires it); None for durable kinds."""
    s = kinds().get(kind)
    return None if s is None or s.durable else s.ttl


def validate(record: SignedRecord, ctx: RecordContext) -> Any:
    """The record's checked body; Refusal (and nothing else) when it is not taken."""
    spec = kinds().get(record.kind)
    if spec is None:
        raise Refusal(record.kind[:64], "unknown record kind")
    try:
        parsed = spec.parse(record.body)
    except WireError as exc:
        raise Refusal(record.kind, exc.reason) from None
    except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as exc:
        # A parser that trips on a shape it did not foresee still refuses.
        raise Refusal(record.kind, f"malformed body ({type(exc).__name__})") from None
    try:
        spec.rules(record, parsed, ctx)
    except Refusal:
        raise
    except WireError as exc:
        raise Refusal(record.kind, exc.reason) from None
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise Refusal(record.kind, f"malformed body ({type(exc).__name__})") from None
    return parsed
