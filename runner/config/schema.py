"""The JSON Schema of the pipeline file, from the models (editors, `edarun schema`, the docs).

It is written as draft 7, the draft every YAML editor's language server understands: the models'
definitions go under `definitions` (pydantic writes the newer `$defs`), and nothing of the later
drafts is used (a test validates every shipped pipeline against it with a draft 7 validator).
"""

from __future__ import annotations

from typing import Any

from .models import Pipeline

DRAFT_7 = "http://json-schema.org/draft-07/schema#"


def pipeline_schema() -> dict[str, Any]:
    schema = Pipeline.model_json_schema(
        by_alias=True, mode="validation", ref_template="#/definitions/{model}"
    )
    definitions = schema.pop("$defs", {})
    ordered: dict[str, Any] = {"$schema": DRAFT_7, "title": "edarun pipeline"}
    ordered.update({k: v for k, v in schema.items() if k != "title"})
    if definitions:
        ordered["definitions"] = definitions
    return ordered
