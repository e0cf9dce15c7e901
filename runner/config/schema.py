"""The JSON Schema of the pipeline file, from the models (editors, `edarun schema`, the docs)."""

from __future__ import annotations

from typing import Any

from .models import Pipeline


def pipeline_schema() -> dict[str, Any]:
    schema = Pipeline.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edarun pipeline"
    return schema
