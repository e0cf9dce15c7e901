"""The supervisor of a multi-process run: one OS process per service, restarted when it dies.

`edarun up` on RabbitMQ starts each producer and each consumer instance as `edarun service …`,
reads the counters each one prints, merges them for the live view and the report, restarts a
process that dies (with back-off; a producer resumes after the events it had confirmed), decides
when the whole run is idle, and on SIGTERM or Ctrl-C lets every service drain before it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..brokers import Broker, Depth
from ..config.loader import LoadedPipeline
from ..patterns.flow import monitor_name
from ..patterns.watch import config_queue
from ..telemetry import RunMetrics
from . import loop as event_loop
from .app import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_OK,
    Runner,
    RunOptions,
    consumed_queues,
    flow_controlled,
    queues_of,
    sample_depths,
)
from .counters import read_counters
from .dashboard import dashboard_queue
from .reload import Reloader
from .stats import HANDLER_BUCKETS_S, ConsumerStats, ProducerStats, RunStats
from .status import StatusBroadcaster, StatusBuilder

log = logging.getLogger("edarun.supervisor")

_POLL = 0.25
_RESTART_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
_HEALTHY_AFTER = 30.0
_DRAIN_GRACE = 60.0
_SUMMED = (
    "processed", "priority", "failed", "retried", "repaired", "parked", "restarts", "received",
    "handler_calls",
)  # fmt: skip


def _add_buckets(into: list[int], counts: Any) -> None:
    for index, count in enumerate(counts):
        if index < len(into):
            into[index] += int(count)


@dataclass
class Child:
    """One service process, across its restarts."""

    service: str
    kind: str  # producer | consumer | workflow | monitor | config
    instance: int
    owner: str = ""  # a workflow processor's consumer: whose counts it adds to
    process: asyncio.subprocess.Process | None = None
    last: dict[str, Any] = field(default_factory=dict)  # the latest counters of this incarnation
    base: dict[str, int] = field(default_factory=dict)  # counters of earlier incarnations
    base_seconds: float = 0.0  # and their handler durations
    base_buckets: list[int] = field(default_factory=lambda: [0] * (len(HANDLER_BUCKETS_S) + 1))
    seq: int = 0
    restarts: int = 0
    failures: int = 0
    started_at: float = 0.0
    done: bool = False  # a producer whose source is exhausted
    failed: bool = False  # gave up: not restarted
    exited: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def label(self) -> str:
        return f"{self.service}#{self.instance}" if self.kind == "consumer" else self.service

    @property
    def stats_key(self) -> str:
        return self.owner or self.service

    def counters(self) -> dict[str, Any]:
        section = "producers" if self.kind == "producer" else "consumers"
        return dict(self.last.get(section, {}).get(self.stats_key, {}))


class Supervisor:
    def __init__(self, loaded: LoadedPipeline, options: RunOptions) -> None:
        # The same checks as a single-process run: unknown --only names.
        self.plan = Runner(loaded, options)
        self.loaded = loaded
        self.options = options
        model = loaded.model
        self.children = [Child(name, "producer", 1) for name in self.plan.producer_names]
        for name in self.plan.consumer_names:
            for instance in range(1, model.consumers[name].instances + 1):
                self.children.append(Child(name, "consumer", instance))
        # Pattern 8: a flow monitor per flow-controlled queue, a service of its own.
        self.children += [Child(monitor_name(queue), "monitor", 1) for queue in self.plan.monitored]
        # Pattern 7: a workflow processor per workflow consumer, a service of its own.
        for name in self.plan.workflow_names:
            self.children.append(Child(name, "workflow", 1, owner=name.removesuffix(".workflow")))
        # Pattern 4: the config service, a service of its own.
        if self.plan.runs_config:
            self.children.append(Child(self.plan.config_name, "config", 1))
        self.stats = RunStats(pipeline=model.name)
        for name in self.plan.producer_names:
            self.stats.producers[name] = ProducerStats(flow_controlled=flow_controlled(loaded, name))
        for name in self.plan.consumer_names:
            self.stats.consumers[name] = ConsumerStats()
        for child in self.children:
            if child.kind == "workflow":
                self.stats.consumers.setdefault(child.stats_key, ConsumerStats())
        self.stopping = False
        self.stop_requested = asyncio.Event()
        self.status: StatusBroadcaster | None = None  # says the run's status for `edarun status`
        self._followers: set[asyncio.Task[None]] = set()
        self._workdir = Path(tempfile.mkdtemp(prefix=f"edarun-{model.name}-"))
        # The file as this run runs it: a service (re)started after an edit of the file runs the
        # same pipeline as the others (an edit reaches them only through --reload).
        self._pipeline_copy = self._workdir / "pipeline.yaml"
        self._write_copy(loaded.text)

    # -- processes -----------------------------------------------------------------------------

    def _command(self, child: Child) -> list[str]:
        options = self.options
        command = [sys.executable, "-m", "runner", "service", str(self.loaded.path), child.service]
        command += ["--instance", str(child.instance), "--connect-timeout", str(options.connect_timeout)]
        if options.broker:
            command += ["--broker", options.broker]
        if options.traces:
            command += ["--traces", options.traces]
        if child.kind == "producer":
            command += ["--skip", str(child.base.get("confirmed", 0))]
        if child.restarts:
            command.append("--restarted")
        if options.reload:
            command.append("--reload")
        command += ["--text", str(self._pipeline_copy)]
        command += ["--counters", str(self._counters_file(child))]
        return command

    def _counters_file(self, child: Child) -> Path:
        return self._workdir / f"{child.label.replace('#', '-')}.counters"

    async def _spawn(self, child: Child) -> None:
        child.process = await asyncio.create_subprocess_exec(
            *self._command(child),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "EDARUN_SERVICE": child.label},
            start_new_session=True,  # Ctrl-C reaches the supervisor, which drains the services
        )
        child.started_at = time.monotonic()
        child.exited.clear()
        for follower in (self._follow(child, child.process), self._relay_logs(child, child.process)):
            task = asyncio.create_task(follower, name=f"follow {child.label}")
            self._followers.add(task)
            task.add_done_callback(self._followers.discard)

    async def _relay_logs(self, child: Child, process: asyncio.subprocess.Process) -> None:
        """A service's log lines, through this process's logging: on a terminal they scroll above
        the live table instead of through it."""
        assert process.stderr is not None
        relay = logging.getLogger(child.label)
        async for raw in process.stderr:
            text = raw.decode("utf-8", errors="replace").rstrip()
            if text:
                level, _, rest = text.partition(" ")
                known = logging.getLevelName(level)
                if isinstance(known, int):
                    relay.log(known, "%s", rest)
                else:
                    relay.info("%s", text)

    async def _follow(self, child: Child, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a stray print from a handler; counters are JSON lines only
            # A line carries the parked events and flow changes since the one before: keep those
            # the supervisor has not merged yet rather than lose them to the newer line.
            for key in ("parked", "flow"):
                line[key] = [*child.last.get(key, []), *line.get(key, [])]
            child.last = line
            child.seq += 1
        code = await process.wait()
        await self._exited(child, code)

    async def _exited(self, child: Child, code: int) -> None:
        self._fold(child)
        if child.kind == "producer" and code == EXIT_OK:
            child.done = True
        elif self.stopping:
            pass
        elif code in (EXIT_INVALID, EXIT_FAILURE) and child.kind == "producer":
            child.failed = True  # its source failed: running it again would fail again
            log.error("producer %s failed (exit %d); not restarted", child.label, code)
        else:
            healthy = time.monotonic() - child.started_at > _HEALTHY_AFTER
            child.failures = 0 if healthy else child.failures
            delay = _RESTART_BACKOFF[min(child.failures, len(_RESTART_BACKOFF) - 1)]
            child.failures += 1
            child.restarts += 1
            how = f"signal {-code}" if code < 0 else f"exit {code}"
            log.warning("service %s died (%s); restarting in %.1fs", child.label, how, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), delay)
            if not self.stopping:
                await self._spawn(child)
                return
        child.process = None
        child.exited.set()

    def _fold(self, child: Child) -> None:
        """Add a finished incarnation's counters to the child's running totals.

        The memory-mapped counters are fresher than the last line after a `kill -9`; the file is
        removed so the next incarnation starts from zero.
        """
        counters = child.counters()
        path = self._counters_file(child)
        for key, value in read_counters(path).items():
            if key != "restarts" or child.kind == "consumer":
                counters[key] = max(int(counters.get(key, 0)), value)
        path.unlink(missing_ok=True)
        for key in ("published", "rejected", "delayed", *_SUMMED):
            if key in counters:
                child.base[key] = child.base.get(key, 0) + int(counters[key])
        child.base_seconds += float(counters.get("handler_seconds", 0.0))
        _add_buckets(child.base_buckets, counters.get("handler_buckets", ()))
        if child.kind == "producer":
            # Where the next incarnation resumes: every source event before it was settled.
            confirmed = max(child.base.get("confirmed", 0), int(counters.get("confirmed", 0)))
            child.base["confirmed"] = confirmed
        self.stats.parked_events += child.last.get("parked", [])
        for change in child.last.get("flow", []):
            self.stats.flow_changed(change["queue"], change["state"], change["depth"], at=change["at"])
        child.last = {}

    # -- merging -------------------------------------------------------------------------------

    def _merge(self) -> None:
        for child in self.children:
            counters = child.counters()
            if child.last.get("parked"):
                self.stats.parked_events += child.last.pop("parked")
            for change in child.last.pop("flow", []):
                self.stats.flow_changed(change["queue"], change["state"], change["depth"], at=change["at"])
            if child.kind == "producer":
                stats = self.stats.producers[child.service]
                stats.published = child.base.get("published", 0) + int(counters.get("published", 0))
                stats.rejected = child.base.get("rejected", 0) + int(counters.get("rejected", 0))
                stats.delayed = child.base.get("delayed", 0) + int(counters.get("delayed", 0))
                stats.done = child.done
        totals: dict[str, ConsumerStats] = {name: ConsumerStats() for name in self.stats.consumers}
        for child in self.children:
            if child.kind not in ("consumer", "workflow"):
                continue
            counters, total = child.counters(), totals[child.stats_key]
            for key in _SUMMED:
                value = child.base.get(key, 0) + int(counters.get(key, 0))
                setattr(total, key, getattr(total, key) + value)
            # Handler durations: earlier incarnations' and this one's, bucket by bucket.
            total.handler_seconds += child.base_seconds + float(counters.get("handler_seconds", 0.0))
            _add_buckets(total.handler_buckets, child.base_buckets)
            _add_buckets(total.handler_buckets, counters.get("handler_buckets", ()))
            total.restarts += child.restarts
            if child.process is not None:
                for key in ("consumers", "in_flight", "held", "pending_retries"):
                    setattr(total, key, getattr(total, key) + int(counters.get(key, 0)))
        for name, total in totals.items():
            total.max_consumers = max(self.stats.consumers[name].max_consumers, total.consumers)
            self.stats.consumers[name] = total

    # -- running -------------------------------------------------------------------------------

    async def run(self) -> int:
        event_loop.on_stop_signals(self.request_stop)
        broker: Broker | None = None
        metrics = RunMetrics()
        outcome = "failed"
        started = False
        try:
            broker = await self.plan._connect()
            # The one exporter of the run: its services' counts, merged here.
            metrics = self.plan._metrics(self.stats, broker.system)
            for queue in queues_of(self.loaded):
                await broker.declare(queue)
            for name in self.loaded.model.consumers:
                await broker.declare(dashboard_queue(name))
            builder = StatusBuilder(self.loaded, broker.urls, only=self.options.only)
            self.status = StatusBroadcaster(broker, builder)
            # Consumers first, so the first events find someone to take them; producers last, so a
            # flow monitor is there to tell them the state.
            # The config service before anyone who registers with it.
            order = {"config": 0, "consumer": 1, "workflow": 2, "monitor": 2, "producer": 3}
            for child in sorted(self.children, key=lambda c: order[c.kind]):
                await self._spawn(child)
            started = True
            reloader = self._reloader(broker) if self.options.reload else None
            if reloader is not None:
                await broker.declare(config_queue(self.loaded.model.name))
            reloading = asyncio.create_task(reloader.run(), name="reload") if reloader else None
            try:
                outcome = await self._watch(broker)
            finally:
                if reloader is not None and reloading is not None:
                    reloader.stop()
                    await asyncio.gather(reloading, return_exceptions=True)
        finally:
            self.stopping = True
            self.stop_requested.set()  # wakes a service waiting out its restart back-off
            if started:
                await self._stop_children()
                self._merge()
            if self.status is not None:
                await self.status.close()
            if broker is not None:
                if started:
                    await self._sample(broker)
                await broker.close()
            await asyncio.to_thread(metrics.shutdown)
            event_loop.default_signals()
            shutil.rmtree(self._workdir, ignore_errors=True)
            self.plan.stats = self.stats
            self.plan._write_report(outcome)
            if self.options.view is not None and started:
                self.options.view.close(self.stats, outcome)
        if outcome == "interrupted":
            return EXIT_INTERRUPTED
        return EXIT_FAILURE if outcome == "failed" else EXIT_OK

    async def _sample(self, broker: Broker) -> dict[str, Depth]:
        return await sample_depths(broker, self.loaded, self.stats)

    async def _watch(self, broker: Broker) -> str:
        consumed = consumed_queues(self.loaded, self.plan.consumer_names, self.plan.workflow_names)
        consumers = [c for c in self.children if c.kind in ("consumer", "workflow")]
        idle_seen: dict[str, tuple[int, int]] | None = None
        while True:
            depths = await self._sample(broker)
            self._merge()
            if self.options.view is not None:
                self.options.view.update(self.stats)
            if self.status is not None:
                self.status.offer(self.stats)
            if self.stop_requested.is_set():
                return "interrupted"
            if self.options.until_idle and self._quiet(depths, consumed):
                # Idle must hold until every consumer has reported again with nothing new
                # received: a message in flight from the broker shows up in between.
                now = {c.label: (c.seq, int(c.counters().get("received", 0))) for c in consumers}
                if idle_seen is None or any(now[k][1] != idle_seen[k][1] for k in now):
                    idle_seen = now
                elif all(now[k][0] > idle_seen[k][0] for k in now):
                    failed = any(c.failed for c in self.children)
                    return "failed" if failed else "idle"
            else:
                idle_seen = None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_requested.wait(), _POLL)

    def _quiet(self, depths: dict[str, Depth], consumed: set[str]) -> bool:
        for child in self.children:
            if child.kind in ("monitor", "config"):
                continue  # it watches or answers; it has no work of its own to finish
            if child.kind == "producer":
                if not (child.done or child.failed):
                    return False
                continue
            if child.process is None or not child.last:
                return False  # restarting, or not reported yet
            counters = child.counters()
            if counters.get("in_flight") or counters.get("held") or counters.get("pending_retries"):
                return False
        # Ready messages only: what the services hold unacknowledged they report themselves. A
        # broker that is down may hold events of a queue (pattern 9): not empty until it answers.
        return not any(d.ready or not d.complete for q, d in depths.items() if q in consumed)

    async def _stop_children(self) -> None:
        """SIGTERM every service, let it drain, SIGKILL what is still there after the grace time."""
        alive = [c for c in self.children if c.process is not None and c.process.returncode is None]
        for child in alive:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        waits = [c.exited.wait() for c in self.children if c.process is not None]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), _DRAIN_GRACE)
            except TimeoutError:
                for child in self.children:
                    if child.process is not None and child.process.returncode is None:
                        log.error(
                            "service %s did not drain within %.0fs; killing it", child.label, _DRAIN_GRACE
                        )
                        with contextlib.suppress(ProcessLookupError):
                            child.process.kill()

    def _write_copy(self, text: str) -> None:
        """Replace the copy at once: a service starting meanwhile reads the old or the new file,
        never half of one."""
        partial = self._pipeline_copy.with_suffix(".partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, self._pipeline_copy)

    def _reloader(self, broker: Broker) -> Reloader:
        self.plan.stats = self.stats  # the reloads go in this run's report
        # An applied edit is what services (re)started from now on run.
        return self.plan._reloader(broker, then=lambda loaded: self._write_copy(loaded.text))

    def request_stop(self) -> None:
        self.stop_requested.set()


def supervise(loaded: LoadedPipeline, options: RunOptions) -> int:
    """Run every service of `loaded` in its own process until idle or stopped; the exit code."""
    return event_loop.run(Supervisor(loaded, options).run())
