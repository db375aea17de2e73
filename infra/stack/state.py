"""What a local stack is recorded as under ``<home>``, and the lock that lets one ``up`` or ``down`` run at a time.

Three files: ``stack.json``, the :class:`StackState` (what runs where; the configuration loader reads it
to point clients at the stack), ``stack.toml``, the settings the workers run with, and ``stack.lock``;
and the folder ``processes/``, one small file per process started (:func:`register`), so that ``down --force``
still finds every process when ``stack.json`` is damaged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import Settings, settings_toml
from boltstream.infra.stack.errors import CorruptStateError
from boltstream.infra.stack.processes import ProcessRecord

STATE_VERSION = 1


@dataclass(frozen=True)
class StackState:
    """What a local stack runs; persisted as ``<home>/stack.json`` (keys read by boltstream.infra.common.config)."""

    home: str
    started_at: str
    bootstrap_servers: str
    broker_port: int
    broker: ProcessRecord
    workers: dict[str, ProcessRecord]
    topics: dict[str, int]
    #: ``http://reader:TOKEN@127.0.0.1:PORT`` when a worker serves reads, else "".
    clickhouse_read_url: str
    read_port: int
    #: The embedded chDB data directory; "" when the archive writes to a ClickHouse server.
    data_dir: str
    #: The process that restarts exited parts (``stack.supervise``); None when supervision is off.
    supervisor: ProcessRecord | None = None
    #: How many times the supervisor restarted each part ("broker" or a worker's name).
    restarts: dict[str, int] = field(default_factory=dict)
    #: The cluster id of this start of the broker (a restart after a crash gets another one).
    cluster_id: str = ""

    def processes(self) -> dict[str, ProcessRecord]:
        """The broker and the workers (the parts a supervisor keeps running)."""
        return {"broker": self.broker, **self.workers}

    def alive(self) -> dict[str, bool]:
        return {name: record.alive() for name, record in self.processes().items()}

    def running(self) -> bool:
        """Whether any of its processes still runs (a stack with only dead processes is stale)."""
        return any(self.alive().values()) or (self.supervisor is not None and self.supervisor.alive())

    def all_processes(self) -> list[ProcessRecord]:
        """Every process of the stack, the supervisor first (stopping it first keeps it from restarting the rest)."""
        return [*([self.supervisor] if self.supervisor else []), *self.workers.values(), self.broker]

    def describe(self, show_dead: bool = True) -> str:
        """``broker 127.0.0.1:PORT (pid N), archive (pid M)``, marking exited processes."""
        alive = self.alive() if show_dead else dict.fromkeys(self.processes(), True)
        parts = [f"broker {self.bootstrap_servers} (pid {self.broker.pid}{'' if alive['broker'] else ', dead'})"]
        parts += [f"{n} (pid {r.pid}{'' if alive[n] else ', dead'})" for n, r in self.workers.items()]
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StackState:
        def record(values: dict[str, Any]) -> ProcessRecord:
            return ProcessRecord(**{**values, "argv": tuple(values["argv"])})

        values = dict(data)
        if values.pop("version", None) != STATE_VERSION:
            raise ValueError(f"state version {data.get('version')!r}, expected {STATE_VERSION}")
        values["broker"] = record(values["broker"])
        values["workers"] = {name: record(r) for name, r in values["workers"].items()}
        if values.get("supervisor") is not None:
            values["supervisor"] = record(values["supervisor"])
        return cls(**values)


def read_state(settings: Settings) -> StackState | None:
    """The stack recorded under ``settings.home``, or None if none was started (running or not)."""
    path = settings.state_file
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return StackState.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStateError(
            f"{path} is not a readable stack state file ({exc}); `boltstream down --force` stops every "
            "process this home started and removes it"
        ) from None


def write_state(settings: Settings, state: StackState) -> None:
    """Record ``state`` as ``<home>/stack.json``."""
    _write_private(settings.state_file, json.dumps(state.to_json(), indent=2) + "\n")


def write_worker_settings(settings: Settings, worker_settings: Settings) -> Path:
    """Write ``worker_settings`` as ``<home>/stack.toml`` for the workers to load; return its path."""
    return _write_private(_worker_settings_file(settings), settings_toml(worker_settings))


def forget(settings: Settings) -> None:
    """Remove the stack's state file, worker settings and process registry: no stack is recorded any more."""
    for path in (settings.state_file, _worker_settings_file(settings)):
        path.unlink(missing_ok=True)
    for path in _registry(settings).glob("*.json"):
        path.unlink(missing_ok=True)


def register(settings: Settings, name: str, record: ProcessRecord) -> ProcessRecord:
    """Note ``record`` in ``<home>/processes/`` (apart from ``stack.json``, which may be lost or damaged); return it."""
    folder = _registry(settings)
    folder.mkdir(mode=0o700, exist_ok=True)
    _write_private(folder / f"{name}-{record.pid}.json", json.dumps(asdict(record)) + "\n")
    return record


def registered(settings: Settings) -> list[tuple[str, ProcessRecord]]:
    """``(part, record)`` of every process noted by :func:`register` since the stack was last forgotten.
    Files that do not parse are skipped: a process is only signalled on a record that names it exactly."""
    records = []
    for path in sorted(_registry(settings).glob("*.json")):
        try:
            values = json.loads(path.read_text())
            record = ProcessRecord(**{**values, "argv": tuple(values["argv"])})
        except (OSError, ValueError, KeyError, TypeError):
            continue
        records.append((path.stem.rsplit("-", 1)[0], record))
    return records


def _registry(settings: Settings) -> Path:
    return settings.home / "processes"


def remember_broker_port(settings: Settings, port: int) -> None:
    """Record the broker's port, kept after ``down`` so the next ``up`` takes it again when it is free."""
    _write_private(_broker_port_file(settings), f"{port}\n")


def previous_broker_port(settings: Settings) -> int:
    """The port the last broker of this home listened on, or 0."""
    try:
        return int(_broker_port_file(settings).read_text())
    except (OSError, ValueError):
        return 0


def _broker_port_file(settings: Settings) -> Path:
    return settings.home / "broker-port"


def _worker_settings_file(settings: Settings) -> Path:
    return settings.home / "stack.toml"


def _write_private(path: Path, text: str) -> Path:
    """Write ``text`` atomically, readable by the owner only (the file may hold tokens)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
    os.replace(temporary, path)
    return path


@contextlib.contextmanager
def locked(settings: Settings) -> Iterator[None]:
    """One ``up``, ``down`` or restart at a time per home."""
    settings.home.mkdir(parents=True, exist_ok=True)
    with (settings.home / "stack.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def locked_if_free(settings: Settings) -> Iterator[bool]:
    """Like :func:`locked`, without waiting: yields False (and holds nothing) when an ``up`` or ``down`` holds it."""
    with (settings.home / "stack.lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
