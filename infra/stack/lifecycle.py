"""Starting and stopping the local stack: :func:`start_stack` brings up the broker, the topics, the
workers and their supervisor and records them; :func:`stop_stack` stops what was recorded, and
:func:`force_stop` whatever this home started when its record is damaged."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from urllib.parse import quote

from boltstream.infra.common.config import Settings
from boltstream.infra.common.ports import free_port, port_in_use
from boltstream.infra.common.signing import ensure_signing_key
from boltstream.infra.common.topics import TopicError, ensure_topics
from boltstream.infra.stack.broker import EmbeddedBroker
from boltstream.infra.stack.errors import CorruptStateError, StackError, StackRunningError
from boltstream.infra.stack.processes import ProcessRecord, adopt, spawn, stop_processes
from boltstream.infra.stack.state import (
    StackState,
    forget,
    locked,
    read_state,
    register,
    registered,
    write_state,
    write_worker_settings,
)
from boltstream.infra.stack.workers import WORKERS, Worker, wait_ready, worker_environment

READ_USER = "reader"


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
    ``clickhouse.read_token``, or a random one. The model signing key the trainer and the serving
    replicas share is created in its default file if missing (:func:`ensure_signing_key`).
    Raises :class:`StackRunningError` if a stack already runs under ``settings.home``,
    :class:`BrokerError` if the port is taken, and :class:`StackError` if a part does not come up;
    then nothing started here is left running.
    A state file whose processes are all dead is stale: it is replaced. With ``stack.supervise`` a
    supervisor process (:mod:`boltstream.infra.stack.supervisor`) restarts any part that exits.
    """
    workers = WORKERS if workers is None else workers
    with locked(settings):
        previous = read_state(settings)
        if previous is not None:
            if previous.running():
                raise StackRunningError(previous)
            forget(settings)
        embedded = settings.archive_url.startswith("chdb://")
        if not embedded:
            workers = {name: worker.writing_to_a_server() for name, worker in workers.items()}
        serves_reads = any(worker.serves_reads for worker in workers.values())
        read_port = settings.clickhouse.read_port
        if read_port and (read_port == port or port_in_use(read_port)):
            raise StackError(f"read port {read_port} on 127.0.0.1 is already in use; pick another or use 0")
        logs = settings.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ensure_signing_key(settings)
        broker = EmbeddedBroker(port=port, log_path=logs / "broker.log").start(timeout=min(timeout, 15.0))
        started = {"broker": register(settings, "broker", adopt(broker.process, logs / "broker.log"))}
        try:
            # Chosen once the broker listens, so a free port cannot turn out to be the broker's.
            read_port = read_port or free_port()
            token = settings.clickhouse.read_token or secrets.token_hex(24)
            fill = {"python": sys.executable, "read_port": str(read_port)}
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
            config_path = write_worker_settings(settings, stack_settings)
            env = worker_environment(stack_settings, config_path)
            for name, worker in workers.items():
                argv = [part.format(**fill) for part in (*worker.argv, *worker.read_args)]
                started[name] = register(settings, name, spawn(argv, logs / f"{name}.log", env, settings.home))
            wait_ready(workers, started, fill, timeout)
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
            write_state(settings, state)
            if settings.stack.supervise:  # started once the state it reads is written
                argv = [sys.executable, "-m", "boltstream.infra.stack.supervisor"]
                supervisor = register(settings, "supervisor", spawn(argv, logs / "supervisor.log", env, settings.home))
                state = replace(state, workers=dict(started), supervisor=supervisor)
                started["supervisor"] = supervisor  # stopped with the rest if writing the state fails
                write_state(settings, state)
            return state
        except BaseException:
            broker_record = started.pop("broker", None)
            supervisor = started.pop("supervisor", None)
            if supervisor is not None:
                stop_processes([supervisor], timeout=5.0)
            stop_processes(started.values(), timeout=5.0)
            if broker_record is not None:
                stop_processes([broker_record], timeout=5.0)
            forget(settings)
            raise


def stop_stack(settings: Settings, timeout: float = 10.0) -> StackState | None:
    """Stop the supervisor, the workers, then the broker (SIGTERM; SIGKILL after ``timeout`` s), and forget the stack.

    Returns the state of the stack that was recorded, or None if there was none. Raises
    :class:`CorruptStateError` when the state file cannot be read (then :func:`force_stop`).
    """
    with locked(settings):
        state = read_state(settings)
        if state is None:
            return None
        supervisor = [state.supervisor] if state.supervisor else []
        _stop_in_order([supervisor, state.workers.values(), [state.broker]], timeout)
        forget(settings)
        return state


def force_stop(settings: Settings, timeout: float = 10.0) -> list[ProcessRecord]:
    """Stop every process this home's stack started, whatever state its files are in, and forget the stack.

    The processes come from ``stack.json`` when it can be read and from ``<home>/processes/`` (:func:`register`)
    in any case. Returns the ones that were still running.
    """
    with locked(settings):
        try:
            state = read_state(settings)
        except CorruptStateError:
            state = None
        parts = [(name, record) for name, record in registered(settings)]
        if state is not None:
            parts += [("supervisor", state.supervisor)] if state.supervisor else []
            parts += [("broker", state.broker), *state.workers.items()]
        running: dict[int, tuple[str, ProcessRecord]] = {}
        for name, record in parts:
            if record.pid not in running and record.alive():
                running[record.pid] = (name, record)
        by_role = {"supervisor": [], "worker": [], "broker": []}
        for name, record in running.values():
            by_role[name if name in ("supervisor", "broker") else "worker"].append(record)
        _stop_in_order([by_role["supervisor"], by_role["worker"], by_role["broker"]], timeout)
        forget(settings)
        return [record for _, record in running.values()]


def _stop_in_order(groups: list[Iterable[ProcessRecord]], timeout: float) -> None:
    """Stop each group in turn: the supervisor (so it restarts nothing), the workers (they flush to the
    broker), the broker."""
    for group in groups:
        stop_processes(list(group), timeout)
