"""The instruments of a run's metrics: each reads the run's counters when a reader collects, so
the counting stays where it is and metrics add nothing per event."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from runner.telemetry.metrics import MeteredRun

SCOPE = "edarun"
PROCESS_DURATION = "messaging.process.duration"  # OTel semantic conventions: seconds per handler call


# (instrument, unit, description, counter field): per consumer, attribute edarun.consumer
CONSUMER_COUNTERS = (
    ("edarun.consumer.processed", "{event}", "Handler calls that returned.", "processed"),
    ("edarun.consumer.failed", "{event}", "Handler calls that raised.", "failed"),
    ("edarun.consumer.retried", "{event}", "Failed events sent to be delivered again.", "retried"),
    ("edarun.consumer.repaired", "{event}", "Failed events repaired and resubmitted.", "repaired"),
    ("edarun.consumer.parked", "{event}", "Events parked in the dashboard.", "parked"),
    ("edarun.consumer.restarts", "{restart}", "Restarts of a consumer's workers or process.", "restarts"),
)
CONSUMER_GAUGES = (
    ("edarun.consumer.count", "{consumer}", "Consumers running now.", "consumers"),
    ("edarun.consumer.in_flight", "{event}", "Events received and not yet settled.", "in_flight"),
)
# per producer, attribute edarun.producer
PRODUCER_COUNTERS = (
    ("edarun.producer.published", "{event}", "Events published.", "published"),
    ("edarun.producer.rejected", "{event}", "Source events unreadable or without a route.", "rejected"),
    ("edarun.producer.delayed", "{event}", "Events held back by flow control.", "delayed"),
)


class Instruments:
    """The observable instruments of one run, and its handler-duration histogram."""

    def __init__(self, run: MeteredRun) -> None:
        self.run = run
        self.started_ns = time.time_ns()
        self._scope = InstrumentationScope(SCOPE)

    def observe_on(self, meter: Meter) -> None:
        """Create the observable instruments on `meter` (the histogram goes through the readers)."""
        for name, unit, description, field in CONSUMER_COUNTERS:
            meter.create_observable_counter(name, [self._consumers(field)], unit, description)
        for name, unit, description, field in CONSUMER_GAUGES:
            meter.create_observable_up_down_counter(name, [self._consumers(field)], unit, description)
        for name, unit, description, field in PRODUCER_COUNTERS:
            meter.create_observable_counter(name, [self._producers(field)], unit, description)
        meter.create_observable_up_down_counter(
            "edarun.queue.depth", [self._depth], "{message}", "Ready messages in the queue (lanes apart)."
        )
        meter.create_observable_gauge(
            "edarun.flow.state", [self._flow], "1", "Flow control of the queue: 1 slow down, 0 normal."
        )

    # Callbacks run in the reader's thread while the event loop counts on: each takes a copy of a
    # mapping (one C call under the GIL) before it iterates.

    def _consumers(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            consumers = list(self.run.stats.consumers.items())
            return [Observation(getattr(c, field), {"edarun.consumer": n}) for n, c in consumers]

        return observe

    def _producers(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            producers = list(self.run.stats.producers.items())
            # `delayed` means something only where flow control may hold a producer back.
            wanted = [(n, p) for n, p in producers if field != "delayed" or p.flow_controlled]
            return [Observation(getattr(p, field), {"edarun.producer": n}) for n, p in wanted]

        return observe

    def _depth(self, options: CallbackOptions) -> Iterable[Observation]:
        depths = list(self.run.stats.depth.items())
        return [Observation(d, {"messaging.destination.name": q}) for q, d in depths]

    def _flow(self, options: CallbackOptions) -> Iterable[Observation]:
        state = dict(self.run.stats.flow_state)
        return [
            Observation(1 if state.get(q) == "slow" else 0, {"messaging.destination.name": q})
            for q in self.run.flow_queues
        ]

    # -- the histogram ---------------------------------------------------------------------------

    def process_duration(self) -> Metric | None:
        """Handler durations as a cumulative explicit-bucket histogram, straight from the counted
        buckets: the counts, the bounds and the sum are exact (min and max are not kept)."""
        now = time.time_ns()
        points = []
        for name, stats in list(self.run.stats.consumers.items()):
            buckets = [int(count) for count in stats.handler_buckets]
            attributes = {
                "messaging.system": self.run.system,
                "messaging.operation.name": "process",
                "edarun.consumer": name,
            }
            if name in self.run.consumer_queues:
                attributes["messaging.destination.name"] = self.run.consumer_queues[name]
            points.append(
                HistogramDataPoint(
                    attributes=attributes,
                    start_time_unix_nano=self.started_ns,
                    time_unix_nano=now,
                    count=sum(buckets),
                    sum=stats.handler_seconds,
                    bucket_counts=buckets,
                    explicit_bounds=list(self.run.bounds),
                    # Optional in OTLP; None leaves them out of the export.
                    min=None,  # type: ignore[arg-type]
                    max=None,  # type: ignore[arg-type]
                )
            )
        if not points:
            return None
        return Metric(
            name=PROCESS_DURATION,
            description="Duration of handler calls (failed ones included).",
            unit="s",
            data=Histogram(data_points=points, aggregation_temporality=AggregationTemporality.CUMULATIVE),
        )

    def with_process_duration(self, data: MetricsData, resource: Resource) -> MetricsData:
        """`data` as the SDK collected it, plus the handler-duration histogram in edarun's scope.

        The SDK has no observable histogram; a reader hands every collection through here.
        """
        histogram = self.process_duration()
        if histogram is None:
            return data
        resources = list(data.resource_metrics) or [ResourceMetrics(resource, [], "")]
        first = resources[0]  # one provider, one resource
        scopes = list(first.scope_metrics)
        for index, scope in enumerate(scopes):
            if scope.scope.name == SCOPE:
                scopes[index] = ScopeMetrics(scope.scope, [*scope.metrics, histogram], scope.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(self._scope, [histogram], ""))
        resources[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
        return MetricsData(resource_metrics=resources)
