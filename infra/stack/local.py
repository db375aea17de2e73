"""The local stack: the processes ``boltstream up`` starts on one machine, and ``status`` / ``down``.

It owns the embedded broker process (Tansu), the topics of DESIGN.md on it, the worker processes of
:data:`WORKERS` (the archive worker owns the chDB store and serves reads over loopback HTTP), and two
files under ``<home>``: ``stack.json``, what runs where (read back by the configuration loader to point clients
at the stack), and ``stack.toml``, the settings the workers run with. Every process is detached (its
own session, its log in ``<home>/logs``), so the stack outlives the command that started it and is
stopped by pid.

Python API: :func:`start_stack`, :func:`stop_stack`, :func:`read_state`, :func:`stack_status` and
:func:`boltstream.infra.common.topics.ensure_topics` creates the topics.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from boltstream.infra.common.config import ENV_PREFIX, TRACER_ENV, Settings, settings_toml
from boltstream.infra.common.ports import free_port, port_in_use
from boltstream.infra.common.topics import TopicError, admin_client, ensure_topics
from boltstream.infra.stack.broker import BrokerError, EmbeddedBroker

STATE_VERSION = 1
READ_USER = "reader"
#: Tansu 0.6 answers ListOffsets(latest) with the first offset of a partition's last record batch + 1.
TANSU_LAG_NOTE = (
    "Tansu reports a partition's end as the first offset of its last record batch + 1, "
    "so lag can read up to one producer batch low"
)


class StackError(RuntimeError):
    """The local stack could not be started, reached or stopped; the message says why."""


class StackRunningError(StackError):
    """A stack already runs under this home; ``state`` is what it runs."""

    def __init__(self, state: StackState):
        super().__init__(f"the local stack is already running: {state.describe()}")
        self.state = state


@dataclass(frozen=True)
class Worker:
    """How to run one worker process of the stack.

    ``argv`` and ``ready_url`` may use the placeholders ``{python}`` (this interpreter), ``{read_port}``
    and ``{read_token}`` (the stack's ClickHouse read endpoint). The worker is ready when ``ready_url``
    answers 200, or, without one, when it is still alive ``settle`` seconds after it started.
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
        read_args=("--read-port", "{read_port}", "--read-token={read_token}"),
        ready_url="http://127.0.0.1:{read_port}/ping",
    ),
    # The reward/trajectory join; its metrics: stream_processors.join.join_metrics_urls(settings), join_status(url).
    "join": Worker(argv=("{python}", "-m", "boltstream.infra.cli", "join"), settle=2.0),
}


# -- processes -------------------------------------------------------------------------------

#: Processes this interpreter started, kept so stopping them from here also reaps them (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


_PROCFS = Path("/proc/self/stat").exists()


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 and on of ``/proc/<pid>/stat`` (state, ppid, ...), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; the fields after the last ")" are plain.
    return stat.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None without procfs."""
    stat = _proc_stat(pid) if _PROCFS else None
    return int(stat[19]) if stat else None


def process_alive(pid: int, start_ticks: int | None = None) -> bool:
    """Whether ``pid`` runs and, when ``start_ticks`` is known, is still the process that was started."""
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        del _CHILDREN[pid]
        return False
    if _PROCFS:
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):  # gone, or exited and waiting for its parent to reap it
            return False
        return start_ticks is None or int(stat[19]) == start_ticks
    try:  # no procfs: signal 0 tells existence, not identity
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class ProcessRecord:
    """One process of the stack: enough to find it again and to tell it from a reused pid."""

    pid: int
    argv: tuple[str, ...]
    log: str
    start_ticks: int | None

    def alive(self) -> bool:
        return process_alive(self.pid, self.start_ticks)


def _adopt(process: subprocess.Popen, log: Path) -> ProcessRecord:
    _CHILDREN[process.pid] = process
    return ProcessRecord(process.pid, tuple(str(a) for a in process.args), str(log), _start_ticks(process.pid))


def _spawn(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> ProcessRecord:
    with log.open("ab") as handle:
        process = subprocess.Popen(
            argv,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,  # no terminal, no Ctrl-C from the shell that ran `up`
        )
    return _adopt(process, log)


def _signal(record: ProcessRecord, signum: int) -> None:
    try:
        # Each process leads its own session, so signalling the group also reaches anything it spawned.
        if os.getpgid(record.pid) == record.pid:
            os.killpg(record.pid, signum)
        else:
            os.kill(record.pid, signum)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        raise StackError(f"not allowed to stop pid {record.pid} ({' '.join(record.argv[:4])}): {exc}") from None


def _wait_gone(records: list[ProcessRecord], timeout: float) -> list[ProcessRecord]:
    deadline = time.monotonic() + timeout
    while records and time.monotonic() < deadline:
        time.sleep(0.05)
        records = [r for r in records if r.alive()]
    return records


def _stop_processes(records: Iterable[ProcessRecord], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL whatever is left."""
    running = [r for r in records if r.alive()]
    for record in running:
        _signal(record, signal.SIGTERM)
    running = _wait_gone(running, timeout)
    for record in running:
        _signal(record, signal.SIGKILL)
    stuck = _wait_gone(running, 5.0)
    if stuck:
        raise StackError(f"pid(s) {', '.join(str(r.pid) for r in stuck)} survived SIGKILL")


# -- state -----------------------------------------------------------------------------------


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

    def processes(self) -> dict[str, ProcessRecord]:
        return {"broker": self.broker, **self.workers}

    def alive(self) -> dict[str, bool]:
        return {name: record.alive() for name, record in self.processes().items()}

    def running(self) -> bool:
        """Whether any of its processes still runs (a stack with only dead processes is stale)."""
        return any(self.alive().values())

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
        raise StackError(
            f"{path} is not a readable stack state file ({exc}); stop any leftover processes and remove it"
        ) from None


def _write_private(path: Path, text: str) -> Path:
    """Write ``text`` atomically, readable by the owner only (the file may hold tokens)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)
    os.replace(temporary, path)
    return path


def _forget(settings: Settings) -> None:
    for path in (settings.state_file, _worker_config_path(settings)):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[None]:
    """One ``up`` or ``down`` at a time per home."""
    settings.home.mkdir(parents=True, exist_ok=True)
    with (settings.home / "stack.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# -- worker settings -------------------------------------------------------------------------


def _worker_config_path(settings: Settings) -> Path:
    return settings.home / "stack.toml"


def _worker_environment(settings: Settings, config_path: Path) -> dict[str, str]:
    # The workers read exactly the stack's settings from the snapshot file; inherited BOLTSTREAM_*
    # variables would override it (e.g. a partition count that `up --partitions` changed).
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != TRACER_ENV}
    env.update(
        BOLTSTREAM_HOME=str(settings.home),
        BOLTSTREAM_CONFIG=str(config_path),
        PYTHONUNBUFFERED="1",  # logs show up as they are written
    )
    return env


# -- start / stop ----------------------------------------------------------------------------


def _answers(url: str) -> bool:
    # Loopback only: never through a proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1.0) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(
    workers: Mapping[str, Worker], started: Mapping[str, ProcessRecord], fill: dict[str, str], timeout: float
) -> None:
    spawned = time.monotonic()
    pending = dict(workers)
    while pending:
        for name, worker in list(pending.items()):
            record = started[name]
            if not record.alive():
                raise StackError(f"worker {name} exited while starting; end of {record.log}:\n{_tail(record.log)}")
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


def start_stack(
    settings: Settings,
    *,
    port: int = 0,
    workers: Mapping[str, Worker] | None = None,
    timeout: float = 60.0,
) -> StackState:
    """Start the broker, create the topics, start the workers, record them; return what runs.

    ``port`` is the broker's loopback port (0 = a free one); ``workers`` replaces :data:`WORKERS`;
    ``timeout`` bounds the wait for the workers to be ready. The read endpoint's token is
    ``clickhouse.read_token``, or a random one. Raises :class:`StackRunningError` if a stack already
    runs under ``settings.home``, :class:`BrokerError` if the port is taken, and :class:`StackError`
    if a part does not come up; then nothing started here is left running.
    A state file whose processes are all dead is stale: it is replaced.
    """
    workers = WORKERS if workers is None else workers
    with _locked(settings):
        previous = read_state(settings)
        if previous is not None:
            if previous.running():
                raise StackRunningError(previous)
            _forget(settings)
        embedded = settings.archive_url.startswith("chdb://")
        if not embedded:
            workers = {name: worker.writing_to_a_server() for name, worker in workers.items()}
        serves_reads = any(worker.serves_reads for worker in workers.values())
        read_port = settings.clickhouse.read_port
        if read_port and (read_port == port or port_in_use(read_port)):
            raise StackError(f"read port {read_port} on 127.0.0.1 is already in use; pick another or use 0")
        logs = settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        broker = EmbeddedBroker(port=port, log_path=logs / "broker.log").start(timeout=min(timeout, 15.0))
        started = {"broker": _adopt(broker.process, logs / "broker.log")}
        try:
            # Chosen once the broker listens, so a free port cannot turn out to be the broker's.
            read_port = read_port or free_port()
            token = settings.clickhouse.read_token or secrets.token_hex(24)
            fill = {"python": sys.executable, "read_port": str(read_port), "read_token": token}
            if serves_reads:
                read_url = f"http://{READ_USER}:{quote(token, safe='')}@127.0.0.1:{read_port}"
            else:  # readers of a ClickHouse server use it directly (or the reader URL configured for it)
                read_url = "" if embedded else settings.clickhouse.read_url or settings.archive_url
            stack_settings = replace(
                settings,
                kafka=replace(settings.kafka, bootstrap_servers=broker.bootstrap_servers),
                clickhouse=replace(settings.clickhouse, read_url=read_url, read_port=read_port, read_token=token),
            )
            try:
                topics = ensure_topics(stack_settings, timeout=min(timeout, 15.0))
            except TopicError as exc:
                raise StackError(str(exc)) from None
            config_path = _write_private(_worker_config_path(settings), settings_toml(stack_settings))
            env = _worker_environment(stack_settings, config_path)
            for name, worker in workers.items():
                argv = [part.format(**fill) for part in (*worker.argv, *worker.read_args)]
                started[name] = _spawn(argv, logs / f"{name}.log", env, settings.home)
            _wait_ready(workers, started, fill, timeout)
            archive_url = settings.archive_url
            state = StackState(
                home=str(settings.home),
                started_at=datetime.now(UTC).isoformat(timespec="seconds"),
                bootstrap_servers=broker.bootstrap_servers,
                broker_port=broker.port,
                broker=started.pop("broker"),
                workers=started,
                topics=topics,
                clickhouse_read_url=read_url,
                read_port=read_port,
                data_dir=archive_url.removeprefix("chdb://") if archive_url.startswith("chdb://") else "",
            )
            _write_private(settings.state_file, json.dumps(state.to_json(), indent=2) + "\n")
            return state
        except BaseException:
            broker_record = started.pop("broker", None)
            _stop_processes(started.values(), timeout=5.0)
            if broker_record is not None:
                _stop_processes([broker_record], timeout=5.0)
            _forget(settings)
            raise


def stop_stack(settings: Settings, timeout: float = 10.0) -> StackState | None:
    """Stop the workers, then the broker (SIGTERM; SIGKILL after ``timeout`` s), and forget the stack.

    Returns the state of the stack that was recorded, or None if there was none.
    """
    with _locked(settings):
        state = read_state(settings)
        if state is None:
            return None
        _stop_processes(state.workers.values(), timeout)  # workers first: they flush to the broker
        _stop_processes([state.broker], timeout)
        _forget(settings)
        return state


# -- status ----------------------------------------------------------------------------------


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}:{parts.port}"))


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reachable(bootstrap_servers: str, timeout: float) -> bool:
    host, _, port = bootstrap_servers.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _kafka_status(settings: Settings, report: dict[str, Any], timeout: float) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import ConfigResource, ResourceType

    admin = admin_client(settings)
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        report["notes"].append(f"broker does not answer metadata requests: {exc.args[0].str()}")
        return
    report["broker"]["reachable"] = True
    names = sorted(name for name in metadata.topics if not name.startswith("__"))
    topics = {name: {"partitions": len(metadata.topics[name].partitions), "compacted": False} for name in names}
    report["topics"] = topics
    report["missing_topics"] = sorted(set(settings.topics.all()) - set(topics))
    try:
        resources = [ConfigResource(ResourceType.TOPIC, name) for name in names]
        configs = admin.describe_configs(resources, request_timeout=timeout) if resources else {}
        for resource, future in configs.items():
            policy = future.result().get("cleanup.policy")
            topics[resource.name]["compacted"] = policy is not None and "compact" in (policy.value or "")
    except KafkaException as exc:
        report["notes"].append(f"topic configs unavailable: {exc.args[0].str()}")

    try:
        report["consumer_groups"] = _consumer_lag(admin, metadata, timeout)
    except KafkaException as exc:
        report["notes"].append(f"consumer group lag unavailable: {exc.args[0].str()}")
        return
    if any(group["lag"] is not None for group in report["consumer_groups"].values()):
        report["notes"].append(TANSU_LAG_NOTE)


def _consumer_lag(admin: Any, metadata: Any, timeout: float) -> dict[str, dict[str, Any]]:
    """Per group: messages not yet committed, per topic it committed on (every partition counts;
    one never committed counts from its start). ``lag`` is None while a group has no commits."""
    from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    groups = sorted(g.group_id for g in admin.list_consumer_groups(request_timeout=timeout).result().valid)
    committed: dict[str, dict[tuple[str, int], int]] = {}
    for group in groups:  # the admin API takes one group per request
        request = [ConsumerGroupTopicPartitions(group)]
        offsets = admin.list_consumer_group_offsets(request, request_timeout=timeout)[group].result()
        committed[group] = {(tp.topic, tp.partition): tp.offset for tp in offsets.topic_partitions if tp.offset >= 0}
    topics = {topic for offsets in committed.values() for topic, _ in offsets if topic in metadata.topics}
    partitions = [TopicPartition(topic, p) for topic in sorted(topics) for p in metadata.topics[topic].partitions]
    bounds: dict[str, dict[tuple[str, int], int]] = {"start": {}, "end": {}}
    for bound, spec in (("start", OffsetSpec.earliest()), ("end", OffsetSpec.latest())):
        if partitions:
            for tp, future in admin.list_offsets({tp: spec for tp in partitions}, request_timeout=timeout).items():
                bounds[bound][(tp.topic, tp.partition)] = future.result().offset
    lag: dict[str, dict[str, Any]] = {}
    for group, offsets in committed.items():
        per_topic: dict[str, int] = {}
        for topic in sorted({topic for topic, _ in offsets if topic in topics}):
            per_topic[topic] = sum(
                max(0, bounds["end"][(topic, p)] - offsets.get((topic, p), bounds["start"][(topic, p)]))
                for p in metadata.topics[topic].partitions
            )
        lag[group] = {"lag": sum(per_topic.values()) if per_topic else None, "topics": per_topic}
    return lag


def _serving_status(settings: Settings, report: dict[str, Any], timeout: float) -> None:
    """What each vLLM replica serves and the canary state (serving.serve), when serving topics exist."""
    from confluent_kafka import KafkaException

    from boltstream.infra.serving.serve import serving_status

    if settings.topics.served_versions not in report["topics"]:
        return
    try:
        report["serving"] = serving_status(settings, timeout)
    except (KafkaException, RuntimeError) as exc:
        report["notes"].append(f"serving status unavailable: {_one_line(exc)}")


def _table_status(settings: Settings, read_url: str, report: dict[str, Any], timeout: float) -> None:
    import clickhouse_connect

    try:
        client = clickhouse_connect.get_client(dsn=read_url, connect_timeout=timeout, send_receive_timeout=timeout)
        try:
            # Tables that store rows (not views, Null ingest tables): their counts are metadata, cheap at any size.
            result = client.query(
                "SELECT name, engine, total_rows FROM system.tables"
                " WHERE database = %(db)s AND has_own_data ORDER BY name",
                parameters={"db": settings.clickhouse.database},
            )
        finally:
            client.close()
    except Exception as exc:  # any failure of the read endpoint is reported, not raised
        report["notes"].append(f"ClickHouse tables unavailable at {_redacted(read_url)}: {_one_line(exc)}")
        return
    report["tables"] = {name: {"engine": engine, "rows": rows} for name, engine, rows in result.result_rows}


def stack_status(settings: Settings, timeout: float = 3.0) -> dict[str, Any]:
    """What the local stack under ``settings.home`` runs, as plain JSON-able data (``status --json``)."""
    state = read_state(settings)
    report: dict[str, Any] = {"running": False, "state_file": str(settings.state_file), "notes": []}
    if state is None:
        report["notes"].append("no stack was started under this home (`boltstream up` starts one)")
        return report
    alive = state.alive()
    report.update(
        running=any(alive.values()),
        home=state.home,
        started_at=state.started_at,
        data_dir=state.data_dir,
        bootstrap_servers=state.bootstrap_servers,
        clickhouse_read_url=_redacted(state.clickhouse_read_url),
        broker={"pid": state.broker.pid, "alive": alive["broker"], "reachable": False, "log": state.broker.log},
        workers={n: {"pid": r.pid, "alive": alive[n], "log": r.log} for n, r in state.workers.items()},
        topics={},
        missing_topics=[],
        tables=None,
        consumer_groups=None,
    )
    if not report["running"]:
        report["notes"].append("stale state file: every process of the stack has exited")
        return report
    if alive["broker"] and _reachable(state.bootstrap_servers, timeout):
        stack_kafka = replace(settings.kafka, bootstrap_servers=state.bootstrap_servers)
        _kafka_status(replace(settings, kafka=stack_kafka), report, timeout)
        if report["broker"]["reachable"]:
            _serving_status(replace(settings, kafka=stack_kafka), report, timeout)
    else:
        report["notes"].append(f"broker at {state.bootstrap_servers} is not reachable")
    if state.clickhouse_read_url:
        _table_status(settings, state.clickhouse_read_url, report, timeout)
    return report


# -- command line ----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def up_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=_port, default=0, help="broker port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--read-port", type=_port, help="port of the archive's read endpoint (default: a free one)")
    parser.add_argument("--partitions", type=_positive_int, help="partitions of the event topics (default: config)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the workers to be ready")


def up_command(args: argparse.Namespace, settings: Settings) -> int:
    if args.partitions:
        settings = replace(settings, topics=replace(settings.topics, partitions=args.partitions))
    if args.read_port is not None:
        settings = replace(settings, clickhouse=replace(settings.clickhouse, read_port=args.read_port))
    try:
        state = start_stack(settings, port=args.port, timeout=args.timeout)
    except StackRunningError as running:
        print(f"boltstream is already running under {settings.home}: {running.state.describe()}")
        if not all(running.state.alive().values()):
            print("part of it has exited: `boltstream down` then `boltstream up` restarts it")
        return 0
    except (BrokerError, StackError) as exc:
        print(f"boltstream up: {exc}", file=sys.stderr)
        return 1
    print(f"boltstream is up under {state.home}")
    print(f"  broker   {state.bootstrap_servers} (pid {state.broker.pid})")
    print(f"  topics   {', '.join(f'{name} ({n})' for name, n in state.topics.items())}")
    for name, record in state.workers.items():
        print(f"  {name:<8} pid {record.pid}, log {record.log}")
    if state.clickhouse_read_url:
        print(f"  reads    {_redacted(state.clickhouse_read_url)} (token in {settings.state_file})")
    return 0


def status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def status_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        report = stack_status(settings)
    except StackError as exc:
        print(f"boltstream status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_status(report)
    return 0 if report["running"] else 1


def _print_status(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "broker" not in report:
        console.print("[bold]nothing running[/bold]")
    else:
        state = "[green]running[/green]" if report["running"] else "[red]not running[/red]"
        console.print(f"[bold]boltstream stack[/bold] {state} since {report['started_at']}")
        console.print(f"home {report['home']} (logs in {Path(report['broker']['log']).parent})")
        processes = Table("process", "pid", "state", title="processes", title_justify="left")
        broker = report["broker"]
        reach = ", reachable" if broker["reachable"] else ", unreachable" if broker["alive"] else ""
        processes.add_row(f"broker {report['bootstrap_servers']}", str(broker["pid"]), _alive(broker["alive"]) + reach)
        for name, worker in report["workers"].items():
            processes.add_row(name, str(worker["pid"]), _alive(worker["alive"]))
        console.print(processes)
        if report["topics"]:
            topics = Table("topic", "partitions", "compacted", title="topics", title_justify="left")
            for name, topic in report["topics"].items():
                topics.add_row(name, str(topic["partitions"]), "yes" if topic["compacted"] else "")
            for name in report["missing_topics"]:
                topics.add_row(name, "[red]missing[/red]", "")
            console.print(topics)
        if report["tables"] is not None:
            tables = Table("table", "engine", "rows", title=f"ClickHouse {report['data_dir']}", title_justify="left")
            for name, table in report["tables"].items():
                tables.add_row(name, table["engine"], "" if table["rows"] is None else f"{table['rows']:,}")
            console.print(tables)
        if report.get("serving"):
            _print_serving(console, report["serving"])
        if report["consumer_groups"]:
            groups = Table("consumer group", "topic", "lag", title="consumer groups", title_justify="left")
            for group, info in report["consumer_groups"].items():
                for topic, lag in info["topics"].items():
                    groups.add_row(group, topic, f"{lag:,}")
                if not info["topics"]:
                    groups.add_row(group, "", "[dim]nothing committed yet[/dim]")
            console.print(groups)
    for note in report["notes"]:
        console.print(f"[dim]note: {note}[/dim]")


def _print_serving(console: Any, serving: dict[str, Any]) -> None:
    from rich.table import Table

    state = serving["canary"]
    canary = f", canary version {state['canary']}" if state["canary"] is not None else ""
    title = f"serving {state['model']}: stable version {state['stable']}{canary}"
    replicas = Table("replica", "version", "format", "served name", "last load", title=title, title_justify="left")
    for server_id, replica in serving["replicas"].items():
        last = (
            replica["status"]
            if replica["status"] == "serving"
            else f"[red]failed v{replica['attempted_version']}[/red]"
        )
        replicas.add_row(server_id, str(replica["version"]), replica["format"], replica["served_name"], last)
    console.print(replicas)
    if state["last_decision"]:
        decision = state["last_decision"]
        console.print(
            f"last decision: {decision['action']} version {decision['candidate_version']}: {decision['reason']}"
        )


def _alive(alive: bool) -> str:
    return "[green]alive[/green]" if alive else "[red]dead[/red]"


def down_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait after SIGTERM before SIGKILL")


def down_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        previous = read_state(settings)
        was_running = previous is not None and previous.running()
        stopped = stop_stack(settings, timeout=args.timeout)
    except StackError as exc:
        print(f"boltstream down: {exc}", file=sys.stderr)
        return 1
    if stopped is None:
        print("nothing running")
    elif not was_running:
        print(f"nothing running (removed the stale state file {settings.state_file})")
    else:
        print(f"stopped {stopped.describe(show_dead=False)}")
    return 0
