"""Prometheus metrics of the agent.

Owns: the collector over the parts' own counters (`collector.py`), the
read-level `metrics` control method (`api.py`, `clanctl metrics`) and the
optional HTTP listener of `[metrics] listen` (`http.py`).
Must never: change what it reports on, or serve anything but reads.
"""

from .api import MetricsApi, register
from .collector import AgentCollector, MetricsSources, render
from .http import MetricsListener

__all__ = [
    "AgentCollector",
    "MetricsApi",
    "MetricsListener",
    "MetricsSources",
    "register",
    "render",
]
