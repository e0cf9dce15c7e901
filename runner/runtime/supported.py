"""Policies the pipeline file accepts whose runtime has not landed yet: refused before start, by name.

`validate` accepts them (the file format is complete); `up` says plainly which ones it cannot run,
rather than running the pipeline without them.
"""

from __future__ import annotations

from ..config.models import Pipeline


def unsupported(model: Pipeline) -> list[str]:
    problems: list[str] = []

    def refuse(where: str, what: str) -> None:
        problems.append(f"{where}: {what} is not supported by this version of edarun yet")

    for name, consumer in model.consumers.items():
        where = f"consumers.{name}"
        if consumer.watch:
            refuse(f"{where}.watch", "watch notification (pattern 4)")
    return problems
