"""The services service: the trio shell that wires exports into consumers.

Owns: publishing this machine's exports (one signed record per role it
holds that declares exports), collecting every machine's exports from the
store, rendering what this machine imports into files under the runtime
dir, and running a service's reload command when its imports changed.
Must never: block the event loop (file writes run in a thread), let a
failing reload command stop anything else (it is logged and retried on the
next change), or reach past its ports (DESIGN rule 7): it hears of export
records and inventory changes through `Ports` subscriptions.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from .._log import kv
from ..inventory.select import roles_of
from ..wire import SignedRecord
from .render import render_imports, run_reload
from .wiring import (
    EXPORT_KIND,
    collect_exports,
    export_body,
    export_key,
    export_report,
    reload_command,
    resolve_imports,
    services_view,
)

if TYPE_CHECKING:
    from ..ports import Ports

__all__ = ["ServicesService"]

log = logging.getLogger("clanagent.services")


class ServicesService:
    """The service-wiring part; `runtime_dir` holds the rendered imports and
    (under public/) the public secret files that exports may name."""

    def __init__(
        self,
        ports: Ports,
        *,
        runtime_dir: str | Path,
        run_sync: Callable[..., Awaitable[Any]] = trio.to_thread.run_sync,
    ) -> None:
        # `run_sync`: where rendering and reloads run (a worker thread; the
        # simulator runs them inline, see SecretsService)
        self.ports = ports
        self._run_sync = run_sync
        self.runtime = Path(runtime_dir)
        self._wakeup = trio.Event()
        self._published: dict[str, dict[str, Any]] = {}
        self.missing: dict[str, dict[str, str]] = {}
        self.stats = {"renders": 0, "reloads": 0, "reload_failures": 0}
        ports.bus.subscribe((EXPORT_KIND,), self._on_record)
        ports.inventory.subscribe(self._on_inventory)

    def wake(self) -> None:
        self._wakeup.set()

    def _on_record(self, _rec: SignedRecord) -> None:
        self.wake()

    def _on_inventory(self, _inv: Any) -> None:
        self.wake()

    def _exports(self) -> dict:
        inv = self.ports.inventory.inventory
        if inv is None:
            return {}
        recs = [(r.origin, r.key, r.body) for r in self.ports.store.of_kind(EXPORT_KIND)]
        exports, rejected = collect_exports(inv.doc, recs)
        for why in rejected:
            log.debug("export ignored", extra=kv(reason=why))
        return exports

    def view(self) -> list[dict[str, Any]]:
        inv = self.ports.inventory.inventory
        if inv is None:
            return []
        return services_view(inv.doc, self._exports())

    def _public_file(self, service: str):
        def read(secret: str, file: str) -> bytes | None:
            path = self.runtime / "public" / service / secret / file
            try:
                return path.read_bytes()
            except OSError:
                return None

        return read

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started(self)
        while True:
            try:
                await self.sync_once()
            except Exception as exc:  # the next change or tick tries again
                log.warning("service wiring failed", extra=kv(error=exc))
            with trio.move_on_after(30):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            await trio.sleep(0.05)

    async def sync_once(self) -> None:
        ports = self.ports
        inv = ports.inventory.inventory
        me = ports.me()
        if inv is None or me is None:
            return
        doc = inv.doc
        ident = ports.identity
        overlay = ""
        anchor = ports.inventory.anchor
        if anchor is not None:
            from ..mesh.overlay import overlay_ip6

            overlay = str(overlay_ip6(anchor.clan_id, ident.public_key))
        # 1. what we export
        for service, role in roles_of(doc, me):
            if not doc["services"][service]["roles"][role].get("exports"):
                continue
            values, missing = export_report(
                doc,
                service,
                role,
                me,
                overlay=overlay,
                node_key_hex=ident.public_key.hex(),
                public_file=self._public_file(service),
            )
            key = export_key(service, role)
            self.missing[key] = dict(missing)
            body = export_body(service, role, me, values)
            if self._published.get(key) != body:
                held = ports.store.get(ident.public_key, EXPORT_KIND, key)
                if held is None or held.body != body:
                    await ports.bus.publish(EXPORT_KIND, key, body)
                self._published[key] = body
        # 2. what we import
        rendered = resolve_imports(doc, me, self._exports())
        result = await self._run_sync(render_imports, self.runtime, rendered)
        self.stats["renders"] += 1
        for service in result.changed:
            command = reload_command(doc, service)
            if not command:
                continue
            ok, message = await run_reload(command)
            self.stats["reloads"] += 1
            if ok:
                log.info("service reloaded", extra=kv(service=service))
            else:
                self.stats["reload_failures"] += 1
                log.warning("reload failed", extra=kv(service=service, reason=message))
            ports.events.publish("service.imports", service=service, reloaded=ok)
