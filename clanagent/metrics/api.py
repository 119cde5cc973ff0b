"""The metrics part's control method: `metrics`, the Prometheus exposition.

Owns: `MetricsApi` (the registry over the agent's collector and one scrape,
shared by the control method and the HTTP listener) and registering the
read-level `metrics` method into the one ApiTable.
Must never: collect anything itself (the collector reads the parts), or
offer the method to the web console (Prometheus and clanctl are its readers).
"""

from __future__ import annotations

from typing import Any

from ..control.api import ApiTable, handler
from ..control.protocol import ControlError, ErrorCode
from .collector import MetricsSources, registry, render

__all__ = ["FORMATS", "MetricsApi", "register"]

FORMATS = ("text", "openmetrics")


class MetricsApi:
    def __init__(self, sources: MetricsSources) -> None:
        self.sources = sources
        self.registry = registry(sources)

    def scrape(self, openmetrics: bool = False) -> tuple[bytes, str]:
        """(exposition bytes, content type) of one scrape, on the event loop
        (the collector reads memory only)."""
        return render(self.registry, openmetrics=openmetrics)


def register(table: ApiTable, api: MetricsApi) -> None:
    async def metrics(params: dict[str, Any]) -> Any:
        fmt = params.get("format", "text")
        if fmt not in FORMATS:
            raise ControlError(
                ErrorCode.INVALID_PARAMS, f"parameter 'format' must be one of {', '.join(FORMATS)}"
            )
        body, ctype = api.scrape(fmt == "openmetrics")
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
