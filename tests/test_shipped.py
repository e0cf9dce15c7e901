"""The shipped pipelines run, the docs' pipelines validate, and the generated reference is current."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import delete_queues

from runner.config.loader import load_pipeline
from runner.runtime.app import queues_of
from runner.runtime.dashboard import dashboard_queue

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))
DOC_PAGES = sorted((ROOT / "docs").rglob("*.md"))
_YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)


def edarun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize("pipeline", PIPELINES, ids=lambda p: p.name)
async def test_shipped_pipeline_runs_to_idle(pipeline: Path, tmp_path: Path, broker_url: str) -> None:
    assert edarun("validate", str(pipeline)).returncode == 0
    report = tmp_path / "report.json"
    args = ["up", str(pipeline), "--until-idle", "--report", str(report)]
    if broker_url != "memory":
        loaded = load_pipeline(pipeline)
        names = [*queues_of(loaded), *(dashboard_queue(c) for c in loaded.model.consumers)]
        await delete_queues(names)
        args += ["--broker", broker_url]
    result = await asyncio.to_thread(edarun, *args)
    if broker_url != "memory":
        await delete_queues(names)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(report.read_text())
    published = sum(p["published"] for p in data["producers"].values())
    assert published > 0
    for consumer in data["consumers"].values():
        assert consumer["restarts"] == 0


def _doc_pipelines() -> list[tuple[str, str]]:
    found = []
    for page in DOC_PAGES:
        for index, block in enumerate(_YAML_BLOCK.findall(page.read_text())):
            if re.search(r"^version:", block, re.MULTILINE):
                found.append((f"{page.relative_to(ROOT)}#{index}", block))
    return found


@pytest.mark.parametrize(("where", "text"), _doc_pipelines(), ids=[w for w, _ in _doc_pipelines()])
def test_doc_pipeline_validates(where: str, text: str) -> None:
    # Doc snippets are written as if they lived in pipelines/, next to the shipped ones.
    path = ROOT / "pipelines" / f".doc-{uuid.uuid4().hex}.yaml"
    path.write_text(text)
    try:
        result = edarun("validate", str(path))
    finally:
        path.unlink()
    assert result.returncode == 0, f"{where}: {result.stderr}"


def test_reference_is_generated_from_the_models() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_reference.py"), "--check"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
