"""The `edarun` command line: each command parses its arguments and calls one function."""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from .config.loader import LoadedPipeline, PipelineError, load_pipeline
from .redact import redact_text

app = typer.Typer(
    name="edarun",
    help="Run event-driven architecture patterns from one YAML pipeline file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

PipelineArg = Annotated[Path, typer.Argument(help="the pipeline YAML file", show_default=False)]


def _fail(message: str, code: int) -> NoReturn:
    err.print(redact_text(message), markup=False)
    raise typer.Exit(code)


def _load(path: Path) -> LoadedPipeline:
    try:
        return load_pipeline(path)
    except PipelineError as exc:
        _fail("\n".join(exc.lines), 2)


def _logging(verbose: bool, *, live: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if live:
        # Through the live view's console, so log lines scroll above the table instead of through it.
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False, markup=False)
        logging.basicConfig(level=level, format="%(name)s: %(message)s", handlers=[handler])
    else:
        logging.basicConfig(
            level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
    _quiet_libraries(verbose=verbose)


def _quiet_libraries(*, verbose: bool) -> None:
    # Their reconnect chatter is replaced by edarun's own one-line messages (runner.brokers.amqp).
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.CRITICAL)


@app.command()
def validate(pipeline: PipelineArg) -> None:
    """Check a pipeline file; exit 2 listing every error as file:line:col."""
    loaded = _load(pipeline)
    model = loaded.model
    out.print(
        f"{pipeline}: valid ({len(model.producers)} producers, {len(model.consumers)} consumers)",
        markup=False,
    )
    at_least_once = [n for n, c in model.consumers.items() if c.delivery == "at_least_once"]
    from .config.models import is_memory

    if all(is_memory(url) for url in model.broker_urls) and at_least_once:
        out.print(
            "note: broker 'memory' keeps nothing across a crash of the process; at_least_once "
            f"({', '.join(at_least_once)}) holds within one run only — use amqp:// for durability",
            markup=False,
        )


@app.command()
def up(
    pipeline: PipelineArg,
    broker: Annotated[str | None, typer.Option(help="broker URL, overrides the file's")] = None,
    until_idle: Annotated[bool, typer.Option("--until-idle", help="exit 0 once all work is done")] = False,
    only: Annotated[list[str] | None, typer.Option(help="run only these services (repeatable)")] = None,
    reload: Annotated[
        bool, typer.Option("--reload", help="apply edited policies to running services")
    ] = False,
    report: Annotated[Path | None, typer.Option(help="write a JSON summary here when up ends")] = None,
    traces: Annotated[str | None, typer.Option(help="none | console | otlp | file(path)")] = None,
    metrics: Annotated[
        str | None, typer.Option(help="none | otlp | prometheus | prometheus([HOST:]PORT)")
    ] = None,
    connect_timeout: Annotated[float, typer.Option(help="seconds to reach the broker")] = 30.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="the status as a JSON line every second on stdout")
    ] = False,
) -> None:
    """Run a pipeline: its producers, queues and consumers on the broker."""
    from .runtime.app import RunError, RunOptions, broker_urls, run_pipeline
    from .runtime.live import JsonView, LiveView, LogView
    from .runtime.status import StatusBuilder

    loaded = _load(pipeline)
    if traces is not None:
        from .config.policy import PolicySyntaxError, parse_traces

        try:
            parse_traces(traces)
        except PolicySyntaxError as exc:
            _fail(f"--traces: {exc}", 2)
    if metrics is not None:
        _check_metrics(metrics)
    if broker is not None:
        from .config.models import check_broker_url

        try:
            check_broker_url(broker)
        except ValueError as exc:
            _fail(f"--broker: {exc}", 2)
    interactive = err.is_terminal and not os.environ.get("CI") and not as_json
    _logging(verbose, live=interactive)
    status = StatusBuilder(loaded, broker_urls(loaded, broker), only=only or ())
    view: JsonView | LiveView | LogView
    if as_json:
        view = JsonView(sys.stdout, status, err)
    else:
        view = LiveView(err, status) if interactive else LogView(err)
    options = RunOptions(
        broker=broker,
        until_idle=until_idle,
        only=only or (),
        report=report,
        traces=traces,
        metrics=metrics,
        connect_timeout=connect_timeout,
        view=view,
        reload=reload,
    )
    from .config.models import is_memory

    urls = [broker] if broker else loaded.model.broker_urls
    try:
        if all(is_memory(url) for url in urls):  # embedded brokers live in this one process
            code = run_pipeline(loaded, options)
        else:
            from .runtime.processes import supervise

            code = supervise(loaded, options)
    except RunError as exc:
        _fail(str(exc), exc.code)
    except KeyboardInterrupt:
        code = 130
    raise typer.Exit(code)


def _check_metrics(spec: str) -> None:
    """--metrics takes what `telemetry.metrics` takes in the file; exit 2 and one line if not."""
    from pydantic import ValidationError

    from .config.models import Metrics

    try:
        Metrics.model_validate(spec)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(map(str, error["loc"]))
        message = error["msg"].removeprefix("Value error, ")
        _fail(f"--metrics: {where + ': ' if where else ''}{message}", 2)


@app.command(hidden=True)
def service(
    pipeline: PipelineArg,
    name: Annotated[str, typer.Argument(help="the producer, consumer or flow monitor to run")],
    instance: Annotated[int, typer.Option(help="which of the consumer's instances")] = 1,
    broker: Annotated[str | None, typer.Option(help="broker URL, overrides the file's")] = None,
    traces: Annotated[str | None, typer.Option(help="none | console | otlp | file(path)")] = None,
    skip: Annotated[int, typer.Option(help="producer: source events already published")] = 0,
    counters: Annotated[Path | None, typer.Option(help="mirror the counters into this file")] = None,
    connect_timeout: Annotated[float, typer.Option(help="seconds to reach the broker")] = 30.0,
    restarted: Annotated[bool, typer.Option(help="started again after it died")] = False,
    reload: Annotated[bool, typer.Option(help="follow edited policies (up --reload)")] = False,
    text: Annotated[Path | None, typer.Option(help="the pipeline as up runs it (a copy)")] = None,
) -> None:
    """Run one service of a pipeline in this process (what `up` starts per service on RabbitMQ)."""
    from .runtime.app import RunError, RunOptions
    from .runtime.service import run_service

    # The supervisor's copy of the file: a service restarted after an edit runs what the others run.
    try:
        loaded = load_pipeline(pipeline, text=text.read_text(encoding="utf-8") if text else None)
    except PipelineError as exc:
        _fail("\n".join(exc.lines), 2)
    logging.basicConfig(
        level=logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",  # the supervisor relays it, naming the service
        stream=sys.stderr,
    )
    _quiet_libraries(verbose=False)
    options = RunOptions(
        broker=broker, traces=traces, connect_timeout=connect_timeout, skip={name: skip}, counters=counters,
        restarted=restarted, reload=reload, instance=instance,
    )  # fmt: skip
    try:
        code = run_service(loaded, name, options)
    except RunError as exc:
        _fail(str(exc), exc.code)
    raise typer.Exit(code)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the pipeline file (for editor completion)."""
    from .config.schema import pipeline_schema

    out.print(json.dumps(pipeline_schema(), indent=2), markup=False)


class GraphFormat(StrEnum):
    mermaid = "mermaid"
    dot = "dot"
    svg = "svg"
    png = "png"


@app.command()
def graph(
    pipeline: PipelineArg,
    format: Annotated[
        GraphFormat, typer.Option("--format", help="mermaid | dot | svg | png (svg and png need Graphviz)")
    ] = GraphFormat.mermaid,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write here, not to stdout")] = None,
) -> None:
    """Print the topology: producers, queues and lanes, consumers, workflow, dashboard, control and
    watch queues, brokers."""
    from . import graph as topology

    loaded = _load(pipeline)
    if format in (GraphFormat.mermaid, GraphFormat.dot):
        render = topology.mermaid if format is GraphFormat.mermaid else topology.dot
        text = redact_text(render(loaded.model))
        if output is None:
            out.print(text, markup=False, end="")
        else:
            output.write_text(text, encoding="utf-8")
        return
    try:
        image = topology.draw(redact_text(topology.dot(loaded.model)), format.value)
    except topology.GraphvizError as exc:
        _fail(str(exc), 1)
    if output is None:
        sys.stdout.buffer.write(image)
        sys.stdout.buffer.flush()
    else:
        output.write_bytes(image)


class ConfigAction(StrEnum):
    set = "set"
    get = "get"


@app.command()
def config(
    pipeline: PipelineArg,
    action: Annotated[ConfigAction, typer.Argument(help="set KEY VALUE | get [KEY]")],
    key: Annotated[str | None, typer.Argument(metavar="KEY", help="a config key")] = None,
    value: Annotated[str | None, typer.Argument(metavar="VALUE", help="set: JSON, or else text")] = None,
    broker: Annotated[str | None, typer.Option(help="broker URL, overrides the file's")] = None,
    connect_timeout: Annotated[float, typer.Option(help="seconds to reach the broker")] = 30.0,
) -> None:
    """The values services watch (pattern 4): set one, or get them (prints JSON)."""
    from .runtime.app import RunError
    from .runtime.config_admin import parse_value, run_config

    loaded = _load(pipeline)
    if action is ConfigAction.set and (key is None or value is None):
        _fail("config set: give KEY and VALUE (VALUE is read as JSON when it parses, else as text)", 2)
    if action is ConfigAction.get and value is not None:
        _fail("config get takes at most one KEY", 2)
    try:
        if action is ConfigAction.set:
            result, notes = run_config(loaded, broker, connect_timeout, "set", key, parse_value(value or ""))
        else:
            result, notes = run_config(loaded, broker, connect_timeout, "get", key)
    except RunError as exc:
        _fail(str(exc), exc.code)
    out.print(json.dumps(result, indent=None if action is ConfigAction.set else 2), markup=False)
    for note in notes:
        err.print(note, markup=False)


@app.command()
def send(
    pipeline: PipelineArg,
    queue: Annotated[str, typer.Argument(help="a queue named in the pipeline")],
    event: Annotated[str, typer.Argument(help="the event as a JSON object")],
    broker: Annotated[str | None, typer.Option(help="broker URL, overrides the file's")] = None,
    connect_timeout: Annotated[float, typer.Option(help="seconds to reach the broker")] = 30.0,
    priority: Annotated[
        bool, typer.Option("--priority", help="mark it for the queue's priority lane (pattern 3)")
    ] = False,
) -> None:
    """Publish one JSON event to a queue of a pipeline's broker (its priority lane when marked or
    when the lane's when(...) holds)."""
    from .runtime.app import RunError
    from .runtime.send import send_event

    loaded = _load(pipeline)
    try:
        body = json.loads(event)
    except json.JSONDecodeError as exc:
        _fail(f"EVENT: not JSON: {exc}", 2)
    if not isinstance(body, dict):
        _fail("EVENT: expected a JSON object", 2)
    try:
        message_id, target = send_event(loaded, queue, body, broker, connect_timeout, priority=priority)
    except RunError as exc:
        _fail(str(exc), exc.code)
    out.print(f"sent {message_id} to {target}", markup=False)


@app.command()
def status(
    pipeline: PipelineArg,
    broker: Annotated[str | None, typer.Option(help="broker URL, overrides the file's")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
    wait: Annotated[float, typer.Option(help="seconds to wait for a running edarun up")] = 3.0,
    connect_timeout: Annotated[float, typer.Option(help="seconds to reach the broker")] = 30.0,
) -> None:
    """The status of a pipeline running elsewhere (RabbitMQ): queues, lanes, consumers, flow,
    parked; from the broker alone when no edarun up answers."""
    from .runtime.app import RunError
    from .runtime.live import render
    from .runtime.status_admin import run_status

    loaded = _load(pipeline)
    if wait <= 0:
        _fail("--wait: give the seconds to wait, above 0", 2)
    _quiet_libraries(verbose=False)  # an unreachable broker is one line of ours, not theirs too
    try:
        document = run_status(loaded, broker, connect_timeout, wait)
    except RunError as exc:
        _fail(str(exc), exc.code)
    if as_json:
        out.print(redact_text(json.dumps(document, indent=2)), markup=False)
    else:
        out.print(render(document), width=None if out.is_terminal else 120)  # a pipe: not 80


class DashboardAction(StrEnum):
    list = "list"
    show = "show"
    resubmit = "resubmit"
    drop = "drop"


@app.command()
def dashboard(
    pipeline: PipelineArg,
    action: Annotated[DashboardAction, typer.Argument(help="list | show ID | resubmit ID | drop ID")],
    event_id: Annotated[str | None, typer.Argument(metavar="ID", help="a parked event's id")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="list: a JSON array")] = False,
    event: Annotated[str | None, typer.Option(help="resubmit: the corrected event, as JSON")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="drop: yes, remove it for good")] = False,
    broker: Annotated[str | None, typer.Option(help="broker URL, overrides the file's")] = None,
    connect_timeout: Annotated[float, typer.Option(help="seconds to reach the broker")] = 30.0,
) -> None:
    """The parked events of a pipeline (pattern 7): list, show, resubmit or drop them."""
    from .runtime.app import RunError
    from .runtime.dashboard_admin import run_admin

    loaded = _load(pipeline)
    if action is not DashboardAction.list and event_id is None:
        _fail(f"dashboard {action.value}: which event? give its ID (see `dashboard PIPELINE list`)", 2)
    if event is not None and action is not DashboardAction.resubmit:
        _fail("--event belongs to resubmit", 2)
    edited = None
    if event is not None:
        try:
            edited = json.loads(event)
        except json.JSONDecodeError as exc:
            _fail(f"--event: not JSON: {exc}", 2)
        if not isinstance(edited, dict):
            _fail("--event: expected a JSON object", 2)
    if action is DashboardAction.drop and not yes:
        _fail(f"dashboard drop removes {event_id!r} for good: add --yes to do it", 2)
    try:
        if action is DashboardAction.list:
            records = run_admin(loaded, broker, connect_timeout, lambda admin: admin.records())
            if as_json:
                out.print(redact_text(json.dumps(records, indent=2, default=str)), markup=False)
            else:
                _print_parked(records)
        elif action is DashboardAction.show:
            records = run_admin(loaded, broker, connect_timeout, lambda admin: admin.records())
            found = [r for r in records if r["id"] == event_id]
            if not found:
                _fail(f"no parked event {event_id!r} in the dashboards of {pipeline}", 2)
            out.print(redact_text(json.dumps(found[0], indent=2, default=str)), markup=False)
        elif action is DashboardAction.resubmit:
            assert event_id is not None
            queue, attempt = run_admin(
                loaded, broker, connect_timeout, lambda admin: admin.resubmit(event_id, edited)
            )
            out.print(f"resubmitted {event_id} to {queue} as attempt {attempt}", markup=False)
        else:
            assert event_id is not None
            run_admin(loaded, broker, connect_timeout, lambda admin: admin.drop(event_id))
            out.print(f"dropped {event_id}", markup=False)
    except RunError as exc:
        _fail(str(exc), exc.code)


def _print_parked(records: list[dict[str, object]]) -> None:
    from rich.table import Table

    if not records:
        out.print("no parked events", markup=False)
        return
    table = Table(box=None, pad_edge=False)
    for column in ("id", "consumer", "queue", "attempts", "error"):
        table.add_column(column, overflow="fold")
    for record in records:
        table.add_row(
            *(redact_text(str(record.get(c, ""))) for c in ("id", "consumer", "queue", "attempts", "error"))
        )
    out.print(table)
    out.print(f"{len(records)} parked", markup=False)


@app.command()
def traces(
    path: Annotated[Path, typer.Argument(help="a traces file written by traces: file(path)")],
) -> None:
    """Print the traces of a file as trees with timings."""
    from .traces_view import render_traces

    try:
        render_traces(path, out)
    except ValueError as exc:
        _fail(str(exc), 2)


def main() -> None:
    try:
        app()
    except Exception as exc:  # a bug of ours: one line, the traceback only on request
        if os.environ.get("EDARUN_DEBUG"):
            raise
        err.print(
            f"edarun: internal error: {type(exc).__name__}: {redact_text(str(exc))} "
            "(set EDARUN_DEBUG=1 for the traceback)",
            markup=False,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
