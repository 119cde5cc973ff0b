"""The metrics part's control method: `metrics`, the Prometheus exposition.

Owns: `MetricsApi` (the agent's collector, the process's, and one scrape:
read on the event loop, built and formatted in a worker thread; shared by
the control method and the HTTP listener) and registering the read-level
`metrics` method into the one ApiTable.
Must never: collect anything itself (the collector reads the parts), or
offer the method to the web console (Prometheus and clanctl are its readers).
"""

from __future__ import annotations

from typing import Any

import trio

from ..control.api import ApiTable, handler
from ..control.protocol import ControlError, ErrorCode
from .sources import MetricsSources

__all__ = ["FORMATS", "MetricsApi", "register"]

FORMATS = ("text", "openmetrics")


# Scrapes formatting at once in worker threads (the listener caps connections too).
FORMATTERS = 2


class MetricsApi:
    def __init__(self, sources: MetricsSources) -> None:
        self.sources = sources
        self._collector: Any = None  # built at the first scrape (prometheus-client loads then)
        self._process: Any = None
        self._formatters = trio.CapacityLimiter(FORMATTERS)

    @property
    def collector(self) -> Any:
        if self._collector is None:
            from .collector import AgentCollector, process_collector

            self._collector = AgentCollector(self.sources)
            self._process = process_collector()
        return self._collector

    def _snapshot(self) -> Any:
        from .collector import Snapshot

        return Snapshot(self.collector.read(), self._process)

    def scrape(self, openmetrics: bool = False) -> tuple[bytes, str]:
        """(exposition bytes, content type) of one scrape, all of it here."""
        from .collector import render

        return render(self._snapshot(), openmetrics=openmetrics)

    async def scrape_async(self, openmetrics: bool = False) -> tuple[bytes, str]:
        """One scrape: collected on the event loop (the parts' state lives
        there), built and formatted in a worker thread (for 1000 machines
        most of the time goes there: it must not stall the loop)."""
        from .collector import render

        snap = self._snapshot()
        return await trio.to_thread.run_sync(
            lambda: render(snap, openmetrics=openmetrics), limiter=self._formatters
        )


def register(table: ApiTable, api: MetricsApi) -> None:
    async def metrics(params: dict[str, Any]) -> Any:
        fmt = params.get("format", "text")
        if fmt not in FORMATS:
            raise ControlError(
                ErrorCode.INVALID_PARAMS, f"parameter 'format' must be one of {', '.join(FORMATS)}"
            )
        body, ctype = await api.scrape_async(fmt == "openmetrics")
        return {"content_type": ctype, "text": body.decode("utf-8")}

    table.add(
        handler(
            "metrics",
            "read",
            metrics,
            "Prometheus metrics of this agent (format: text or openmetrics)",
            params=("format",),
            surfaces=("socket",),
        )
    )
