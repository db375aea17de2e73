"""What the SDK fault scenarios share: a private broker and archive (the scenarios stop the broker, which no
other test may see), agent traffic with known event ids, and what the archive holds of it."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from boltstream.infra.common.config import Settings
from boltstream.infra.stack.broker import EmbeddedBroker
from boltstream.schemas.codec import codec
from tests.conftest import ArchiveProcess, archive_process, isolated_settings


@dataclass
class PrivateStack:
    broker: EmbeddedBroker
    settings: Settings
    archive: ArchiveProcess
    stopped: bool = False

    def stall(self) -> None:
        """SIGSTOP the broker: connections stay open and nothing answers (a hung broker, a long GC pause)."""
        os.kill(self.broker.process.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        os.kill(self.broker.process.pid, signal.SIGCONT)
        self.stopped = False


@contextlib.contextmanager
def private_stack(tmp_path: Path) -> Iterator[PrivateStack]:
    """A broker of this test alone, its topics, and the archive worker (a real process) on it."""
    broker = EmbeddedBroker(log_path=tmp_path / "broker.log").start()
    stack = None
    try:
        settings = isolated_settings(broker, tmp_path)
        archive = archive_process(settings, tmp_path / "archive.log")
        stack = PrivateStack(broker, settings, archive)
        archive.start()
        yield stack
    finally:
        if stack is not None:
            if stack.stopped:
                stack.resume()
            stack.archive.stop()
        broker.stop()


@dataclass
class Acknowledgements:
    """Event ids of the spans the broker acknowledged to this process's SDK (an ``on_delivery`` listener)."""

    spans_topic: str
    ids: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._codec = codec("SpanBatch")

    def __call__(self, topic: str, value: bytes, error: object) -> None:
        if error is None and topic == self.spans_topic:
            self.ids.update(span["event_id"] for span in self._codec.decode(value)["spans"])


def thread_cpu_seconds(native_id: int) -> float:
    """CPU time a thread of this process used so far (user and system)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def archived(archive: ArchiveProcess, expected: set[str], timeout: float = 180.0) -> tuple[set[str], int]:
    """The event ids of ``expected`` that the archive's deduplicated ``spans`` view holds, once it holds them
    all or ``timeout`` ran out; and how many rows the view counts twice."""
    reader = archive.client()
    deadline = time.monotonic() + timeout
    while True:
        found = {row[0] for row in reader.query("SELECT event_id FROM spans").result_rows} & expected
        if found == expected or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    rows, distinct = reader.query("SELECT count(), uniqExact(event_id) FROM spans").result_rows[0]
    return found, rows - distinct
