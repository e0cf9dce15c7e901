"""The edarun command line, driven as a user drives it: a subprocess per command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runner.traces_view import load_traces


def edarun(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def two_stage(factory, jsonl, count: int = 20, extra: str = "") -> Path:  # type: ignore[no-untyped-def]
    jsonl("events.jsonl", [{"n": i} for i in range(count)])
    mod = factory.module(
        "two",
        """
        def first(event, ctx):
            return {"n": event["n"], "stage": 2}

        async def second(event, ctx):
            return None
        """,
    )
    return factory.pipeline(
        f"""
        version: 1
        name: two-stage
        plugins: [plugins]
        {extra}
        producers:
          feed: {{source: file(events.jsonl), to: orders}}
        consumers:
          first: {{from: orders, handler: "{mod}:first", emit: confirmations}}
          second: {{from: confirmations, handler: "{mod}:second"}}
        """
    )


def test_up_until_idle_writes_report(factory, jsonl, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = two_stage(factory, jsonl)
    result = edarun("up", str(path), "--until-idle", "--report", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["producers"]["feed"] == {"published": 20, "rejected": 0}
    assert report["consumers"]["second"]["processed"] == 20
    assert "Traceback" not in result.stderr


def test_trace_file_joins_producer_and_consumer_spans(factory, jsonl, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = two_stage(factory, jsonl)
    traces = tmp_path / "traces.jsonl"
    result = edarun("up", str(path), "--until-idle", "--traces", f"file({traces})")
    assert result.returncode == 0, result.stderr
    found = load_traces(traces)
    assert len(found) == 20
    for spans in found.values():
        kinds = sorted(s["kind"] for s in spans)
        assert kinds.count(4) == 2 and kinds.count(5) == 2, kinds  # 2 PRODUCER, 2 CONSUMER
        by_id = {s["spanId"]: s for s in spans}
        roots = [s for s in spans if not s.get("parentSpanId")]
        assert len(roots) == 1 and roots[0]["name"] == "send orders"
        for span in spans:
            if span["kind"] == 5:  # each consumer span is the child of the producer span
                assert by_id[span["parentSpanId"]]["kind"] == 4
                assert span["attributes"]["messaging.operation.type"] == "process"
        emit = next(s for s in spans if s["name"] == "send confirmations")
        assert by_id[emit["parentSpanId"]]["name"] == "process orders"
    printed = edarun("traces", str(traces))
    assert printed.returncode == 0 and "process confirmations" in printed.stdout


def test_traces_setting_in_the_file_is_relative_to_it(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    path = two_stage(factory, jsonl, count=3, extra="telemetry: {traces: file(out/t.jsonl)}")
    result = edarun("up", str(path), "--until-idle", cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    assert len(load_traces(path.parent / "out" / "t.jsonl")) == 3


def test_sigterm_drains_and_reports(factory, jsonl, tmp_path) -> None:  # type: ignore[no-untyped-def]
    jsonl("events.jsonl", [{"n": i} for i in range(1000)])
    mod = factory.module(
        "slow",
        """
        import time

        def handle(event, ctx):
            time.sleep(0.02)
        """,
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: slow
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle", concurrency: 2}}
        """
    )
    report = tmp_path / "r.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "up", str(path), "--report", str(report)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "processed=" not in (proc.stderr.readline() or ""):
        pass
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    data = json.loads(report.read_text())
    assert data["outcome"] == "interrupted"
    assert 0 < data["consumers"]["worker"]["processed"] < 1000
    assert "Traceback" not in err


def test_unreachable_or_unsupported_broker_is_one_line(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    path = two_stage(factory, jsonl, count=1)
    result = edarun("up", str(path), "--broker", "amqp://bob:hunter2@127.0.0.1:1/", "--connect-timeout", "2")
    assert result.returncode == 1
    assert "hunter2" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_no_broker_of_several_answering_is_one_line(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    path = two_stage(factory, jsonl, count=1)
    brokers = 'brokers: ["amqp://bob:hunter2@127.0.0.1:1/", "amqp://bob:hunter2@127.0.0.1:2/"]'
    path.write_text(path.read_text().replace("plugins: [plugins]", f"plugins: [plugins]\n{brokers}"))
    result = edarun("up", str(path), "--connect-timeout", "2")
    assert result.returncode == 1
    assert "hunter2" not in result.stdout + result.stderr
    assert result.stderr.startswith("cannot reach the brokers amqp://bob:***@127.0.0.1:1/, amqp://bob:***@")
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_arguments_exit_2(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    path = two_stage(factory, jsonl, count=1)
    assert edarun("up", str(path), "--only", "nobody").returncode == 2
    assert edarun("up", str(path), "--traces", "sometimes").returncode == 2
    assert edarun("up", str(path), "--metrics", "prometheus(0)").returncode == 2
    assert edarun("up", str(path), "--broker", "redis://x").returncode == 2
    assert edarun("up", str(path), "--bogus-flag").returncode == 2
    sent = edarun("send", str(path), "orders", '{"n": 1}')
    assert sent.returncode == 2 and "memory broker" in sent.stderr


def test_up_gives_a_watching_consumer_its_config(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    jsonl("events.jsonl", [{"n": 1}])
    mod = factory.module(
        "h", "def handle(event, ctx):\n    print('limit is', ctx.config['limit'], flush=True)\n"
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: later
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: work}}
        consumers:
          worker: {{from: work, handler: "{mod}:handle", watch: [limit]}}
        config: {{limit: 5}}
        """
    )
    assert edarun("validate", str(path)).returncode == 0
    result = edarun("up", str(path), "--until-idle")
    assert result.returncode == 0, result.stderr
    assert "limit is 5" in result.stdout


def test_graph_schema_and_redaction(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    path = two_stage(factory, jsonl, count=1)
    text = path.read_text().replace(
        "plugins: [plugins]", "plugins: [plugins]\nbroker: amqp://bob:hunter2@rabbit:5672/"
    )
    path.write_text(text)
    mermaid = edarun("graph", str(path))
    assert mermaid.returncode == 0, mermaid.stderr
    assert mermaid.stdout.startswith("flowchart LR")
    for node in ("feed", "orders", "first", "confirmations", "second", "first.dashboard"):
        assert f'"{node}"' in mermaid.stdout
    assert "hunter2" not in mermaid.stdout and "bob:***@rabbit" in mermaid.stdout
    dot = edarun("graph", str(path), "--format", "dot")
    assert dot.returncode == 0 and dot.stdout.startswith('digraph "two-stage"')
    assert "q_orders -> c_first" in dot.stdout and "hunter2" not in dot.stdout
    validate = edarun("validate", str(path))
    assert "hunter2" not in validate.stdout + validate.stderr
    schema = json.loads(edarun("schema").stdout)
    assert "consumers" in schema["properties"]


async def test_send_publishes_one_event_on_rabbitmq(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import aio_pika
    from conftest import AMQP_URL, amqp_available, delete_queues

    amqp_available()
    path = two_stage(factory, jsonl, count=1)
    queue = "orders"
    await delete_queues([queue])
    try:
        sent = await asyncio.to_thread(edarun, "send", str(path), queue, '{"n": 42}', "--broker", AMQP_URL)
        assert sent.returncode == 0, sent.stderr
        message_id = sent.stdout.split()[1]
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            got = await (await channel.get_queue(queue)).get(timeout=5)
            assert json.loads(got.body) == {"n": 42}
            assert got.message_id == message_id
            assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            await got.ack()
        unknown = await asyncio.to_thread(edarun, "send", str(path), "nowhere", "{}", "--broker", AMQP_URL)
        assert unknown.returncode == 2 and "not named" in unknown.stderr
    finally:
        await delete_queues([queue])


def laned(factory, jsonl):  # type: ignore[no-untyped-def]
    jsonl("events.jsonl", [{"n": 1, "kind": "CANCEL"}])
    mod = factory.module("lanes", "def handle(event, ctx):\n    return None\n")
    return factory.pipeline(
        f"""
        version: 1
        name: laned
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: orders, priority: "when(n > 5)"}}
        consumers:
          worker:
            from: orders
            handler: "{mod}:handle"
            priority_lane: {{when: 'kind == "CANCEL"', mode: carpool, carpool: 2}}
        """
    )


def test_graph_shows_the_brokers_and_the_spread(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    path = two_stage(factory, jsonl, count=1)
    brokers = 'brokers: ["amqp://bob:hunter2@a:5672/", "amqp://bob:hunter2@b:5672/"]\nspread: by_context(n)'
    path.write_text(path.read_text().replace("plugins: [plugins]", f"plugins: [plugins]\n{brokers}"))
    mermaid = edarun("graph", str(path))
    assert mermaid.returncode == 0, mermaid.stderr
    assert 'subgraph brokers["every queue on each broker; spread: by_context(n)"]' in mermaid.stdout
    assert 'broker_1[("amqp://bob:***@b:5672/")]' in mermaid.stdout and "hunter2" not in mermaid.stdout
    dot = edarun("graph", str(path), "--format", "dot")
    assert 'broker_0 [label="amqp://bob:***@a:5672/", shape=box3d];' in dot.stdout
    assert "hunter2" not in dot.stdout


async def test_send_spreads_like_a_producer_over_the_brokers(  # type: ignore[no-untyped-def]
    factory, jsonl, second_node
) -> None:
    import asyncio

    import aio_pika
    from conftest import AMQP_URL, delete_queues

    path = two_stage(factory, jsonl, count=1)
    urls = [AMQP_URL, second_node.url]
    brokers = f"brokers: {json.dumps(urls)}\nspread: by_context(account)"
    path.write_text(path.read_text().replace("plugins: [plugins]", f"plugins: [plugins]\n{brokers}"))
    queue = "orders"
    for url in urls:
        await delete_queues([queue], url)
    try:
        for n in range(12):
            event = json.dumps({"n": n, "account": f"acct-{n % 6}"})
            sent = await asyncio.to_thread(edarun, "send", str(path), queue, event)
            assert sent.returncode == 0, sent.stderr
        accounts: list[set[str]] = []
        for url in urls:
            connection = await aio_pika.connect(url)
            async with connection:
                channel = await connection.channel()
                amqp_queue = await channel.get_queue(queue)
                seen = set()
                while (got := await amqp_queue.get(fail=False)) is not None:
                    seen.add(json.loads(got.body)["account"])
                accounts.append(seen)
        assert accounts[0] and accounts[1], accounts  # both brokers took some
        assert accounts[0].isdisjoint(accounts[1]) and len(accounts[0] | accounts[1]) == 6
    finally:
        for url in urls:
            await delete_queues([queue], url)


def test_graph_draws_the_priority_lane(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    path = laned(factory, jsonl)
    mermaid = edarun("graph", str(path))
    assert mermaid.returncode == 0, mermaid.stderr
    assert '"orders.priority"' in mermaid.stdout and "class q_orders_priority lane" in mermaid.stdout
    assert 'p_feed -- "kind == #quot;CANCEL#quot; or n > 5" --> q_orders_priority' in mermaid.stdout
    assert 'q_orders_priority -- "first (carpool x2)" --> c_worker' in mermaid.stdout
    dot = edarun("graph", str(path), "--format", "dot")
    assert 'p_feed -> q_orders_priority [label="kind == \\"CANCEL\\" or n > 5"];' in dot.stdout


async def test_send_puts_a_priority_event_in_the_lane(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    import aio_pika
    from conftest import AMQP_URL, amqp_available, delete_queues

    amqp_available()
    path = laned(factory, jsonl)
    queues = ["orders", "orders.priority"]
    await delete_queues(queues)
    try:

        def send(event: str, *flags: str) -> subprocess.CompletedProcess[str]:
            return edarun("send", str(path), "orders", event, "--broker", AMQP_URL, *flags)

        by_rule = await asyncio.to_thread(send, '{"kind": "CANCEL"}')
        assert by_rule.returncode == 0 and "to orders.priority" in by_rule.stdout, by_rule.stderr
        marked = await asyncio.to_thread(send, '{"kind": "PLACE"}', "--priority")
        assert marked.returncode == 0 and "to orders.priority" in marked.stdout, marked.stderr
        standard = await asyncio.to_thread(send, '{"kind": "PLACE"}')
        assert standard.returncode == 0 and standard.stdout.endswith("to orders\n"), standard.stdout
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            lane = await channel.declare_queue("orders.priority", passive=True)
            main = await channel.declare_queue("orders", passive=True)
            assert (lane.declaration_result.message_count, main.declaration_result.message_count) == (2, 1)
    finally:
        await delete_queues(queues)


def test_graph_draws_workflow_and_flow_control(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    jsonl("events.jsonl", [{"n": 1}])
    mod = factory.module(
        "drawn",
        "def handle(event, ctx):\n    return None\n\n\ndef repair(event, error, ctx):\n    return event\n",
    )
    path = factory.pipeline(
        f"""
        version: 1
        name: drawn
        plugins: [plugins]
        queues:
          orders: {{flow_control: upper 100 every 250ms}}
        producers:
          feed: {{source: file(events.jsonl), to: orders}}
        consumers:
          worker: {{from: orders, handler: "{mod}:handle", on_error: "workflow({mod}:repair)"}}
        """
    )
    mermaid = edarun("graph", str(path))
    assert mermaid.returncode == 0, mermaid.stderr
    for line in (
        'c_worker -- "failed" --> q_worker_workflow',
        'w_worker -- "repaired" --> q_orders',
        'w_worker -- "parked" --> q_worker_dashboard',
        'q_orders -- "depth every 0.25s" --> m_orders',
        'm_orders -- "slow above 100, resume at 50" --> x_orders',
        'x_orders -- "flow" --> p_feed',
    ):
        assert line in mermaid.stdout, line
    dot = edarun("graph", str(path), "--format", "dot")
    assert dot.returncode == 0, dot.stderr
    assert 'x_orders [label="orders.control", shape=hexagon];' in dot.stdout
    assert 'q_worker_workflow [label="worker.workflow", shape=cylinder];' in dot.stdout


def test_graph_draws_the_config_service_and_watch_queues(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    jsonl("events.jsonl", [{"n": 1}])
    mod = factory.module("watched", "def handle(event, ctx):\n    return None\n")
    path = factory.pipeline(
        f"""
        version: 1
        name: watched
        plugins: [plugins]
        config: {{max_order: 800, mode: open}}
        producers:
          feed: {{source: file(events.jsonl), to: orders}}
        consumers:
          limit: {{from: orders, handler: "{mod}:handle", watch: [max_order, mode]}}
        """
    )
    mermaid = edarun("graph", str(path))
    assert mermaid.returncode == 0, mermaid.stderr
    for line in (
        'q_watched_config -- "set / register" --> s_config',
        's_config -- "max_order, mode (versioned)" --> q_watched_limit_watch',
        'q_watched_limit_watch -- "ctx.config" --> c_limit',
    ):
        assert line in mermaid.stdout, line
    dot = edarun("graph", str(path), "--format", "dot")
    assert 'q_watched_limit_watch [label="watched.limit.watch", shape=cylinder];' in dot.stdout


def test_config_on_the_memory_broker_says_where_to_go(factory, jsonl) -> None:  # type: ignore[no-untyped-def]
    jsonl("events.jsonl", [{"n": 1}])
    mod = factory.module("cfgmem", "def handle(event, ctx):\n    return None\n")
    path = factory.pipeline(
        f"""
        version: 1
        name: cfgmem
        plugins: [plugins]
        config: {{limit: 1}}
        producers:
          feed: {{source: file(events.jsonl), to: orders}}
        consumers:
          c: {{from: orders, handler: "{mod}:handle", watch: [limit]}}
        """
    )
    result = edarun("config", str(path), "set", "limit", "2")
    assert result.returncode == 2
    assert "memory broker" in result.stderr and "cfgmem.config" in result.stderr
    assert "Traceback" not in result.stderr
    assert edarun("config", str(path), "set", "limit").returncode == 2  # no VALUE


def test_graph_draws_svg_and_png_with_graphviz(factory, jsonl, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import shutil

    jsonl("events.jsonl", [{"n": 1}])
    mod = factory.module("drawn_svg", "def handle(event, ctx):\n    return None\n")
    path = factory.pipeline(
        f"""
        version: 1
        name: drawn-svg
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: orders}}
        consumers:
          worker: {{from: orders, handler: "{mod}:handle"}}
        """
    )
    svg = tmp_path / "graph.svg"
    result = edarun("graph", str(path), "--format", "svg", "--output", str(svg))
    if shutil.which("dot") is None:
        # Without Graphviz: one line that says what to install, and mermaid still works.
        assert result.returncode == 1 and "Graphviz" in result.stderr and "Traceback" not in result.stderr
        return
    assert result.returncode == 0, result.stderr
    assert svg.read_text().lstrip().startswith(("<?xml", "<svg")) and "orders" in svg.read_text()
    png = tmp_path / "graph.png"
    assert edarun("graph", str(path), "--format", "png", "-o", str(png)).returncode == 0
    assert png.read_bytes().startswith(b"\x89PNG")


def test_graph_without_graphviz_says_so(factory, jsonl, tmp_path) -> None:  # type: ignore[no-untyped-def]
    jsonl("events.jsonl", [{"n": 1}])
    mod = factory.module("drawn_nodot", "def handle(event, ctx):\n    return None\n")
    path = factory.pipeline(
        f"""
        version: 1
        name: drawn-nodot
        plugins: [plugins]
        producers:
          feed: {{source: file(events.jsonl), to: orders}}
        consumers:
          worker: {{from: orders, handler: "{mod}:handle"}}
        """
    )
    env = {**os.environ, "PATH": str(tmp_path)}  # no `dot` here
    result = subprocess.run(
        [sys.executable, "-m", "runner", "graph", str(path), "--format", "svg"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "needs Graphviz" in result.stderr and "Traceback" not in result.stderr
