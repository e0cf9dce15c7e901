"""The span shapes of SPEC §6: a PRODUCER span per publish, a CONSUMER span per handler call, joined
by W3C `traceparent` in message headers, on a private tracer provider."""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from runner.redact import redact_text
from runner.telemetry.exporters import EXPORT_TIMEOUT_S, DeadlineExporter, make_exporter

TRACES_SETTINGS = ("none", "console", "otlp", "file")
_MAX_QUEUE = 65_536
_BATCH = 2_048

# Shared by every disabled call: tracing off must cost one attribute check and nothing else.
_NOOP: AbstractContextManager[None] = nullcontext()
# An empty context has no current span, so a span started in it is the root of a new trace.
_NEW_TRACE = Context()
_SHUTDOWN_BUDGET_S = EXPORT_TIMEOUT_S + 1.0
# Short enough that `edarun traces` on a running pipeline sees recent spans.
_SCHEDULE_DELAY_MS = 1000


class _HeaderGetter(Getter[Mapping[str, object]]):
    """Reads trace headers whether the broker hands them back as str or bytes."""

    def get(self, carrier: Mapping[str, object], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            # A producer outside edarun may capitalise the header; only pay for the scan on a miss.
            value = next((v for k, v in carrier.items() if str(k).lower() == key), None)
            if value is None:
                return None
        if isinstance(value, bytes | bytearray | memoryview):
            return [bytes(value).decode("latin-1")]
        return [str(value)]

    def keys(self, carrier: Mapping[str, object]) -> list[str]:
        return [str(key) for key in carrier]


_HEADER_GETTER = _HeaderGetter()


def _safe_str(value: str) -> str:
    # Credentials in a URL always sit before an "@"; the check keeps the common case free.
    return redact_text(value) if "@" in value else value


def _attribute_value(value: object) -> AttributeValue | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _safe_str(value)
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, bytes):
        return _safe_str(value.decode("utf-8", "replace"))
    if isinstance(value, Sequence):
        items = list(value)
        kinds = {type(item) for item in items}
        # OTel wants homogeneous arrays; anything mixed becomes strings.
        if len(kinds) == 1 and kinds <= {bool, int, float}:
            return items  # type: ignore[return-value]
        return [_safe_str(str(item)) for item in items]
    return _safe_str(str(value))


def redacting_attributes(attributes: Mapping[str, object] | None) -> dict[str, AttributeValue]:
    """Span attributes OTel accepts, every credential in a URL redacted; None values dropped."""
    if not attributes:
        return {}
    cleaned: dict[str, AttributeValue] = {}
    for key, value in attributes.items():
        safe = _attribute_value(value)
        if safe is not None:
            cleaned[key] = safe
    return cleaned


def _messaging_attributes(
    system: str,
    queue: str,
    operation: str,
    message_id: str,
    extra: Mapping[str, object] | None,
) -> dict[str, AttributeValue]:
    attributes = redacting_attributes(extra)
    attributes.update(
        {
            "messaging.system": system,
            "messaging.destination.name": queue,
            "messaging.operation.type": operation,
            "messaging.operation.name": operation,
            "messaging.message.id": _safe_str(message_id),
        }
    )
    return attributes


class Tracing:
    """Tracing for one pipeline run. `Tracing()` is the disabled instance (traces "none")."""

    enabled: bool

    def __init__(
        self,
        provider: TracerProvider | None = None,
        exporter: DeadlineExporter | None = None,
    ) -> None:
        self.enabled = provider is not None
        self._provider = provider
        self._exporter = exporter
        self._tracer = provider.get_tracer("edarun") if provider is not None else None
        # Private, so a user's global propagator configuration cannot change the wire format.
        self._propagator = TraceContextTextMapPropagator()
        self._lock = threading.Lock()

    @classmethod
    def setup(
        cls,
        traces: str,
        *,
        path: Path | None = None,
        endpoint: str = "http://127.0.0.1:4318",
        service_name: str = "edarun",
        resource: dict[str, str] | None = None,
    ) -> Tracing:
        """Start tracing as `traces` says ("none", "console", "otlp" or "file" with `path`)."""
        if traces == "none":
            return cls()
        exporter = DeadlineExporter(make_exporter(traces, path=path, endpoint=endpoint))
        attributes = redacting_attributes({**(resource or {}), "service.name": service_name})
        # Never the global provider: several pipelines may run in one process, each with its own.
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        provider.add_span_processor(
            # A deep queue: a burst of events must not drop spans while the exporter catches up.
            BatchSpanProcessor(
                exporter,
                schedule_delay_millis=_SCHEDULE_DELAY_MS,
                max_queue_size=_MAX_QUEUE,
                max_export_batch_size=_BATCH,
            )
        )
        tracing = cls(provider, exporter)
        # A run that ends without shutdown (a crash) still flushes what it traced.
        atexit.register(tracing.shutdown)
        return tracing

    def publish_span(
        self,
        queue: str,
        *,
        message_id: str,
        headers: dict[str, str],
        system: str,
        root: bool = False,
        attributes: dict[str, object] | None = None,
    ) -> AbstractContextManager[Span | None]:
        """A PRODUCER span `send {queue}` that writes `traceparent` into `headers`.

        root=True starts a new trace (a source event); otherwise the current span is the parent.
        """
        if not self.enabled:
            return _NOOP
        return self._publish(queue, message_id, headers, system, root, attributes)

    def consume_span(
        self,
        queue: str,
        *,
        message_id: str,
        headers: Mapping[str, object],
        system: str,
        attributes: dict[str, object] | None = None,
    ) -> AbstractContextManager[Span | None]:
        """A CONSUMER span `process {queue}`, child of the producer named by the headers.

        It is the current span inside the block, so publishes there continue the trace; an exception
        is recorded, sets status ERROR and propagates.
        """
        if not self.enabled:
            return _NOOP
        return self._consume(queue, message_id, headers, system, attributes)

    def event(self, name: str, attributes: dict[str, object] | None = None) -> None:
        """Add an event to the current span, if there is one being recorded."""
        if not self.enabled:
            return
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event(name, redacting_attributes(attributes))

    def decision(self, name: str, attributes: dict[str, object]) -> None:
        """A pattern decision outside any message (a supervisor scaling a consumer): a short
        INTERNAL span of its own, with the decision as attributes and as an event."""
        if not self.enabled or self._tracer is None:
            return
        clean = redacting_attributes(attributes)
        span = self._tracer.start_span(name, context=Context(), kind=SpanKind.INTERNAL, attributes=clean)
        span.add_event(name, clean)
        span.end()

    def failed(self, span: Span | None, error: BaseException, attributes: dict[str, object]) -> None:
        """Mark a handler call's span as failed when the failure is handled rather than raised
        (a retry scheduled, an event parked), with what edarun decided in `attributes`."""
        if span is None or not span.is_recording():
            return
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, redact_text(f"{type(error).__name__}: {error}")))
        span.set_attributes(redacting_attributes(attributes))

    def shutdown(self) -> None:
        """Flush and stop; idempotent, and returns within a few seconds even if a collector is down.

        It blocks the calling thread; from a running event loop use `asyncio.to_thread`.
        """
        with self._lock:
            provider, exporter = self._provider, self._exporter
            if provider is None or exporter is None:
                return
            self._provider = self._exporter = None
            self.enabled = False
        atexit.unregister(self.shutdown)
        exporter.stop_by(time.monotonic() + _SHUTDOWN_BUDGET_S)
        # The SDK's shutdown waits for its worker without a deadline we control; a daemon thread
        # lets us stop waiting and abort the exporter's retries instead.
        worker = threading.Thread(target=provider.shutdown, name="edarun-traces-shutdown", daemon=True)
        worker.start()
        worker.join(_SHUTDOWN_BUDGET_S)
        if worker.is_alive():
            exporter.shutdown()

    @contextmanager
    def _publish(
        self,
        queue: str,
        message_id: str,
        headers: dict[str, str],
        system: str,
        root: bool,
        attributes: Mapping[str, object] | None,
    ) -> Iterator[Span]:
        assert self._tracer is not None
        with self._tracer.start_as_current_span(
            f"send {queue}",
            context=_NEW_TRACE if root else None,
            kind=SpanKind.PRODUCER,
            attributes=_messaging_attributes(system, queue, "send", message_id, attributes),
        ) as span:
            self._propagator.inject(headers, context=trace.set_span_in_context(span))
            yield span

    @contextmanager
    def _consume(
        self,
        queue: str,
        message_id: str,
        headers: Mapping[str, object],
        system: str,
        attributes: Mapping[str, object] | None,
    ) -> Iterator[Span]:
        assert self._tracer is not None
        parent = self._propagator.extract(headers, getter=_HEADER_GETTER)
        # start_as_current_span records an Exception and sets ERROR before re-raising; a
        # cancellation (BaseException) during a drain ends the span without marking it failed.
        with self._tracer.start_as_current_span(
            f"process {queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=_messaging_attributes(system, queue, "process", message_id, attributes),
        ) as span:
            yield span
