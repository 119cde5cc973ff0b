"""The services service: the trio shell that wires exports into consumers.

Owns: publishing this machine's exports (one signed record per role it
holds that declares exports), collecting every machine's exports from the
store, rendering what this machine imports into files under the runtime
dir, and running a service's reload command when its imports changed.
Must never: block the event loop (file writes run in a thread), or let a
failing reload command stop anything else (it is logged and retried on the
next change).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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

__all__ = ["ServicesService"]

log = logging.getLogger("clanagent.services")


class ServicesService:
    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.runtime = Path(agent.cfg.runtime_dir)
        self._wakeup = trio.Event()
        self._published: dict[str, dict[str, Any]] = {}
        self.missing: dict[str, dict[str, str]] = {}
        self.stats = {"renders": 0, "reloads": 0, "reload_failures": 0}

    def wake(self) -> None:
        self._wakeup.set()

    def on_record(self, rec: SignedRecord) -> None:
        if rec.kind == EXPORT_KIND:
            self.wake()

    def _me(self) -> str | None:
        inv = self.agent.inventory.inventory
        if inv is None:
            return None
        m = inv.machine_by_node_key(self.agent.identity.public_key)
        return None if m is None else m.name

    def _exports(self) -> dict:
        inv = self.agent.inventory.inventory
        if inv is None:
            return {}
        recs = [
            (r.origin, r.key, r.body) for r in self.agent.store.records() if r.kind == EXPORT_KIND
        ]
        exports, rejected = collect_exports(inv.doc, recs)
        for why in rejected:
            log.debug("export ignored", extra=kv(reason=why))
        return exports

    def view(self) -> list[dict[str, Any]]:
        inv = self.agent.inventory.inventory
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
        agent = self.agent
        inv = agent.inventory.inventory
        me = self._me()
        if inv is None or me is None:
            return
        doc = inv.doc
        overlay = ""
        if agent.anchor is not None:
            from ..mesh.overlay import overlay_ip6

            overlay = str(overlay_ip6(agent.anchor.clan_id, agent.identity.public_key))
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
                node_key_hex=agent.identity.public_key.hex(),
                public_file=self._public_file(service),
            )
            key = export_key(service, role)
            self.missing[key] = dict(missing)
            body = export_body(service, role, me, values)
            if self._published.get(key) != body:
                held = agent.store.get(agent.identity.public_key, EXPORT_KIND, key)
                if held is None or held.body != body:
                    await agent.publish_record(EXPORT_KIND, key, body)
                self._published[key] = body
        # 2. what we import
        rendered = resolve_imports(doc, me, self._exports())
        result = await trio.to_thread.run_sync(render_imports, self.runtime, rendered)
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
            agent.events_bus.publish("service.imports", service=service, reloaded=ok)
