"""Telemetry: OpenTelemetry tracing of every publish and handler call (SPEC §6), and the metrics of
a run, read from its counters.

Used by the runtime and the patterns; imports neither.
"""

from runner.telemetry.metrics import METRICS_SETTINGS, MeteredRun, MetricsError, RunMetrics
from runner.telemetry.tracing import TRACES_SETTINGS, Tracing, redacting_attributes

__all__ = [
    "METRICS_SETTINGS",
    "TRACES_SETTINGS",
    "MeteredRun",
    "MetricsError",
    "RunMetrics",
    "Tracing",
    "redacting_attributes",
]
