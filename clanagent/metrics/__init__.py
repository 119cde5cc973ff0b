"""Prometheus metrics of the agent.

Owns: the collector over the parts' own counters (`collector.py`), the
read-level `metrics` control method (`api.py`, `clanctl metrics`) and the
optional HTTP listener of `[metrics] listen` (`http.py`).
Must never: change what it reports on, or serve anything but reads.
"""

from typing import Any

from .api import MetricsApi, register
from .sources import MetricsSources


def __getattr__(name: str) -> Any:
    # prometheus-client and h11 load only when a scrape or the listener needs them
    if name in ("AgentCollector", "render"):
        from . import collector

        return getattr(collector, name)
    if name == "MetricsListener":
        from .http import MetricsListener

        return MetricsListener
    raise AttributeError(name)


__all__ = [
    "AgentCollector",
    "MetricsApi",
    "MetricsListener",
    "MetricsSources",
    "register",
    "render",
]
