"""Prometheus metrics: a collector over the parts' counters, the `metrics`
control method, and the optional HTTP listener (`[metrics] listen`)."""

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
