"""Where a run's metrics go: an OTLP/HTTP export every few seconds, or an HTTP endpoint that
Prometheus scrapes. Each reader adds the handler-duration histogram to what the SDK collected."""

from __future__ import annotations

import threading
from typing import Any
from wsgiref.simple_server import WSGIServer

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics.export import MetricsData, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, start_http_server

from runner.telemetry.exporters import EXPORT_TIMEOUT_S
from runner.telemetry.instruments import Instruments


class _WithProcessDuration:
    """Mixed into a reader (before the SDK's class): it adds the handler-duration histogram, built
    from the run's bucket counts, to what the SDK collected, before the reader exports it."""

    _extra: tuple[Instruments, Resource]

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        instruments, resource = self._extra
        data = instruments.with_process_duration(metrics_data, resource)
        super()._receive_metrics(data, timeout_millis, **kwargs)  # type: ignore[misc]  # the reader's


class PrometheusReader(_WithProcessDuration, PrometheusMetricReader):
    """Collects on each scrape of `registry`."""

    def __init__(self, registry: CollectorRegistry, instruments: Instruments, resource: Resource) -> None:
        self._extra = (instruments, resource)
        # One scope, edarun's: otel_scope_* labels on every series would say nothing.
        super().__init__(registry=registry, scope_info_enabled=False)


class OtlpReader(_WithProcessDuration, PeriodicExportingMetricReader):
    """Collects every `every` seconds and POSTs OTLP/HTTP protobuf to `{endpoint}/v1/metrics`."""

    def __init__(self, endpoint: str, every: float, instruments: Instruments, resource: Resource) -> None:
        self._extra = (instruments, resource)
        exporter = OTLPMetricExporter(endpoint=f"{endpoint.rstrip('/')}/v1/metrics", timeout=EXPORT_TIMEOUT_S)
        super().__init__(
            exporter, export_interval_millis=every * 1000, export_timeout_millis=EXPORT_TIMEOUT_S * 1000
        )


def serve(registry: CollectorRegistry, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` on http://host:port/metrics from a daemon thread. Raises OSError."""
    return start_http_server(port, addr=host, registry=registry)
