"""The stack's worker processes: how each one runs (:class:`Worker`, :data:`WORKERS`), with what environment,
and when it counts as ready."""

from __future__ import annotations

import os
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from boltstream.infra.common.config import ENV_PREFIX, TRACER_ENV, Settings, secret_environment
from boltstream.infra.stack.errors import StackError
from boltstream.infra.stack.processes import ProcessRecord


@dataclass(frozen=True)
class Worker:
    """How to run one worker process of the stack.

    ``argv`` and ``ready_url`` may use the placeholders ``{python}`` (this interpreter) and ``{read_port}``
    (the port of the stack's ClickHouse read endpoint). No secret goes into ``argv``, which every user
    of the machine can read: the workers find the read token in the stack's private settings file. The
    worker is ready when ``ready_url`` answers 200, or, without one, when it is still alive ``settle``
    seconds after it started.
    """

    argv: tuple[str, ...]
    ready_url: str = ""
    settle: float = 1.0
    #: Arguments that make this worker serve the embedded store's read-only ClickHouse HTTP endpoint on
    #: ``{read_port}`` (and ``ready_url`` then waits for it). With a ClickHouse server as the archive
    #: both are left out: readers use the server's own HTTP port.
    read_args: tuple[str, ...] = ()

    @property
    def serves_reads(self) -> bool:
        return bool(self.read_args)

    def writing_to_a_server(self) -> Worker:
        """This worker as it runs when the archive is a ClickHouse server: no read endpoint to serve."""
        if not self.read_args:
            return self
        return replace(self, read_args=(), ready_url="")


#: The workers ``boltstream up`` starts, by name; each is a ``boltstream`` command in the foreground.
WORKERS: dict[str, Worker] = {
    "archive": Worker(
        argv=("{python}", "-m", "boltstream.infra.cli", "archive"),
        read_args=("--read-port", "{read_port}"),
        ready_url="http://127.0.0.1:{read_port}/ping",
    ),
    # The reward/trajectory join; its metrics: stream_processors.join.join_metrics_urls(settings), join_status(url).
    "join": Worker(argv=("{python}", "-m", "boltstream.infra.cli", "join"), settle=2.0),
}


def worker_environment(settings: Settings, config_path: Path) -> dict[str, str]:
    """The environment of the workers of a stack under ``settings.home`` whose settings are in ``config_path``."""
    # The workers read exactly the stack's settings from the snapshot file; inherited BOLTSTREAM_*
    # variables would override it (e.g. a partition count that `up --partitions` changed). The file holds
    # no secrets: those come by the environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != TRACER_ENV}
    env.update(
        secret_environment(settings),
        BOLTSTREAM_HOME=str(settings.home),
        BOLTSTREAM_CONFIG=str(config_path),
        PYTHONUNBUFFERED="1",  # logs show up as they are written
    )
    return env


def wait_ready(
    workers: Mapping[str, Worker], started: Mapping[str, ProcessRecord], fill: dict[str, str], timeout: float
) -> None:
    """Wait until every worker is ready (``fill`` fills the placeholders of its ``ready_url``).

    Raises :class:`StackError` with the end of its log when one exits, or when one is not ready after ``timeout``.
    """
    spawned = time.monotonic()
    pending = dict(workers)
    while pending:
        for name, worker in list(pending.items()):
            record = started[name]
            if not record.alive():
                raise StackError(f"worker {name} exited while starting; end of {record.log}:\n{tail(record.log)}")
            if worker.ready_url:
                ready = _answers(worker.ready_url.format(**fill))
            else:
                ready = time.monotonic() - spawned >= worker.settle
            if ready:
                del pending[name]
        if pending and time.monotonic() - spawned > timeout:
            logs = ", ".join(started[name].log for name in pending)
            raise StackError(f"worker(s) {', '.join(pending)} not ready after {timeout:.0f}s; see {logs}")
        if pending:
            time.sleep(0.1)


def _answers(url: str) -> bool:
    # Loopback only: never through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1.0) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
