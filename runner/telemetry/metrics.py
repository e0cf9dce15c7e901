"""The metrics of one run: a private meter provider whose instruments read the run's counters,
exported over OTLP/HTTP or served for Prometheus to scrape.

What the instruments read is described here as protocols (the runtime's `RunStats` fits them).
The OpenTelemetry metrics SDK and the exporters are imported only when metrics are on.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from runner.telemetry.exporters import EXPORT_TIMEOUT_S

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.sdk.metrics import MeterProvider

METRICS_SETTINGS = ("none", "otlp", "prometheus")
_SHUTDOWN_BUDGET_S = EXPORT_TIMEOUT_S + 1.0


class ConsumerCounts(Protocol):
    @property
    def processed(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def retried(self) -> int: ...
    @property
    def repaired(self) -> int: ...
    @property
    def parked(self) -> int: ...
    @property
    def restarts(self) -> int: ...
    @property
    def consumers(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def handler_seconds(self) -> float: ...
    @property
    def handler_buckets(self) -> Sequence[int]: ...


class ProducerCounts(Protocol):
    @property
    def published(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def delayed(self) -> int: ...
    @property
    def flow_controlled(self) -> bool: ...


class RunCounts(Protocol):
    @property
    def consumers(self) -> Mapping[str, ConsumerCounts]: ...
    @property
    def producers(self) -> Mapping[str, ProducerCounts]: ...
    @property
    def depth(self) -> Mapping[str, int]: ...
    @property
    def flow_state(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class MeteredRun:
    """What the metrics of one run read: its counters (read, never written) and its shape."""

    stats: RunCounts
    system: str  # messaging.system: memory | rabbitmq
    consumer_queues: Mapping[str, str]  # consumer → the queue it reads
    flow_queues: Sequence[str]  # the queues whose flow monitor this run runs
    bounds: Sequence[float]  # upper bounds (s) of the handler-duration buckets; one more holds the rest


class MetricsError(Exception):
    """Metrics cannot start as configured (the Prometheus port is taken, the host unknown)."""


class RunMetrics:
    """The metrics of one run. `RunMetrics()` is the disabled instance (metrics "none")."""

    def __init__(
        self,
        provider: MeterProvider | None = None,
        server: tuple[WSGIServer, threading.Thread] | None = None,
        url: str | None = None,
    ) -> None:
        self.enabled = provider is not None
        self.url = url  # where Prometheus scrapes, or None
        self._provider = provider
        self._server = server
        self._lock = threading.Lock()

    @classmethod
    def setup(
        cls,
        exporter: str,
        run: MeteredRun,
        *,
        endpoint: str = "http://127.0.0.1:4318",
        host: str = "127.0.0.1",
        port: int = 9464,
        every: float = 5.0,
        service_name: str = "edarun",
    ) -> RunMetrics:
        """Start metrics as `exporter` says: "none", "otlp" (to `endpoint` every `every` seconds)
        or "prometheus" (served on host:port). Raises MetricsError when the endpoint cannot listen."""
        if exporter == "none":
            return cls()
        if exporter not in METRICS_SETTINGS:
            raise ValueError(f"unknown metrics setting {exporter!r}: expected none, otlp or prometheus")
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import MetricReader
        from opentelemetry.sdk.resources import Resource
        from prometheus_client import CollectorRegistry

        from runner.telemetry.instruments import SCOPE, Instruments
        from runner.telemetry.metric_readers import OtlpReader, PrometheusReader, serve
        from runner.telemetry.tracing import redacting_attributes

        resource = Resource.create(redacting_attributes({"service.name": service_name}))
        instruments = Instruments(run)
        server, url = None, None
        reader: MetricReader
        if exporter == "otlp":
            reader = OtlpReader(endpoint, every, instruments, resource)
        else:
            registry = CollectorRegistry()  # this run's metrics only, not the process's
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                server = serve(registry, host, port)
            except OSError as exc:
                raise MetricsError(f"metrics: cannot listen on {where}: {exc.strerror or exc}") from None
            url = f"http://{where}/metrics"
            reader = PrometheusReader(registry, instruments, resource)
        # Not the global provider: several pipelines may run in one process, each with its own.
        provider = MeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
        instruments.observe_on(provider.get_meter(SCOPE))
        return cls(provider, server, url)

    def shutdown(self) -> None:
        """Export what is left (OTLP) or stop serving (Prometheus: the port is free again);
        idempotent, and returns within a few seconds even if a collector is down.

        It blocks the calling thread; from a running event loop use `asyncio.to_thread`.
        """
        with self._lock:
            provider, server = self._provider, self._server
            self._provider = self._server = None
            self.enabled = False
        if server is not None:
            httpd, thread = server
            httpd.shutdown()
            httpd.server_close()
            thread.join()
        if provider is not None:
            # The OTLP reader's last export retries until its timeout; a daemon thread lets us stop
            # waiting for a collector that is down.
            worker = threading.Thread(target=provider.shutdown, name="edarun-metrics-shutdown", daemon=True)
            worker.start()
            worker.join(_SHUTDOWN_BUDGET_S)
