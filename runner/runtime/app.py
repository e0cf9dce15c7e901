"""Running a pipeline: build its services on a broker, watch them, stop at idle or on a signal.

The runner owns the services' lifecycle and the run's outcome (exit code and report); the services
own their work. Idle means: the selected producers are exhausted, the queues the selected consumers
read hold nothing ready or unacknowledged, nothing is in flight and no retry is pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..brokers import Broker, BrokerError, Depth, connect_urls
from ..brokers.multi import MultiBroker
from ..config.loader import LoadedPipeline
from ..config.models import Metrics, Pipeline
from ..patterns.flow import SLOW, FlowMonitor, monitor_name
from ..patterns.priority import LaneRule, lane_queue, lane_rules, update_rules
from ..patterns.watch import (
    POLICY_KEY,
    ConfigClient,
    ConfigService,
    ConfigWatcher,
    config_queue,
    config_service_name,
)
from ..patterns.workflow import WorkflowProcessor, workflow_queue
from ..redact import redact_text, redact_url
from ..telemetry import MeteredRun, MetricsError, RunMetrics, Tracing
from . import loop as event_loop
from .consumer import ConsumerService
from .counters import SharedCounters
from .dashboard import Dashboard, dashboard_queue
from .producer import ProducerService
from .publisher import Publisher
from .reload import Reloader, policy_document
from .stats import HANDLER_BUCKETS_S, ConsumerStats, ProducerStats, RunStats

log = logging.getLogger("edarun")
Service = ConsumerService | WorkflowProcessor  # what the runner starts, watches and drains

EXIT_OK, EXIT_FAILURE, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
_POLL = 0.05
_POLL_NETWORK = 0.1


class RunError(Exception):
    """A run that cannot start; `code` is the exit code (2 invalid options, 1 runtime)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class RunOptions:
    broker: str | None = None
    until_idle: bool = False
    only: Sequence[str] = ()
    report: Path | None = None
    traces: str | None = None  # overrides telemetry.traces: none | console | otlp | file(path)
    metrics: str | None = None  # overrides telemetry.metrics: none | otlp | prometheus([HOST:]PORT)
    connect_timeout: float = 30.0
    view: Any = None  # a runtime.live view; None = no output
    skip: dict[str, int] = field(default_factory=dict)  # producer → source events already published
    # This process runs one instance of one service (started by the supervisor); otherwise a
    # consumer's `instances` run here side by side.
    single_service: bool = False
    counters: Path | None = None  # a service process: mirror its counters here (runtime.counters)
    restarted: bool = False  # a service process started again by its supervisor
    reload: bool = False  # --reload: services follow edited policies (patterns.watch, runtime.reload)
    instance: int = 1  # which instance of a consumer this process runs (its watch queue)


async def sample_depths(broker: Broker, loaded: LoadedPipeline, stats: RunStats) -> dict[str, Depth]:
    """Every queue's depth now, recorded in the run's stats (for max_depth and the live view)."""
    depths = {}
    for queue in queues_of(loaded):
        depth = depths[queue] = await broker.depth(queue)
        stats.observe_depth(queue, depth.ready)
    return depths


def broker_urls(loaded: LoadedPipeline, override: str | None = None) -> list[str]:
    """The brokers a run uses: `--broker` (one), else the file's `brokers:` or `broker:`."""
    return [override] if override else loaded.model.broker_urls


def spread_by(loaded: LoadedPipeline) -> str | None:
    """The field `spread: by_context(field)` keeps together on one broker (pattern 9), or None."""
    spread = loaded.model.spread
    return spread.by if spread is not None and spread.mode == "by_context" else None


async def connect(loaded: LoadedPipeline, override: str | None, timeout: float) -> Broker:
    """The run's broker, connected: one, or a multi-broker over several (pattern 9), which goes on
    without a member that does not answer yet and joins it when it does. Raises RunError."""
    urls = broker_urls(loaded, override)
    try:
        broker = connect_urls(urls, spread_by=spread_by(loaded), queue_types=queue_types(loaded))
        if isinstance(broker, MultiBroker):
            broker.pinned.add(config_queue(loaded.model.name))  # pattern 4's commands, in order
        # A little longer than each broker's own timeout: with several, one that hangs is left to
        # join later while the others start the run.
        await asyncio.wait_for(broker.connect(timeout), timeout + 2.0)
    except (TimeoutError, BrokerError, OSError) as exc:
        detail = redact_text(str(exc)) or "timed out"
        where = (
            f"broker {redact_url(urls[0])}"
            if len(urls) == 1
            else "the brokers " + ", ".join(map(redact_url, urls))
        )
        raise RunError(f"cannot reach {where} within {timeout:g}s: {detail}", EXIT_FAILURE) from None
    return broker


def queue_types(loaded: LoadedPipeline) -> dict[str, str]:
    """Queue → RabbitMQ queue type, for the queues whose settings say (a priority lane has its
    queue's type)."""
    types: dict[str, str] = {name: queue.queue_type for name, queue in loaded.model.queues.items()}
    for queue in lane_rules(loaded.model):
        if queue in types:
            types[lane_queue(queue)] = types[queue]
    return types


def queues_of(loaded: LoadedPipeline) -> list[str]:
    """Every queue the pipeline names, in the order it names them, each followed by its priority
    lane when it has one; then the consumers' workflow queues."""
    model = loaded.model
    names: list[str] = list(model.queues)
    for producer in model.producers.values():
        names += producer.targets
    for consumer in model.consumers.values():
        names += [consumer.from_, *([consumer.emit] if consumer.emit else [])]
    laned = lane_rules(model)
    with_lanes = [n for name in names for n in (name, *([lane_queue(name)] if name in laned else []))]
    workflows = [workflow_queue(n) for n, c in model.consumers.items() if c.on_error.action == "workflow"]
    return list(dict.fromkeys([*with_lanes, *workflows]))


def consumed_queues(
    loaded: LoadedPipeline, consumers: Sequence[str], workflows: Sequence[str] = ()
) -> set[str]:
    """The queues (and lanes) the named consumers and workflow processors read: where idle looks
    for work left."""
    queues = set(workflows)  # a workflow processor's name is its queue's
    for name in consumers:
        spec = loaded.model.consumers[name]
        queues.add(spec.from_)
        if spec.priority_lane is not None:
            queues.add(lane_queue(spec.from_))
    return queues


def flow_controlled(loaded: LoadedPipeline, producer: str) -> bool:
    """Does the producer publish to a queue with flow_control (pattern 8)?"""
    queues = loaded.model.queues
    targets = loaded.model.producers[producer].targets
    return any(t in queues and queues[t].flow_control is not None for t in targets)


class Runner:
    def __init__(self, loaded: LoadedPipeline, options: RunOptions) -> None:
        self.loaded = loaded
        self.options = options
        model = loaded.model
        self.flow = {name: q.flow_control for name, q in model.queues.items() if q.flow_control is not None}
        monitors = {monitor_name(q): q for q in self.flow}
        # Pattern 7: each workflow consumer's processor is a service of its own, named as its queue.
        workflows = {
            workflow_queue(n): n for n, c in model.consumers.items() if c.on_error.action == "workflow"
        }
        # Pattern 4: the config service runs when something may watch it.
        self.config_name = config_service_name(model.name)
        watched = bool(model.config) or any(c.watch for c in model.consumers.values()) or options.reload
        known = {*model.producers, *model.consumers, *monitors, *workflows}
        known |= {self.config_name} if watched else set()
        unknown = [n for n in options.only if n not in known]
        if unknown:
            raise RunError(
                f"--only: no service named {', '.join(map(repr, unknown))} (producers, consumers, "
                "workflow processors <consumer>.workflow, flow monitors <queue>.flow, the config "
                "service <pipeline>.config)",
                EXIT_INVALID,
            )
        selected = set(options.only) or known
        self.producer_names = [n for n in model.producers if n in selected]
        self.consumer_names = [n for n in model.consumers if n in selected]
        self.monitored = [queue for name, queue in monitors.items() if name in selected]
        self.workflow_names = [name for name in workflows if name in selected]
        self.runs_config = self.config_name in selected and watched
        self.lanes: dict[str, LaneRule] = {}
        # The latest edarun.policy document and its model, parsed once for the process's services
        # (keyed by the document, not its version: a config state begun again counts anew).
        self._policy: tuple[Any, Pipeline] | None = None
        self.stats = RunStats(pipeline=model.name)
        self.stop_requested: asyncio.Event | None = None
        self.interrupted = False
        self.failed: list[str] = []
        self.started = False

    # -- setup ---------------------------------------------------------------------------------

    def _tracing(self) -> Tracing:
        model = self.loaded.model
        traces = model.telemetry.traces
        exporter, path = traces.exporter, traces.path
        if self.options.traces is not None:
            from ..config.policy import parse_traces  # the CLI flag takes the YAML's syntax

            spec = parse_traces(self.options.traces)
            exporter, path = spec["exporter"], spec.get("path")
        file = None
        if exporter == "file" and path is not None:
            # A path from --traces is relative to where the command runs, as a shell user expects.
            file = (Path(path) if self.options.traces else self.loaded.base_dir / path).resolve()
        return Tracing.setup(
            exporter,
            path=file,
            endpoint=model.telemetry.endpoint,
            service_name=model.telemetry.service_name or model.name,
        )

    def _metrics(self, stats: RunStats, system: str) -> RunMetrics:
        """The run's metrics, read from `stats` (the supervisor's merged ones on RabbitMQ): one
        exporter per `up`, so a service process exports nothing. Raises RunError."""
        if self.options.single_service:
            return RunMetrics()
        telemetry = self.loaded.model.telemetry
        spec = telemetry.metrics
        if self.options.metrics is not None:
            spec = Metrics.model_validate(self.options.metrics)  # the CLI flag takes the YAML's syntax
        run = MeteredRun(
            stats,
            system=system,
            consumer_queues={name: c.from_ for name, c in self.loaded.model.consumers.items()},
            flow_queues=self.monitored,
            bounds=HANDLER_BUCKETS_S,
        )
        try:
            metrics = RunMetrics.setup(
                spec.exporter, run, endpoint=telemetry.endpoint, host=spec.host, port=spec.port,
                every=spec.every, service_name=telemetry.service_name or self.loaded.model.name,
            )  # fmt: skip
        except MetricsError as exc:
            raise RunError(str(exc), EXIT_FAILURE) from None
        if metrics.url is not None:
            log.info("metrics for Prometheus at %s", metrics.url)
        return metrics

    async def _connect(self) -> Broker:
        return await connect(self.loaded, self.options.broker, self.options.connect_timeout)

    def _most_workers(self, spec: Any) -> int:
        """The most handler calls a consumer can have running at once (carpool workers included)."""
        most = int(spec.autoscale.max) if spec.autoscale else self._workers(spec)
        lane = spec.priority_lane
        return most + (lane.carpool if lane is not None and lane.mode == "carpool" else 0)

    def _workers(self, spec: Any) -> int:
        instances = 1 if self.options.single_service else spec.instances
        return (spec.concurrency or 1) * instances

    def _build(self, broker: Broker, tracing: Tracing) -> tuple[list[ProducerService], list[Service]]:
        model, loaded = self.loaded.model, self.loaded
        lanes = self.lanes = lane_rules(model)
        consumers: list[Service] = []
        # Enough threads for every sync handler call that can run at once (autoscale's max too),
        # and one for each workflow processor's repair calls.
        threads = sum(self._most_workers(model.consumers[n]) for n in self.consumer_names)
        threads += len(self.workflow_names)
        self.executor = ThreadPoolExecutor(max_workers=max(threads, 1), thread_name_prefix="edarun-handler")
        for name in self.consumer_names:
            spec = model.consumers[name]
            stats = self.stats.consumers[name] = ConsumerStats()
            consumers.append(
                ConsumerService(
                    name,
                    spec,
                    handler=loaded.resolve(spec.handler),
                    broker=broker,
                    tracing=tracing,
                    stats=stats,
                    parked=self.stats.parked_events,
                    executor=self.executor,
                    lanes=lanes,
                )
            )
        for workflow in self.workflow_names:
            consumers.append(self._workflow(workflow, broker, tracing, lanes))
        if self.options.counters is not None:
            mirror = SharedCounters(self.options.counters)
            everything = [*self.stats.consumers.values(), *self.stats.producers.values()]
            for service in consumers:
                service.mirror = lambda: mirror.write(*everything)
        producers = []
        for name in self.producer_names:
            producer = model.producers[name]
            source = producer.source
            producers.append(
                ProducerService(
                    name,
                    producer,
                    source_file=loaded.file(source.file) if source.file else None,
                    source_function=loaded.resolve(source.function) if source.function else None,
                    broker=broker,
                    tracing=tracing,
                    stats=self._producer_stats(name),
                    skip=self.options.skip.get(name, 0),
                    lanes=lanes,
                    flow=self.flow,
                )
            )
        if self.options.counters is not None:
            everything = [*self.stats.consumers.values(), *self.stats.producers.values()]
            for producer_service in producers:
                producer_service.mirror = lambda: mirror.write(*everything)
        return producers, consumers

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until idle (with --until-idle) or until stopped; returns the exit code."""
        self.stop_requested = asyncio.Event()
        event_loop.on_stop_signals(self.request_stop)
        tracing = Tracing()
        metrics = RunMetrics()
        broker: Broker | None = None
        config_service: ConfigService | None = None
        outcome = "failed"
        try:
            broker = await self._connect()
            metrics = self._metrics(self.stats, broker.system)
            tracing = self._tracing()
            model = self.loaded.model
            for queue in queues_of(self.loaded):
                await broker.declare(queue)
            for name in model.consumers:
                await broker.declare(dashboard_queue(name))
            producers, consumers = self._build(broker, tracing)
            monitors = [self._monitor(broker, tracing, queue) for queue in self.monitored]
            self.started = True
            if self.runs_config:
                config_service = ConfigService(
                    model.name, model.config, broker=broker, tracing=tracing,
                    policy=policy_document(model) if self.options.reload else None,
                )  # fmt: skip
                await config_service.start()
            # Pattern 4: every watching service has the current values before it consumes.
            watchers = self._watchers(broker, tracing, [*producers, *consumers, *monitors])
            await asyncio.gather(*(w.start() for w in watchers))
            for consumer in consumers:
                if isinstance(consumer, WorkflowProcessor):
                    consumer.start()
                    continue
                # A supervised consumer sizes itself; with several processes each takes its share.
                instances = consumer.spec.instances if self.options.single_service else 1
                consumer.start(self._workers(consumer.spec), instances=instances)
            watching = [asyncio.create_task(m.run(), name=f"{m.queue} flow monitor") for m in monitors]
            reloader = (
                self._reloader(broker) if self.options.reload and not self.options.single_service else None
            )
            if reloader is not None:
                await broker.declare(config_queue(model.name))  # edits wait there for the service
                watching.append(asyncio.create_task(reloader.run(), name="reload"))
            tasks = {asyncio.create_task(p.run(), name=p.name): p for p in producers}
            for task in tasks:
                task.add_done_callback(self._producer_done)
            outcome = await self._watch(broker, consumers)
            for producer in producers:
                producer.stopping.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            for monitor in monitors:
                monitor.stop()
            if reloader is not None:
                reloader.stop()
            await asyncio.gather(*watching, return_exceptions=True)
            for consumer in consumers:  # consumers before workflow processors: their last
                await consumer.drain()  # failures reach the workflow queue first
            for watcher in watchers:
                await watcher.close()
            if config_service is not None:
                await config_service.stop()
            await self._sample(broker)
        except RunError:
            raise
        finally:
            event_loop.default_signals()
            if broker is not None:
                await broker.close()
            await asyncio.gather(asyncio.to_thread(tracing.shutdown), asyncio.to_thread(metrics.shutdown))
            if hasattr(self, "executor"):
                self.executor.shutdown(wait=False)
            self._write_report(outcome)
            if self.options.view is not None and self.started:
                self.options.view.close(self.stats, outcome)
        if outcome == "interrupted":
            return EXIT_INTERRUPTED
        return EXIT_FAILURE if self.failed else EXIT_OK

    def _watchers(self, broker: Broker, tracing: Tracing, services: list[Any]) -> list[ConfigWatcher]:
        """Pattern 4: a watcher per service that watches `config:` keys, or (--reload) policies."""
        model = self.loaded.model
        watchers = []
        for service in services:
            name = service.name if not isinstance(service, FlowMonitor) else monitor_name(service.queue)
            keys = list(service.spec.watch) if isinstance(service, ConsumerService) else []
            if self.options.reload:
                keys.append(POLICY_KEY)
            if not keys:
                continue
            instance = self.options.instance if isinstance(service, ConsumerService) else 1

            def changed(key: str, value: Any, version: int, service: Any = service) -> None:
                if key == POLICY_KEY:
                    self._apply_policy(service, value)

            watcher = ConfigWatcher(
                model.name, name, keys, model.config, broker=broker, tracing=tracing, instance=instance,
                changed=changed,
            )  # fmt: skip
            if isinstance(service, ConsumerService):
                service.config = watcher.config  # ctx.config: a live, read-only view
            watchers.append(watcher)
        return watchers

    def _apply_policy(self, service: Any, document: Any) -> None:
        """An edited pipeline's policies (--reload), for one service of this process."""
        if self._policy is None or self._policy[0] != document:
            self._policy = (document, Pipeline.model_validate(document))
            update_rules(self.lanes, self._policy[1])  # every publisher of this process reads them
        model = self._policy[1]
        if isinstance(service, FlowMonitor):
            flow = model.queues[service.queue].flow_control if service.queue in model.queues else None
            if flow is not None:
                service.apply_policy(flow)
        elif isinstance(service, ConsumerService | ProducerService):
            service.apply_policy(model)

    def _reloader(self, broker: Broker, *, then: Callable[[LoadedPipeline], None] | None = None) -> Reloader:
        """--reload: edits of the file go to the config service as `set` commands; each outcome
        goes in the report, and an applied edit to `then` too."""
        client = ConfigClient(self.loaded.model.name, broker)

        async def send(values: dict[str, Any]) -> None:
            await client.send({"op": "set", "values": values})

        def applied(loaded: LoadedPipeline, changes: list[str]) -> None:
            self.stats.reload_outcome("applied", changes)
            if then is not None:
                then(loaded)

        def refused(lines: list[str]) -> None:
            self.stats.reload_outcome("refused", lines)

        return Reloader(self.loaded, send=send, applied=applied, refused=refused)

    def _producer_stats(self, name: str) -> ProducerStats:
        stats = self.stats.producers.setdefault(name, ProducerStats())
        stats.flow_controlled = flow_controlled(self.loaded, name)
        return stats

    def _workflow(
        self, name: str, broker: Broker, tracing: Tracing, lanes: dict[str, LaneRule]
    ) -> WorkflowProcessor:
        """Pattern 7: the workflow processor of one consumer; it counts in the consumer's stats."""
        consumer = name.removesuffix(".workflow")
        spec = self.loaded.model.consumers[consumer]
        assert spec.on_error.repair is not None
        stats = self.stats.consumers.setdefault(consumer, ConsumerStats())
        publisher = Publisher(broker, tracing, service=name, lanes=lanes)
        return WorkflowProcessor(
            consumer, spec.on_error, repair=self.loaded.resolve(spec.on_error.repair), queue=spec.from_,
            broker=broker, tracing=tracing, publisher=publisher,
            dashboard=Dashboard(publisher, consumer, stats, self.stats.parked_events), stats=stats,
            executor=self.executor,
        )  # fmt: skip

    def _monitor(self, broker: Broker, tracing: Tracing, queue: str) -> FlowMonitor:
        """Pattern 8: the flow monitor of one queue (its priority lane counts in its depth)."""
        measured = [queue, *([lane_queue(queue)] if queue in lane_rules(self.loaded.model) else [])]

        def changed(queue: str, state: str, depth: int) -> None:
            self.stats.flow_changed(queue, "slow" if state == SLOW else "resume", depth)
            tracing.decision(f"flow {queue}", {"edarun.flow.state": state, "edarun.flow.depth": depth})

        return FlowMonitor(
            queue, self.flow[queue], broker=broker, measured=measured, changed=changed,
            restarted=self.options.restarted,
        )  # fmt: skip

    def _producer_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.failed.append(task.get_name())
            log.error(
                "producer %s failed: %s: %s",
                task.get_name(),
                type(exc).__name__,
                redact_text(str(exc)),
            )

    async def _sample(self, broker: Broker) -> dict[str, Depth]:
        return await sample_depths(broker, self.loaded, self.stats)

    async def _watch(self, broker: Broker, consumers: list[Service]) -> str:
        assert self.stop_requested is not None
        consumed = consumed_queues(self.loaded, self.consumer_names, self.workflow_names)
        view = self.options.view
        # A network broker may have handed a message out that has not reached us yet: idle must
        # hold on two polls in a row with nothing received in between.
        poll = _POLL if broker.system == "memory" else _POLL_NETWORK
        idle_seen: tuple[int, ...] | None = None
        while True:
            depths = await self._sample(broker)
            held: dict[int, int] = {}  # a consumer and its workflow processor count in one stats
            for consumer in consumers:
                held[id(consumer.stats)] = held.get(id(consumer.stats), 0) + consumer.held()
            for consumer in consumers:
                consumer.stats.held = held[id(consumer.stats)]
                consumer.stats.pending_retries = len(consumer.retries.pending)
            if view is not None:
                view.update(self.stats)
            if self.stop_requested.is_set():
                return "interrupted"
            if self.options.until_idle and self._idle(depths, consumed, consumers):
                signature = tuple(c.stats.received for c in consumers)
                if broker.system == "memory" or idle_seen == signature:
                    return "failed" if self.failed else "idle"
                idle_seen = signature
            else:
                idle_seen = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), poll)

    def _idle(self, depths: dict[str, Depth], consumed: set[str], consumers: list[Service]) -> bool:
        if not all(p.done for p in self.stats.producers.values()):
            return False
        # A broker that is down may hold events of the queue (pattern 9): not empty until it answers.
        if any(d.total or not d.complete for q, d in depths.items() if q in consumed):
            return False
        return all(c.in_flight == 0 and not c.retries.pending and not c.held() for c in consumers)

    # -- signals and report ---------------------------------------------------------------------

    def request_stop(self) -> None:
        if self.stop_requested is not None:
            self.stop_requested.set()

    def _write_report(self, outcome: str) -> None:
        if self.options.report is None:
            return
        report = self.stats.report(outcome)
        self.options.report.parent.mkdir(parents=True, exist_ok=True)
        self.options.report.write_text(redact_text(json.dumps(report, indent=2, default=str)) + "\n")


def run_pipeline(loaded: LoadedPipeline, options: RunOptions) -> int:
    """Run `loaded` to its end; returns the exit code. Raises RunError when it cannot start."""
    return event_loop.run(Runner(loaded, options).run())
