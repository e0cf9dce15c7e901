"""A service's counters in a memory-mapped file its supervisor can read even after a `kill -9`.

The JSON lines a service prints every few hundred milliseconds miss whatever happened after the
last one when the process is killed. These counters are written before each acknowledgement leaves
(and after each confirm), into pages the kernel keeps when the process dies, so the report never
counts fewer handler calls than were acknowledged.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path
from typing import Any

FIELDS = (
    "processed", "priority", "failed", "retried", "repaired", "parked", "received", "duplicates", "restarts",
    "published", "rejected", "confirmed", "delayed",
)  # fmt: skip
_LAYOUT = struct.Struct(f"<{len(FIELDS)}q")


class SharedCounters:
    """The writing side, in the service process."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, _LAYOUT.size)
            self._map = mmap.mmap(fd, _LAYOUT.size)
        finally:
            os.close(fd)

    def write(self, *stats: Any) -> None:
        values = [0] * len(FIELDS)
        for source in stats:
            for index, name in enumerate(FIELDS):
                value = getattr(source, name, None)
                if value is not None:
                    values[index] = value
        _LAYOUT.pack_into(self._map, 0, *values)


def read_counters(path: Path) -> dict[str, int]:
    """The reading side, in the supervisor: the last values written, or {} when there are none."""
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    if len(data) < _LAYOUT.size:
        return {}
    return dict(zip(FIELDS, _LAYOUT.unpack_from(data), strict=True))
