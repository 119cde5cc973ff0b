"""Which secret instances this machine must generate, install or remove now (sans-IO).

Owns the decision, as a pure function of: the inventory doc, our machine
name, the machines online (from gossip membership, us included), every
known secret record and rotate request per instance id, the instances
installed on disk, and `now`.  For each instance:

* the generator is `generator_for(instance, online holders)`; we act only
  when that is us -- so when the chosen machine dies (even mid-rotation,
  before publishing N+1) the next online holder is chosen and makes N+1;
* reasons to generate, in this order (the first that applies is reported):
  "first" (no current record), "recipients" (the current generation's
  recipients or admins differ from the holders' and the doc's: a removed
  machine must not read the next one, a new one must), "due" (created +
  rotate_days * 86400 <= now), "requested" (a member's rotate request for
  the current generation, or the next, made after the current generation
  was created and not after now: each request rotates at most once), "dependency" (a dependency's current
  generation differs from the one recorded in `inputs`);
* we wait when a dependency has no current generation we can read, or is
  itself being generated this round;
* we install every instance we hold whose current generation seals to us,
  and remove installed instances we no longer hold.

Must never: do I/O, read the clock or randomness (apart from decrypt
checks through the given `opens`), or pick a different current record or
generator than another node given the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from clanagent.records import MAX_GENERATION
from clanagent.secrets.model import (
    SecretInstance,
    dependency_instance,
    generator_for,
    holder_keys,
    instances,
    parse_instance_id,
    secret_spec,
)
from clanagent.secrets.record import (
    Current,
    SecretBody,
    choose_current,
    parse_rotate_request,
    parse_secret_record,
)
from clanagent.wire import SignedRecord, WireError

__all__ = [
    "REASONS",
    "GenerateTask",
    "Install",
    "Waiting",
    "Plan",
    "plan",
    "current_of",
    "InstanceStatus",
    "status",
]

REASONS = ("first", "recipients", "due", "requested", "dependency")
DAY = 86400


@dataclass(frozen=True, slots=True)
class GenerateTask:
    """Make generation `generation` of `instance` and publish it.

    `recipients` (node key -> box key) and `admins` are what to seal to;
    `deps` maps dependency secret name -> the instance whose current
    generation (`inputs[instance id]`) must be opened and given to the generator.
    """

    instance: SecretInstance
    reason: str
    generation: int
    recipients: Mapping[bytes, bytes]
    admins: tuple[bytes, ...]
    deps: Mapping[str, SecretInstance]
    inputs: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Install:
    """Write the current generation of an instance we hold (it seals to us)."""

    instance: SecretInstance
    record: SignedRecord
    body: SecretBody


@dataclass(frozen=True, slots=True)
class Waiting:
    """An instance that nobody here can act on now, and why (for status)."""

    instance: SecretInstance
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    generate: list[GenerateTask] = field(default_factory=list)
    install: list[Install] = field(default_factory=list)
    remove: list[tuple[str, str]] = field(default_factory=list)
    waiting: list[Waiting] = field(default_factory=list)


def current_of(
    doc: dict,
    inst: SecretInstance,
    records: Sequence[SignedRecord],
    *,
    opens: Callable[[SecretBody], object] | None = None,
    verify: bool = True,
) -> Current | None:
    """The current generation of `inst`: only records by its current holders count."""
    allowed = [nk for nk, _ in holder_keys(doc, inst).values()]
    return choose_current(_sane(records), allowed, opens=opens, verify=verify)


def _sane(records: Iterable[SignedRecord]) -> list[SignedRecord]:
    """Records whose generation a real history can reach (records.MAX_GENERATION).

    One beyond it (signed by a holder) must not become current nor set the
    next generation: generations would run out."""
    out = []
    for rec in records:
        body = rec.body
        gen = body.get("generation") if type(body) is dict else None
        if type(gen) is int and gen > MAX_GENERATION:
            continue
        out.append(rec)
    return out


def _max_generation(doc: dict, records: Iterable[SignedRecord], verify: bool) -> int:
    # Any member's record counts here (a holder that has since left may
    # have made the highest generation), so the next one is always new.
    members = {m["node_key"] for m in doc["machines"].values()}
    best = 0
    for rec in _sane(records):
        if rec.origin not in members:
            continue
        try:
            best = max(best, parse_secret_record(rec, verify=verify).generation)
        except WireError:
            continue
    return best


def _requested(
    doc: dict, requests: Iterable[SignedRecord], current: SecretBody, now: int, verify: bool
) -> bool:
    """Does a member's rotate request ask for the generation after `current`?

    A request counts once: it must name the current generation (or the one
    after it, from a member that saw a newer one first) and be made after
    the current generation was created and not after `now`.  The generation
    it causes is created later than the request, so the request is spent:
    no request, whatever its numbers, rotates a secret more than once."""
    members = {m["node_key"] for m in doc["machines"].values()}
    members.update(doc["clan"].get("admins", ()))
    for rec in requests:
        if rec.origin not in members:
            continue
        try:
            req = parse_rotate_request(rec, verify=verify)
        except WireError:
            continue
        if req.requested > now:
            continue
        # Naming the current generation, a request is spent by the rotation
        # it causes (the next one is newer than it names), so it may come in
        # the same second the current one was created (times are seconds).
        # Naming the next one, it must be strictly later, or it would count
        # again for the generation it caused.
        if req.generation == current.generation and current.created <= req.requested:
            return True
        if req.generation == current.generation + 1 and current.created < req.requested:
            return True
    return False


def plan(
    doc: dict,
    me: str,
    online: Iterable[str],
    records: Mapping[str, Sequence[SignedRecord]],
    rotate_requests: Mapping[str, Sequence[SignedRecord]],
    now: int,
    *,
    installed: Iterable[tuple[str, str]] = (),
    opens: Callable[[SecretBody], object] | None = None,
    verify: bool = True,
) -> Plan:
    """What `me` must do now.  See the module docstring for the rules.

    `records` / `rotate_requests` map instance id -> every known record
    of that key (any origin).  `opens(body)` should decrypt `body` when we
    are a recipient (raising WireError when it does not open) and do
    nothing otherwise, so a generation that does not open for us is never
    chosen.  `verify=False` skips signature checks for records the store
    has already verified.
    """
    online_set = set(online)
    admins = tuple(sorted(set(doc["clan"].get("admins", ()))))
    out = Plan()
    currents: dict[str, Current | None] = {}
    all_instances = instances(doc)
    held_here: set[tuple[str, str]] = set()

    def cur(inst: SecretInstance) -> Current | None:
        if inst.id not in currents:
            currents[inst.id] = current_of(
                doc, inst, records.get(inst.id, ()), opens=opens, verify=verify
            )
        return currents[inst.id]

    for inst in all_instances:
        keys = holder_keys(doc, inst)
        if me not in keys:
            continue
        held_here.add((inst.service, inst.secret))
        spec = secret_spec(doc, inst.service, inst.secret)
        assert spec is not None  # instances() only yields declared secrets
        current = cur(inst)
        my_key = keys[me][0]
        if current is not None and my_key in current.body.recipients:
            out.install.append(Install(inst, current.record, current.body))

        chosen = generator_for(inst.id, [(m, k[0]) for m, k in keys.items() if m in online_set])
        last = _max_generation(doc, records.get(inst.id, ()), verify)
        reason = _reason(doc, inst, spec, current, keys, admins, rotate_requests, now, cur, verify)
        if reason == "first" and last:
            # Generations exist, but only from machines that no longer hold
            # it: the holder set changed.
            reason = "recipients"
        if reason is None:
            continue
        if chosen != me:
            why = "no holder is online" if chosen is None else f"generated by {chosen}"
            out.waiting.append(Waiting(inst, f"{reason}: {why}"))
            continue
        deps: dict[str, SecretInstance] = {}
        inputs: dict[str, int] = {}
        blocked = None
        for dep in spec["depends"]:
            dinst = dependency_instance(doc, inst, dep, me)
            dcur = cur(dinst) if dinst is not None else None
            if dinst is None or me not in holder_keys(doc, dinst):
                blocked = f"dependency {dep} is not held by {me}"
            elif dcur is None or my_key not in dcur.body.recipients:
                blocked = f"waiting for dependency {dinst.id}"
            if blocked:
                break
            assert dinst is not None and dcur is not None
            deps[dep] = dinst
            inputs[dinst.id] = dcur.body.generation
        if blocked:
            out.waiting.append(Waiting(inst, f"{reason}: {blocked}"))
            continue
        generation = last + 1
        recipients = {nk: bk for nk, bk in keys.values()}
        out.generate.append(
            GenerateTask(inst, reason, generation, recipients, admins, deps, inputs)
        )

    # A dependency that is being regenerated now: its dependents wait for the
    # new generation instead of being made from the old one and redone.
    busy = {t.instance.id for t in out.generate}
    kept = []
    for t in out.generate:
        late = sorted(i for i in t.inputs if i in busy)
        if late:
            out.waiting.append(Waiting(t.instance, f"{t.reason}: waiting for dependency {late[0]}"))
        else:
            kept.append(t)
    out.generate[:] = kept
    out.remove.extend(sorted(set(installed) - held_here))
    return out


def _reason(
    doc: dict,
    inst: SecretInstance,
    spec: Mapping,
    current: Current | None,
    keys: Mapping[str, tuple[bytes, bytes]],
    admins: tuple[bytes, ...],
    rotate_requests: Mapping[str, Sequence[SignedRecord]],
    now: int,
    cur: Callable[[SecretInstance], Current | None],
    verify: bool,
) -> str | None:
    if current is None:
        return "first"
    body = current.body
    if set(body.recipients) != {nk for nk, _ in keys.values()} or tuple(body.admins) != admins:
        return "recipients"
    if spec["rotate_days"] and body.created + spec["rotate_days"] * DAY <= now:
        return "due"
    if _requested(doc, rotate_requests.get(inst.id, ()), body, now, verify):
        return "requested"
    for dep_id, gen in body.inputs.items():
        try:
            dinst = parse_instance_id(dep_id, doc)
        except WireError:
            continue
        if dinst.service != inst.service or dinst.secret not in spec["depends"]:
            continue
        dcur = cur(dinst)
        if dcur is not None and dcur.body.generation != gen:
            return "dependency"
    return None


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    """One row of `clanctl secrets list/status`: what every node can see of an instance."""

    instance: SecretInstance
    holders: tuple[str, ...]
    generator: str | None  # the online holder that would generate it now
    generation: int | None  # the current generation, None before the first
    created: int | None
    origin: bytes | None
    due: int | None  # when the next scheduled rotation is due, None if never
    pending: str | None  # the reason a new generation is needed now, if any
    public: Mapping[str, bytes]


def status(
    doc: dict,
    online: Iterable[str],
    records: Mapping[str, Sequence[SignedRecord]],
    rotate_requests: Mapping[str, Sequence[SignedRecord]],
    now: int,
    *,
    verify: bool = True,
) -> list[InstanceStatus]:
    """Every instance of the doc with its current generation (no decryption), sorted."""
    online_set = set(online)
    admins = tuple(sorted(set(doc["clan"].get("admins", ()))))
    currents: dict[str, Current | None] = {}

    def cur(inst: SecretInstance) -> Current | None:
        if inst.id not in currents:
            currents[inst.id] = current_of(doc, inst, records.get(inst.id, ()), verify=verify)
        return currents[inst.id]

    rows = []
    for inst in instances(doc):
        keys = holder_keys(doc, inst)
        spec = secret_spec(doc, inst.service, inst.secret)
        assert spec is not None
        current = cur(inst)
        chosen = generator_for(inst.id, [(m, k[0]) for m, k in keys.items() if m in online_set])
        pending = _reason(doc, inst, spec, current, keys, admins, rotate_requests, now, cur, verify)
        body = current.body if current else None
        rows.append(
            InstanceStatus(
                instance=inst,
                holders=tuple(sorted(keys)),
                generator=chosen,
                generation=body.generation if body else None,
                created=body.created if body else None,
                origin=current.record.origin if current else None,
                due=body.created + spec["rotate_days"] * DAY
                if body and spec["rotate_days"]
                else None,
                pending=pending,
                public=dict(body.public) if body else {},
            )
        )
    return rows
