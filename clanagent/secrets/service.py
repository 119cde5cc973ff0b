"""The secrets service: the trio shell around the secrets planner.

Owns: feeding the planner (inventory, who is online, secret records and
rotate requests from the store), running generators in worker threads,
publishing new generations as records, writing the files we hold, running
the service's reload command when they changed, and expiring previous
generations after the grace period.  Must never: block the event loop,
log or publish a secret value in the clear, replace the current
generation when a generator fails (the error is logged and shown in status),
or reach past its ports (DESIGN rule 7): it hears of records, membership
and inventory changes through `Ports` subscriptions, and tells others that
public files changed only through the callback it was given.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._log import kv
from ..identity import node_id_of
from ..wire import SignedRecord, WireError
from . import files
from .generators import GeneratorError, generate
from .model import parse_instance_id, secret_spec
from .planner import current_of, plan, status
from .record import (
    ROTATE_KIND,
    SECRET_KIND,
    RotateRequest,
    open_body,
    secret_body,
)

if TYPE_CHECKING:
    from ..ports import Ports

__all__ = ["SecretsService"]

log = logging.getLogger("clanagent.secrets")

TICK = 10.0  # rotations fall due and previous generations expire on this clock
SETTLE = 1.5  # seconds of stable membership before generating
# An installed generation is not opened and written again each round: only
# when its record changes, or this often (files damaged by hand are repaired).
REVERIFY = 300.0


class SecretsService:
    """The secrets part. `runtime_dir` holds the files; `default_owner` is
    who owns them when a service names no `secrets_owner` (None: the
    agent's user); `on_public_files_changed()` is called after a round
    installed new files (public parts may feed exports)."""

    def __init__(
        self,
        ports: Ports,
        *,
        runtime_dir: str | Path,
        default_owner: str | None = None,
        on_public_files_changed: Callable[[], None] | None = None,
        run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
    ) -> None:
        # `run_sync`: where file and generator work runs (a worker thread;
        # the simulator runs it inline so its virtual clock never jumps
        # while a thread works)
        self.ports = ports
        self._run_sync = run_sync
        self.runtime = Path(runtime_dir)
        self.default_owner = default_owner
        self._on_public_files_changed = on_public_files_changed
        self._wakeup = trio.Event()
        self._soon = False
        self._membership_changed_at = ports.clock.now()
        # A member change asks for one round when SETTLE has passed (trio
        # time), not one at once: see member_changed.
        self._member_due: float | None = None
        self._wait: trio.CancelScope | None = None  # the run loop's wait between rounds
        self.errors: dict[str, str] = {}  # instance id -> last generator error
        self.stats = {"generated": 0, "installed": 0, "verified": 0, "removed": 0, "failed": 0}
        # machine name -> node id, for the inventory doc it was computed from
        # (a doc is never changed in place: a new version is a new doc)
        self._ids_doc: Any = None
        self._ids: dict[str, str] = {}
        # instance id -> (origin, version) of the record whose files we wrote, and when
        self._written: dict[str, tuple[tuple[bytes, int], float]] = {}
        ports.bus.subscribe((SECRET_KIND, ROTATE_KIND), self._on_record)
        ports.members.subscribe(self.member_changed)
        ports.inventory.subscribe(self._on_inventory)

    def wake(self) -> None:
        self._wakeup.set()

    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    def wake_later(self) -> None:
        self._soon = True

    def member_changed(self) -> None:
        """Who is online decides only who generates, and that waits until the
        membership has been still for SETTLE: so a change asks for one round
        SETTLE from now, not one at once. (A round lists every member: under
        churn in a clan of 1000, a round per change was O(N) many times a
        second on every machine.)"""
        self._membership_changed_at = self.ports.clock.now()
        try:
            due = trio.current_time() + SETTLE
        except RuntimeError:  # outside trio (a test's setup): the next round sees it
            return
        if self._member_due is None or due < self._member_due:
            self._member_due = due
        if self._wait is not None:
            self._wait.deadline = min(self._wait.deadline, self._member_due)

    def _on_record(self, _rec: SignedRecord) -> None:
        self.wake()

    def _on_inventory(self, _inv: Any) -> None:
        self.wake()

    def _synced(self, doc: dict, me: str) -> bool:
        """Have we caught up with the clan's records since we started?

        A machine that just started may be the chosen generator before the
        current generation made by someone else has reached it; generating
        then would make a second generation for nothing.  Alone, there is
        nothing to wait for; otherwise wait until the records of one
        anti-entropy exchange (every record the peer holds) are stored."""
        if self._online(doc) == [me]:
            return True
        # Who is online decides who generates: let a change settle first, so
        # two machines that see different memberships for a moment do not
        # both decide it is their turn.
        if self.ports.clock.now() - self._membership_changed_at < SETTLE:
            return False
        return self.ports.members.synced()

    # -- inputs -----------------------------------------------------------------

    def _me(self) -> str | None:
        return self.ports.me()

    def _node_ids(self, doc: dict) -> dict[str, str]:
        """machine name -> node id: hashed once per inventory, not once per round."""
        if self._ids_doc is not doc:
            self._ids = {name: node_id_of(m["node_key"]) for name, m in doc["machines"].items()}
            self._ids_doc = doc
        return self._ids

    def _online(self, doc: dict) -> list[str]:
        me = self._me()
        state = self.ports.members.state
        return [
            name for name, nid in self._node_ids(doc).items() if name == me or state(nid) == "alive"
        ]

    def _records(self) -> tuple[dict, dict]:
        secrets: dict[str, list[SignedRecord]] = defaultdict(list)
        rotates: dict[str, list[SignedRecord]] = defaultdict(list)
        for rec in self.ports.store.of_kind(SECRET_KIND):
            secrets[rec.key].append(rec)
        for rec in self.ports.store.of_kind(ROTATE_KIND):
            rotates[rec.key].append(rec)
        return secrets, rotates

    def _opens(self, body: Any) -> Any:
        ident = self.ports.identity
        return open_body(body, ident.public_key, ident.box_key)

    # -- views for the control API ---------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        inv = self.ports.inventory.inventory
        if inv is None:
            return []
        secrets, rotates = self._records()
        now = int(self.ports.clock.wall())
        out = []
        for st in status(inv.doc, self._online(inv.doc), secrets, rotates, now, verify=False):
            inst = st.instance
            holders_now = set(st.holders)
            current = current_of(inv.doc, inst, secrets.get(inst.id, ()), verify=False)
            recipients = []
            if current is not None:
                keys = {m["node_key"]: name for name, m in inv.doc["machines"].items()}
                recipients = sorted(keys.get(k, k.hex()[:12]) for k in current.body.recipients)
            out.append(
                {
                    "id": inst.id,
                    "service": inst.service,
                    "secret": inst.secret,
                    "holders": list(st.holders),
                    "generator": st.generator,
                    "generation": st.generation,
                    "created": st.created,
                    "age_s": None if st.created is None else max(0, now - st.created),
                    "next_rotation": st.due,
                    "pending": st.pending,
                    "recipients": recipients,
                    "held_by_current": sorted(holders_now & set(recipients)),
                    "public": {k: v for k, v in st.public.items()},
                    "error": self.errors.get(inst.id),
                }
            )
        return out

    async def request_rotation(self, instance_id: str) -> dict[str, Any]:
        inv = self.ports.inventory.inventory
        if inv is None:
            raise KeyError("not in a clan")
        try:
            inst = parse_instance_id(instance_id, inv.doc)
        except WireError as exc:
            raise KeyError(exc.reason) from None
        if secret_spec(inv.doc, inst.service, inst.secret) is None:
            raise KeyError(f"no secret {instance_id} in the inventory")
        secrets, _ = self._records()
        current = current_of(inv.doc, inst, secrets.get(inst.id, ()), verify=False)
        generation = current.body.generation if current is not None else 0
        body = RotateRequest(generation=generation, requested=int(self.ports.clock.wall()))
        await self.ports.bus.publish(ROTATE_KIND, inst.id, body.to_wire())
        self.wake()
        return {"id": inst.id, "generation": generation}

    # -- running ----------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        while True:
            self._member_due = None  # this round sees every change so far
            try:
                await self.sync_once()
            except Exception as exc:  # never fatal; the next round retries
                log.warning("secrets round failed", extra=kv(error=exc))
            deadline = trio.current_time() + (0.5 if self._soon else TICK)
            self._soon = False
            if self._member_due is not None:
                deadline = min(deadline, self._member_due)
            with trio.CancelScope(deadline=deadline) as self._wait:
                await self._wakeup.wait()
            self._wait = None
            self._wakeup = trio.Event()
            await trio.sleep(0.05)

    async def sync_once(self) -> None:
        inv = self.ports.inventory.inventory
        me = self._me()
        if inv is None or me is None:
            return
        doc = inv.doc
        now = int(self.ports.clock.wall())
        secrets, rotates = self._records()
        installed = await self._run_sync(files.installed, self.runtime)
        p = plan(
            doc,
            me,
            self._online(doc),
            secrets,
            rotates,
            now,
            installed=installed,
            opens=self._opens,
        )
        if p.generate and not self._synced(doc, me):
            p.generate.clear()  # see _synced: wait for what the clan already made
            self.wake_later()
        for task in p.generate:
            await self._generate(doc, task, secrets)
        changed_services: set[str] = set()
        mono = self.ports.clock.now()
        for item in p.install:
            rid = (item.record.origin, item.record.version)
            written = self._written.get(item.instance.id)
            if written is not None and written[0] == rid and mono - written[1] < REVERIFY:
                continue  # installed already: no decryption, no writes, no fsyncs
            try:
                opened = self._opens(item.body)
            except WireError as exc:
                log.warning(
                    "secret record does not open",
                    extra=kv(secret=item.instance.id, reason=exc.reason),
                )
                continue
            if opened is None:
                continue
            owner = self._owner(doc, item.instance.service)
            changed = await self._run_sync(
                lambda item=item, opened=opened, owner=owner: files.install(
                    self.runtime,
                    item.instance.service,
                    item.instance.secret,
                    item.body.generation,
                    opened,
                    dict(item.body.public),
                    now,
                    owner=owner,
                )
            )
            self._written[item.instance.id] = (rid, mono)
            self.stats["verified"] += 1
            if changed:
                self.stats["installed"] += 1
                changed_services.add(item.instance.service)
                log.info(
                    "secret installed",
                    extra=kv(secret=item.instance.id, generation=item.body.generation),
                )
        held = {item.instance.id for item in p.install}
        for iid in [i for i in self._written if i not in held]:
            del self._written[iid]
        for service, secret in p.remove:
            if await self._run_sync(files.remove, self.runtime, service, secret):
                self.stats["removed"] += 1
                log.info("secret removed", extra=kv(secret=f"{service}/{secret}"))
        await self._run_sync(files.expire_previous, self.runtime, now)
        if changed_services and self._on_public_files_changed is not None:
            self._on_public_files_changed()  # exports may name a public part that just appeared
        for service in sorted(changed_services):
            await self._reload(doc, service)

    def _owner(self, doc: dict, service: str) -> Any:
        """Who owns a service's secret files: the service setting `secrets_owner`
        ("USER" or "USER:GROUP"), else `default_owner` (the agent's config), else
        the agent's user.  An unknown user is logged and the default used."""
        spec = (
            doc["services"].get(service, {}).get("settings", {}).get("secrets_owner")
            or self.default_owner
        )
        try:
            return files.resolve_owner(spec or None)
        except Exception as exc:
            log.warning(
                "unknown secrets owner; files stay the agent's",
                extra=kv(service=service, owner=spec, error=exc),
            )
            return None

    async def _generate(self, doc: dict, task: Any, secrets: dict) -> None:
        inst = task.instance
        spec = secret_spec(doc, inst.service, inst.secret)
        inputs: dict[str, dict[str, bytes]] = {}
        for dep_name, dep_inst in task.deps.items():
            cur = current_of(doc, dep_inst, secrets.get(dep_inst.id, ()), opens=self._opens)
            try:
                opened = self._opens(cur.body) if cur is not None else None
            except WireError:
                opened = None
            if opened is None:
                return  # the planner waits on this too; try next round
            inputs[dep_name] = {**dict(cur.body.public), **opened}
        try:
            made = await self._run_sync(generate, spec, inputs)
        except GeneratorError as exc:
            self.stats["failed"] += 1
            self.errors[inst.id] = str(exc)
            log.error(
                "secret generator failed; the previous generation stays",
                extra=kv(secret=inst.id, error=exc),
            )
            return
        self.errors.pop(inst.id, None)
        # Someone may have made this generation while ours was being made.
        secrets_now, _ = self._records()
        cur = current_of(doc, inst, secrets_now.get(inst.id, ()), verify=False)
        if cur is not None and cur.body.generation >= task.generation:
            log.info(
                "secret made elsewhere meanwhile; ours is dropped",
                extra=kv(secret=inst.id, generation=task.generation),
            )
            return
        body = secret_body(
            inst,
            task.generation,
            int(self.ports.clock.wall()),
            made.secret,
            made.public,
            task.recipients,
            task.admins,
            task.inputs,
        )
        await self.ports.bus.publish(SECRET_KIND, inst.id, body)
        self.stats["generated"] += 1
        log.info(
            "secret generated",
            extra=kv(secret=inst.id, generation=task.generation, reason=task.reason),
        )
        self.ports.events.publish(
            "secret.generated", id=inst.id, generation=task.generation, reason=task.reason
        )
        self.wake()  # install it here too

    async def _reload(self, doc: dict, service: str) -> None:
        from ..services.render import run_reload

        command = doc["services"].get(service, {}).get("reload", "")
        if not command:
            return
        ok, message = await run_reload(command)
        if not ok:
            log.warning(
                "reload after a secret change failed", extra=kv(service=service, reason=message)
            )
