"""Telemetry: OpenTelemetry tracing of every publish and handler call (SPEC §6).

Used by the runtime and the patterns; imports neither.
"""

from runner.telemetry.tracing import TRACES_SETTINGS, Tracing, redacting_attributes

__all__ = ["TRACES_SETTINGS", "Tracing", "redacting_attributes"]
