"""`edarun schema` (SPEC §4): the JSON Schema of the pipeline file, for editor completion."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.config.models import Policy
from runner.config.schema import pipeline_schema


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-m", "runner", "schema"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    parsed = json.loads(run.stdout)
    assert isinstance(parsed, dict)
    return parsed


def _properties(node: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (path, property schema) under `node`, however deeply nested."""
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict):
            for name, prop in properties.items():
                yield f"{path}/properties/{name}", prop
        for key, value in node.items():
            yield from _properties(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _properties(value, f"{path}/{index}")


def test_schema_command_prints_the_pipeline_schema(schema: dict[str, Any]) -> None:
    assert schema == json.loads(json.dumps(pipeline_schema()))
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["type"] == "object"
    assert {"version", "name", "broker", "producers", "consumers", "queues"} <= set(schema["properties"])
    assert set(schema["required"]) == {"version", "name"}


def test_every_property_has_a_description(schema: dict[str, Any]) -> None:
    found = list(_properties(schema))
    assert len(found) > 50
    missing = [path for path, prop in found if not str(prop.get("description", "")).strip()]
    assert missing == []


def test_every_definition_has_a_description(schema: dict[str, Any]) -> None:
    missing = [name for name, d in schema["definitions"].items() if not d.get("description")]
    assert missing == []


def test_consumer_keys_use_the_yaml_names(schema: dict[str, Any]) -> None:
    consumer = schema["definitions"]["Consumer"]
    assert "from" in consumer["properties"]
    assert "from_" not in consumer["properties"]
    assert {"from", "handler"} <= set(consumer["required"])
    assert consumer["additionalProperties"] is False


def _long_form(definition: dict[str, Any]) -> dict[str, Any]:
    return next(option for option in definition["anyOf"] if option.get("type") == "object")


@pytest.mark.parametrize(
    "name",
    [
        "Autoscale",
        "Ordering",
        "PriorityLane",
        "OnError",
        "FlowControl",
        "Source",
        "Dedupe",
        "Spread",
        "Traces",
    ],
)
def test_a_policy_accepts_its_compact_string_and_its_mapping(schema: dict[str, Any], name: str) -> None:
    """An editor using the schema must not flag `autoscale: depth/5 max 500` (SPEC §2)."""
    definition = schema["definitions"][name]
    kinds = [option.get("type") for option in definition["anyOf"]]
    assert "object" in kinds
    assert any(k == "string" or (isinstance(k, list) and "string" in k) for k in kinds)
    compact = next(option for option in definition["anyOf"] if option.get("type") != "object")
    assert compact["examples"] and "compact form" in compact["description"]
    assert _long_form(definition)["additionalProperties"] is False


def test_every_policy_model_is_in_the_schema(schema: dict[str, Any]) -> None:
    policies = {cls.__name__ for cls in Policy.__subclasses__()}
    assert policies <= set(schema["definitions"])
    for name in policies:
        assert "anyOf" in schema["definitions"][name], name


def test_durations_and_rates_may_be_written_with_units(schema: dict[str, Any]) -> None:
    every = _long_form(schema["definitions"]["Autoscale"])["properties"]["every"]
    assert {option["type"] for option in every["anyOf"]} == {"number", "string"}
    rate = schema["definitions"]["Producer"]["properties"]["rate"]
    assert "string" in json.dumps(rate) and "500/s" in json.dumps(rate)


def test_priority_lane_accepts_true(schema: dict[str, Any]) -> None:
    compact = schema["definitions"]["PriorityLane"]["anyOf"][0]
    assert "boolean" in compact["type"]


def test_the_schema_is_draft_7_and_every_shipped_pipeline_satisfies_it(schema: dict[str, Any]) -> None:
    """Editors (yaml-language-server) read draft 7: the schema must be one, and must accept what
    edarun accepts."""
    import yaml
    from jsonschema import Draft7Validator

    Draft7Validator.check_schema(schema)
    assert "$defs" not in json.dumps(schema)  # a draft 7 validator would not find those references
    validator = Draft7Validator(schema)
    root = Path(__file__).resolve().parents[2]
    for path in sorted((root / "pipelines").glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# yaml-language-server: $schema=../docs/pipeline.schema.json"), path
        errors = [e.message for e in validator.iter_errors(yaml.safe_load(text))]
        assert not errors, (path.name, errors[:3])
