"""Metrics of a run (`telemetry.metrics`): the instruments read from the run's counters, served
for Prometheus by `up` (one endpoint, a multi-process run's counts merged) or sent over OTLP."""

from __future__ import annotations

import asyncio
import gzip
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import AMQP_URL, amqp_available, delete_queues
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.sdk.metrics.export import MetricsData
from opentelemetry.sdk.resources import Resource
from prometheus_client.parser import text_string_to_metric_families

from runner.runtime.stats import HANDLER_BUCKETS_S, ConsumerStats, ProducerStats, RunStats
from runner.telemetry import MeteredRun, MetricsError, RunMetrics
from runner.telemetry.instruments import Instruments

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# A sync handler that holds the event with id 2 until the test lets it go: the run is then
# certainly running, with two events processed, one in flight and the rest ready in the queue.
HOLDING = """
import threading

release = threading.Event()


def handle(event, ctx):
    if event["id"] == 2:
        release.wait(30)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether a server could listen on the port now (as `up`'s does: with SO_REUSEADDR, so the
    closed connections of earlier scrapes waiting out TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of the one sample `name` whose labels include `labels`, or None."""
    found = [v for (n, have), v in samples.items() if n == name and set(labels.items()) <= have]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


async def scrape_until(port: int, ready: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
    """Scrape until `ready(samples)` holds; the last scrape when it never does."""
    deadline = time.monotonic() + timeout
    samples: Samples = {}
    while time.monotonic() < deadline:
        try:
            samples = await asyncio.to_thread(scrape, port)
        except OSError:
            samples = {}  # not listening yet
        if samples and ready(samples):
            break
        await asyncio.sleep(0.1)
    return samples


def metered_pipeline(  # type: ignore[no-untyped-def]
    factory,
    jsonl,
    queue: str,
    metrics: str,
    events: int = 6,
    endpoint: str = "http://127.0.0.1:4318",
    flow_control: bool = True,
) -> tuple[Path, str]:
    """A producer of `events` events and a consumer `work` that holds the one with id 2; its queue
    is flow-controlled (so there is a flow state and a `delayed` count to see)."""
    jsonl("events.jsonl", [{"id": i} for i in range(events)])
    queues = f"queues: {{{queue}: {{flow_control: upper 1000}}}}" if flow_control else ""
    mod = factory.module("holding", HOLDING)
    path = factory.pipeline(
        f"""
        version: 1
        name: metered
        plugins: [plugins]
        telemetry:
          metrics: {metrics}
          endpoint: {endpoint}
        {queues}
        producers:
          feed: {{source: file(events.jsonl), to: {queue}}}
        consumers:
          work: {{from: {queue}, handler: "{mod}:handle", prefetch: 1}}
        """
    )
    return path, mod


# -- the instruments, on counters made up here ------------------------------------------------


def made_up_run() -> MeteredRun:
    stats = RunStats("p")
    work = stats.consumers["work"] = ConsumerStats(processed=3, failed=1)
    for seconds in (0.0001, 0.003, 0.2, 20.0):  # the last one above every bound
        work.timed(seconds)
    stats.producers["feed"] = ProducerStats(published=4)
    return MeteredRun(stats, "memory", {"work": "orders"}, [], HANDLER_BUCKETS_S)


def test_the_handler_duration_histogram_is_the_counted_buckets_exactly() -> None:
    run = made_up_run()
    data = Instruments(run).with_process_duration(MetricsData(resource_metrics=[]), Resource.create())
    (metric,) = data.resource_metrics[0].scope_metrics[0].metrics
    assert (metric.name, metric.unit) == ("messaging.process.duration", "s")
    (point,) = metric.data.data_points
    work = run.stats.consumers["work"]
    assert list(point.explicit_bounds) == list(HANDLER_BUCKETS_S)
    assert list(point.bucket_counts) == work.handler_buckets
    assert point.count == 4 and point.sum == pytest.approx(20.2031)
    assert point.attributes["edarun.consumer"] == "work"
    assert point.attributes["messaging.destination.name"] == "orders"
    assert point.attributes["messaging.operation.name"] == "process"


def test_a_taken_port_is_one_clear_error() -> None:
    port = free_port()
    first = RunMetrics.setup("prometheus", made_up_run(), port=port)
    try:
        with pytest.raises(MetricsError, match=rf"^metrics: cannot listen on 127\.0\.0\.1:{port}: "):
            RunMetrics.setup("prometheus", made_up_run(), port=port)
    finally:
        first.shutdown()
    assert port_is_free(port)
    RunMetrics.setup("prometheus", made_up_run(), port=port).shutdown()  # the port is free again


# -- Prometheus, while a run runs -------------------------------------------------------------


async def test_prometheus_endpoint_while_a_run_runs(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline, broker_url, queue_name
) -> None:
    port = free_port()
    path, mod = metered_pipeline(factory, jsonl, queue_name, f"prometheus({port})")
    release = factory.imported(mod).release

    def held(samples: Samples) -> bool:
        return (
            value(samples, "edarun_consumer_processed_total", edarun_consumer="work") == 2
            and value(samples, "edarun_queue_depth", messaging_destination_name=queue_name) == 3
        )

    run = asyncio.ensure_future(run_pipeline(path))
    try:
        samples = await scrape_until(port, held)
    finally:
        release.set()
    code, _ = await run
    assert code == 0
    assert held(samples), samples
    system = "memory" if broker_url == "memory" else "rabbitmq"
    consumer = {"edarun_consumer": "work"}
    assert value(samples, "edarun_consumer_count", **consumer) == 1
    assert value(samples, "edarun_consumer_in_flight", **consumer) == 1
    assert value(samples, "edarun_consumer_failed_total", **consumer) == 0
    assert value(samples, "edarun_producer_published_total", edarun_producer="feed") == 6
    assert value(samples, "edarun_producer_delayed_total", edarun_producer="feed") == 0
    assert value(samples, "edarun_flow_state", messaging_destination_name=queue_name) == 0
    duration = {**consumer, "messaging_destination_name": queue_name, "messaging_system": system}
    assert value(samples, "messaging_process_duration_seconds_count", **duration) == 2
    assert value(samples, "messaging_process_duration_seconds_bucket", le="+Inf", **duration) == 2
    bounds = {dict(have)["le"] for name, have in samples if name.endswith("_bucket")}
    assert bounds == {*(str(b) for b in HANDLER_BUCKETS_S), "+Inf"}
    assert value(samples, "target_info", service_name="metered") == 1
    assert port_is_free(port)


async def test_two_runs_one_after_another_on_the_same_port(factory, jsonl, run_pipeline) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    path, _ = metered_pipeline(factory, jsonl, "orders", f"prometheus({port})", events=1, flow_control=False)
    for _ in range(2):
        code, _ = await run_pipeline(path)
        assert code == 0
        assert port_is_free(port)


def test_up_with_the_port_taken_says_so_in_one_line(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path, _ = metered_pipeline(factory, jsonl, "orders", f"prometheus({port})", events=1)
        result = subprocess.run(
            [sys.executable, "-m", "runner", "up", str(path), "--until-idle"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "metrics" in line] == [
        f"metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


# -- OTLP -------------------------------------------------------------------------------------


@pytest.fixture
def collector() -> Iterator[tuple[str, list[ExportMetricsServiceRequest]]]:
    received: list[ExportMetricsServiceRequest] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            ok = self.path == "/v1/metrics"
            if ok:
                received.append(ExportMetricsServiceRequest.FromString(body))
            self.send_response(200 if ok else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", received
    server.shutdown()
    server.server_close()


async def test_otlp_export_reaches_a_collector(  # type: ignore[no-untyped-def]
    factory, jsonl, run_pipeline, collector, queue_name
) -> None:
    endpoint, received = collector
    path, mod = metered_pipeline(factory, jsonl, queue_name, "otlp", endpoint=endpoint)
    factory.imported(mod).release.set()
    code, _ = await run_pipeline(path)
    assert code == 0
    assert received  # the last collection is exported when up ends
    last = received[-1].resource_metrics[0]
    resource = {a.key: a.value.string_value for a in last.resource.attributes}
    assert resource["service.name"] == "metered"
    metrics = {m.name: m for scope in last.scope_metrics for m in scope.metrics}
    assert {
        "edarun.consumer.processed",
        "edarun.consumer.failed",
        "edarun.consumer.retried",
        "edarun.consumer.repaired",
        "edarun.consumer.parked",
        "edarun.consumer.restarts",
        "edarun.consumer.count",
        "edarun.consumer.in_flight",
        "edarun.producer.published",
        "edarun.producer.rejected",
        "edarun.producer.delayed",
        "edarun.queue.depth",
        "edarun.flow.state",
        "messaging.process.duration",
    } <= set(metrics)
    (processed,) = metrics["edarun.consumer.processed"].sum.data_points
    assert processed.as_int == 6 and metrics["edarun.consumer.processed"].sum.is_monotonic
    (duration,) = metrics["messaging.process.duration"].histogram.data_points
    assert duration.count == 6 and sum(duration.bucket_counts) == 6
    assert list(duration.explicit_bounds) == list(HANDLER_BUCKETS_S)
    assert metrics["messaging.process.duration"].unit == "s"


# -- a multi-process run on RabbitMQ: one endpoint, the supervisor's --------------------------


async def test_a_multi_process_run_exposes_merged_metrics(factory, jsonl, queue_name) -> None:  # type: ignore[no-untyped-def]
    amqp_available()
    port = free_port()
    jsonl("events.jsonl", [{"id": i} for i in range(10)])
    mod = factory.module("plain", "def handle(event, ctx):\n    return None\n")
    path = factory.pipeline(
        f"""
        version: 1
        name: metered-processes
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: {queue_name}}}
        consumers:
          work: {{from: {queue_name}, handler: "{mod}:handle", instances: 2}}
        """
    )
    queues = [queue_name, "work.dashboard"]
    await delete_queues(queues)
    command = ["up", str(path), "--broker", AMQP_URL, "--metrics", f"prometheus({port})"]
    up = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner", *command,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "CI": "1"},
    )  # fmt: skip

    def merged(samples: Samples) -> bool:
        """Every service's counts have reached the supervisor (each reports on its own schedule)."""
        return (
            value(samples, "edarun_consumer_processed_total", edarun_consumer="work") == 10
            and value(samples, "edarun_consumer_count", edarun_consumer="work") == 2  # both instances
            and value(samples, "edarun_producer_published_total", edarun_producer="feed") == 10
        )

    try:
        samples = await scrape_until(port, merged, timeout=60)
    finally:
        if up.returncode is None:
            up.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(up.communicate(), 60)
        await delete_queues(queues)
    assert merged(samples), (samples, stderr.decode())
    duration = {"edarun_consumer": "work", "messaging_system": "rabbitmq"}
    assert value(samples, "messaging_process_duration_seconds_count", **duration) == 10
    assert port_is_free(port)
