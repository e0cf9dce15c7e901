"""The event source and the recording handler that every variant of `amqp_throughput.py` shares.

edarun loads this file as a plugin (the benchmark copies it next to the pipeline it writes); the
hand-written aio-pika and FastStream variants import it. Stdlib and orjson only.

- `stamped(path)` reads the JSONL events file and puts `sent_at` (time.time()) in each event at
  the moment it is taken, that is just before it is published (edarun pulls sources lazily, the
  hand-written producers take the next event once the confirm window has room).
- `Recorder.record(event)` is the handler's whole work: three appends (handler time, `sent_at`,
  id). The arrays are written once, when the process ends, with the CPU time the process used from
  its first handler call to then (`*.cpu`); producers write theirs from their first event on.
  CPU time per event holds up on a shared machine where wall-clock rates are noisy.
"""

from __future__ import annotations

import atexit
import os
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

EVENTS_ENV = "AMQP_BENCH_EVENTS"  # the JSONL file the edarun source reads
OUT_ENV = "AMQP_BENCH_OUT"  # the folder each edarun consumer process writes its records to


def stamped(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as lines:
        for line in lines:
            event = orjson.loads(line)
            event["sent_at"] = time.time()
            yield event


def write_cpu(path: str | Path, since: float) -> None:
    """The CPU time (user + system) this process used since `since` (a time.process_time())."""
    Path(path).write_text(str(time.process_time() - since))


class Recorder:
    __slots__ = ("cpu_start", "ids", "recv", "sent")

    def __init__(self) -> None:
        self.ids = array("q")
        self.sent = array("d")
        self.recv = array("d")
        self.cpu_start = 0.0

    def record(self, event: dict[str, Any]) -> None:
        if not self.ids:
            self.cpu_start = time.process_time()
        self.recv.append(time.time())
        self.sent.append(event["sent_at"])
        self.ids.append(event["id"])

    def __len__(self) -> int:
        return len(self.ids)

    def dump(self, path: str | Path) -> None:
        """Write the records (ids, then sent, then recv) and `path`.cpu; nothing when there are none."""
        if not self.ids:
            return
        with open(path, "wb") as out:
            self.ids.tofile(out)
            self.sent.tofile(out)
            self.recv.tofile(out)
        write_cpu(Path(path).with_suffix(".cpu"), self.cpu_start)


def cpu(folder: Path, pattern: str) -> float:
    """The CPU seconds that the processes of one run wrote into `folder` (files `pattern`)."""
    return sum(float(file.read_text()) for file in folder.glob(pattern))


def load(folder: Path) -> Recorder:
    """Every record the processes of one run wrote into `folder`, merged."""
    merged = Recorder()
    for file in sorted(folder.glob("*.bin")):
        data = file.read_bytes()
        count = len(data) // 24
        ids, sent, recv = array("q"), array("d"), array("d")
        ids.frombytes(data[: 8 * count])
        sent.frombytes(data[8 * count : 16 * count])
        recv.frombytes(data[16 * count :])
        merged.ids.extend(ids)
        merged.sent.extend(sent)
        merged.recv.extend(recv)
    return merged


# -- the edarun side: a `module:function` source and an async handler -----------------------------

_recorder = Recorder()
_source_cpu: float | None = None
_redelivered = 0


def source() -> Iterator[dict[str, Any]]:
    global _source_cpu
    _source_cpu = time.process_time()
    yield from stamped(os.environ[EVENTS_ENV])


async def record(event: dict[str, Any], ctx: Any) -> None:
    global _redelivered
    _recorder.record(event)
    if ctx.redelivered:
        _redelivered += 1


def _dump_at_exit() -> None:
    # The supervisor stops a consumer with SIGTERM at idle; it drains and the interpreter exits
    # normally, so atexit runs (the benchmark fails loudly if records are missing).
    out = os.environ.get(OUT_ENV)
    if out:
        _recorder.dump(Path(out) / f"{os.getpid()}.bin")
        if _recorder.ids:
            (Path(out) / f"{os.getpid()}.redelivered").write_text(str(_redelivered))
        if _source_cpu is not None:
            write_cpu(Path(out) / f"{os.getpid()}.producer-cpu", _source_cpu)


atexit.register(_dump_at_exit)
