"""Starting and stopping the local stack: :func:`start_stack` brings up the broker, the topics, the
workers and their supervisor and records them; :func:`stop_stack` stops what was recorded;
:func:`force_stop` whatever this home started when its record is damaged; :func:`restart_broker` brings
back a broker that died under running workers (the supervisor calls it).

What a restart keeps: ``stop_stack`` stops the workers (the archive commits, the join flushes its state),
snapshots the broker (:mod:`.snapshot`) and only then stops it; ``start_stack`` takes the previous broker
port when it is free, restores that snapshot before any worker starts, and marks the broker ready
(:data:`STACK_READY_TOPIC`), which the SDK waits for before it writes to a new broker incarnation."""

from __future__ import annotations

import logging
import secrets
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from boltstream.infra.common.config import Settings
from boltstream.infra.common.ports import free_port, port_in_use
from boltstream.infra.common.signing import ensure_signing_key
from boltstream.infra.common.topics import TopicError, ensure_topics, mark_ready
from boltstream.infra.stack.broker import EmbeddedBroker, new_cluster_id
from boltstream.infra.stack.errors import CorruptStateError, StackError, StackRunningError
from boltstream.infra.stack.processes import ProcessRecord, adopt, spawn, stop_processes
from boltstream.infra.stack.snapshot import (
    SnapshotError,
    restore_snapshot,
    restored_snapshot_dir,
    snapshot_dir,
    take_snapshot,
)
from boltstream.infra.stack.state import (
    StackState,
    forget,
    locked,
    previous_broker_port,
    read_state,
    register,
    registered,
    remember_broker_port,
    write_state,
    write_worker_settings,
)
from boltstream.infra.stack.workers import WORKERS, Worker, wait_ready, worker_environment

log = logging.getLogger("boltstream.stack")
READ_USER = "reader"


def start_stack(
    settings: Settings,
    *,
    port: int = 0,
    workers: Mapping[str, Worker] | None = None,
    timeout: float = 60.0,
) -> StackState:
    """Start the broker, create the topics, start the workers, record them; return what runs.

    ``port`` is the broker's loopback port (0 = the previous broker's port when it is free, else a free
    one); the broker gets a new cluster id, then the snapshot the last ``down`` left, if any
    (:func:`restore_broker_content`); ``workers`` replaces :data:`WORKERS`;
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
        previous = previous_broker_port(settings)
        if not port and previous and previous != read_port and not port_in_use(previous, settings.stack.broker_host):
            port = previous  # agents still running keep sending to the address they know
        broker = EmbeddedBroker(
            port=port, host=settings.stack.broker_host, log_path=logs / "broker.log", cluster_id=new_cluster_id()
        )
        broker.start(timeout=min(timeout, 15.0))
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
            topics = restore_broker_content(stack_settings)
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
                cluster_id=broker.cluster_id,
            )
            write_state(settings, state)
            remember_broker_port(settings, broker.port)
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
    """Stop the supervisor, the workers, snapshot the broker, then stop it (SIGTERM; SIGKILL after ``timeout``
    s), and forget the stack.

    Returns the state of the stack that was recorded, or None if there was none. Raises
    :class:`CorruptStateError` when the state file cannot be read (then :func:`force_stop`).
    """
    with locked(settings):
        state = read_state(settings)
        if state is None:
            return None
        if state.supervisor is not None:  # first, so it restarts nothing that is being stopped
            stop_processes([state.supervisor], timeout)
        stop_processes(state.workers.values(), timeout)  # workers first: they flush to the broker
        if state.broker.alive():
            stack_settings = replace(settings, kafka=replace(settings.kafka, bootstrap_servers=state.bootstrap_servers))
            try:
                summary = take_snapshot(stack_settings, snapshot_dir(settings))
            except SnapshotError as exc:
                raise StackError(
                    f"could not snapshot the broker, so it is left running (the workers are stopped): {exc}"
                ) from None
            log.info("snapshot of the broker: %s", summary.describe())
        stop_processes([state.broker], timeout)
        forget(settings)
        return state


def force_stop(settings: Settings, timeout: float = 10.0) -> list[ProcessRecord]:
    """Stop every process this home's stack started, whatever state its files are in, and forget the stack.

    The processes come from ``stack.json`` when it can be read and from ``<home>/processes/``
    (:func:`register`) in any case. Returns the ones that were still running. No snapshot is taken.
    """
    with locked(settings):
        try:
            state = read_state(settings)
        except CorruptStateError:
            state = None
        parts = list(registered(settings))
        if state is not None:
            parts += [("supervisor", state.supervisor)] if state.supervisor else []
            parts += [("broker", state.broker), *state.workers.items()]
        running: dict[int, tuple[str, ProcessRecord]] = {}
        for name, record in parts:
            if record.pid not in running and record.alive():
                running[record.pid] = (name, record)
        by_role: dict[str, list[ProcessRecord]] = {"supervisor": [], "worker": [], "broker": []}
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


def restore_broker_content(settings: Settings) -> dict[str, int]:
    """Fill the new, empty broker of ``settings`` and mark it ready; return the topics and their partitions.

    The snapshot the last ``down`` left is restored whole (records and committed offsets) and then kept as
    ``snapshot.restored``; without one, that earlier snapshot's compacted topics (published model versions,
    prompt templates, served versions) are restored, as after a broker crash. Then the stack's topics
    are made sure of and :data:`STACK_READY_TOPIC` is created.
    """
    fresh, restored = snapshot_dir(settings), restored_snapshot_dir(settings)
    try:
        if fresh.exists():
            summary = restore_snapshot(settings, fresh)
            shutil.rmtree(restored, ignore_errors=True)
            fresh.rename(restored)
            log.info("restored the broker: %s", summary.describe())
        elif restored.exists():
            summary = restore_snapshot(settings, restored, only_compacted=True)
            log.info("restored the compacted topics: %s", summary.describe())
        topics = ensure_topics(settings)
        mark_ready(settings)
    except (SnapshotError, TopicError) as exc:
        raise StackError(f"cannot restore the broker's content: {exc}") from None
    return topics


def restart_broker(settings: Settings, *, timeout: float = 60.0, count_restart: bool = False) -> StackState:
    """Bring back the broker of the running stack after it died (a crash, SIGKILL), on the same port.

    The workers are stopped first (a Faust app and a consumer group on a broker that lost their state
    cannot go on), the broker starts with a new cluster id, gets back what :func:`restore_broker_content`
    can give it, and is marked ready; then the workers start again from the new broker's beginning. What
    the dead broker had acknowledged comes back from the SDK's retention (producers/retention.py): the
    agents see the new cluster id and send it again; the archive's views and the join deduplicate.
    ``count_restart`` adds one to the broker's restart count (the supervisor's restarts).
    Raises :class:`StackError` when no stack is recorded or its broker still runs.
    """
    with locked(settings):
        state = read_state(settings)
        if state is None:
            raise StackError(f"no stack is recorded under {settings.home}")
        if state.broker.alive():
            raise StackError(f"the broker (pid {state.broker.pid}) still runs; stop it first")
        stop_processes(state.workers.values(), timeout=10.0)
        if port_in_use(state.broker_port, state.bootstrap_servers.rpartition(":")[0]):
            raise StackError(f"the broker's port {state.broker_port} is taken by another process")
        host = state.bootstrap_servers.rpartition(":")[0]
        broker = EmbeddedBroker(state.broker_port, host, Path(state.broker.log), cluster_id=new_cluster_id())
        broker.start(timeout=15.0)
        record = register(settings, "broker", adopt(broker.process, Path(state.broker.log)))
        stack_settings = replace(settings, kafka=replace(settings.kafka, bootstrap_servers=state.bootstrap_servers))
        try:
            restore_broker_content(stack_settings)
            config_path = settings.home / "stack.toml"
            env = worker_environment(settings, config_path)
            started = {
                name: register(settings, name, spawn(list(old.argv), Path(old.log), env, settings.home))
                for name, old in state.workers.items()
            }
            workers = {name: WORKERS[name] for name in started if name in WORKERS}
            wait_ready(workers, started, {"python": sys.executable, "read_port": str(state.read_port)}, timeout)
        except BaseException:
            stop_processes([record], timeout=5.0)
            raise
        restarts = (
            {**state.restarts, "broker": state.restarts.get("broker", 0) + 1} if count_restart else state.restarts
        )
        state = replace(state, broker=record, workers=started, cluster_id=broker.cluster_id, restarts=restarts)
        write_state(settings, state)
        return state
