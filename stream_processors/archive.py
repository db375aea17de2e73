"""The ClickHouse archive: the worker that writes every span, reward, trajectory, sample and dead letter.

It owns the DDL (``schemas/clickhouse/*.sql``, applied at start), the consumer group
``clickhouse.archive_group`` on the spans, rewards, trajectories, samples and dlq topics, and — with the
embedded store — the chDB data directory, whose reads it serves over loopback
(:mod:`boltstream.stream_processors.read_endpoint`). It also archives the experiments (their records, and by
topic pattern the trajectories and samples of every ``replay.<name>.*`` set, with the name in front).

How a batch is written. ClickHouse decodes the Avro itself: a single-object encoded message is the
10-byte header plus the Avro body of one record, so the worker strips the header and hands the bodies
to ``INSERT INTO <table>_ingest FORMAT Avro`` as an Avro Object Container File (the newest writer
schema in the header, one block per message so a malformed body cannot shift its neighbours). A
materialized view flattens them into ``<table>_store``. Python never decodes a record on this path; it
is what makes 200,000 spans/s on one core reachable (fastavro alone needs ~25 µs per llm_call span).
Messages written with an older schema version or with Confluent framing take the slow path: decoded
with :mod:`boltstream.schemas.codec` (which resolves them to the newest schema) and re-encoded.

Failures. One record never stops the archive, and the archive never gives up on a record for a reason
of the server. Bad framing, and a message larger than ``kafka.max_message_bytes`` (which the embedded
broker accepts: it has no limit; the dead letter keeps its key, size and offset, not its value), go to
the DLQ at once. A ClickHouse error is classified by its code (:func:`classify`, the lists below):

- the record's data (unparsable, a violated table CONSTRAINT — the archive's invariants) and the batch's
  shape (too many partitions in one insert, too large, out of memory with more than one record): the
  batch is split in halves until the offending messages are alone; those go to the DLQ as
  ``DeadLetter`` records with the reason, the rest is archived;
- anything else is the server's (disk full, server away, too many parts, a dropped table): the insert
  waits (doubling from 0.5 s up to ``clickhouse.retry_max_wait``) and is tried again, for as long as it
  takes, without committing and without exiting, while the consumer stays in its group (its partitions
  paused). What it waits for is in the log and in the worker's state file, which ``boltstream status``
  shows (:func:`read_archive_states`).

Inserts allow ``clickhouse.max_partitions_per_insert`` day partitions (ClickHouse's default, 100, would
refuse a valid batch of spans from 150 days); a batch over it is split like a bad batch, and a single
record over it is dead-lettered. Offsets are committed only after the insert returned and the dead
letters were acknowledged: at-least-once delivery into ReplacingMergeTree tables read through FINAL
views is exactly-once in the views, also across a SIGKILL.

Why confluent-kafka and not Faust (DESIGN.md lists the archiver among the Faust apps): the archive
needs ``Consumer.consume(num_messages, timeout)`` batches of raw bytes and a synchronous commit after
each insert; Faust decodes and dispatches message by message through asyncio, which costs more per
message than the whole insert budget of 5 µs per span.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fastavro
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from boltstream.infra.common.config import ClickHouseConfig, ConfigError, Settings, redacted
from boltstream.schemas.codec import AvroCodec, CodecError, codec, latest, zigzag_varint
from boltstream.schemas.dead_letters import dead_letter as build_dead_letter
from boltstream.schemas.dead_letters import fit_dead_letter

log = logging.getLogger("boltstream.archive")

WORKER_NAME = "archive"
#: What a failed insert says, by ClickHouse error code (:func:`classify`).
RECORD = "record"  # this data: split the batch down to the offending records, dead-letter them
BATCH = "batch"  # this batch's shape: split it; a record alone that still fails is dead-lettered
SERVER = "server"  # the server, its disk or its memory: wait and try the same insert again
#: Codes that say "this data". The record alone that still fails is dead-lettered with ClickHouse's reason.
RECORD_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        32,  # ATTEMPT_TO_READ_AFTER_EOF
        33,  # CANNOT_READ_ALL_DATA
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        190,  # SIZES_OF_ARRAYS_DONT_MATCH
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        407,  # DECIMAL_OVERFLOW
        469,  # VIOLATED_CONSTRAINT
        748,  # AVRO_EXCEPTION
    }
)
#: Codes that say "this batch is too big" in one way or another: smaller inserts succeed.
BATCH_ERROR_CODES = frozenset(
    {
        128,  # TOO_LARGE_ARRAY_SIZE
        131,  # TOO_LARGE_STRING_SIZE
    }
)
#: Memory errors split a batch of several records; of a single record (at most kafka.max_message_bytes)
#: they are the server's: other queries hold the memory.
MEMORY_ERROR_CODES = frozenset({173, 241})  # CANNOT_ALLOCATE_MEMORY, MEMORY_LIMIT_EXCEEDED
#: TOO_MANY_PARTS says two things: "too many partitions for single INSERT block" (the batch's shape)
#: and "too many parts" in a partition (merges are behind: the server's, wait).
TOO_MANY_PARTS = 252
TOO_MANY_PARTITIONS_TEXT = "partitions for single INSERT block"
VIOLATED_CONSTRAINT = 469
#: Avro decoding errors of some ClickHouse builds come wrapped as STD_EXCEPTION.
STD_EXCEPTION = 1001
#: What the archive waits for, in words, for the codes an operator meets most.
SERVER_PROBLEMS = {
    243: "disk full",  # NOT_ENOUGH_SPACE
    TOO_MANY_PARTS: "too many parts: merges are behind",
    241: "memory limit",
    242: "table is read-only",
    60: "table missing",
    81: "database missing",
}
#: Settings of every archive insert: the ReplacingMergeTree deduplicates at merge time and in FINAL,
#: so sorting out duplicates while inserting is wasted work.
INSERT_SETTINGS = {"optimize_on_insert": 0}
#: First wait before trying again an insert the server could not take; it doubles up to
#: ``clickhouse.retry_max_wait``.
FIRST_RETRY_WAIT = 0.5
#: Milliseconds between the consumer's looks for new topics (an experiment's outputs, by pattern).
EXPERIMENT_DISCOVERY_MS = 5000
#: Seconds between the worker's progress lines in the log (and updates of its state file).
PROGRESS_INTERVAL = 10.0


def classify(exc: Exception, records: int) -> str:
    """:data:`RECORD`, :data:`BATCH` or :data:`SERVER`: whose fault a failed insert of ``records`` records is."""
    code = getattr(exc, "code", None)
    if code in RECORD_ERROR_CODES or (code == STD_EXCEPTION and "avro::Exception" in str(exc)):
        return RECORD
    if code in BATCH_ERROR_CODES or (code == TOO_MANY_PARTS and TOO_MANY_PARTITIONS_TEXT in str(exc)):
        return BATCH
    if code in MEMORY_ERROR_CODES and records > 1:
        return BATCH
    return SERVER


def server_problem(exc: Exception) -> str:
    """What a :data:`SERVER` failure means, in a few words and ClickHouse's own, on one line."""
    code, name = getattr(exc, "code", None), getattr(exc, "name", None)
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:299] + "…"
    if code is None:
        return f"ClickHouse unreachable: {text}"
    label = SERVER_PROBLEMS.get(code, name or "ClickHouse error")
    return f"{label} (code {code}{f' {name}' if name else ''}): {text}"


class StopRequested(Exception):
    """The worker was asked to stop while it waited: it stops without committing the batch."""


# -- DDL -----------------------------------------------------------------------------------------


def ddl_statements() -> list[str]:
    """The statements of ``schemas/clickhouse/*.sql`` in file order (each one ends with ``;``)."""
    statements = []
    files = sorted(resources.files("boltstream.schemas").joinpath("clickhouse").iterdir(), key=lambda f: f.name)
    for file in files:
        if not file.name.endswith(".sql"):
            continue
        for chunk in re.split(r";[ \t]*$", file.read_text(), flags=re.MULTILINE):
            code = "\n".join(line for line in chunk.splitlines() if not line.lstrip().startswith("--"))
            if code.strip():
                statements.append(chunk.strip())
    return statements


def connect(clickhouse: ClickHouseConfig, url: str) -> Any:
    """A clickhouse-connect client on ``url`` (``chdb:///path`` or ``http(s)://...``, with the archive
    worker's login of ``clickhouse``) with the schema applied."""
    import clickhouse_connect

    arguments = clickhouse.client_arguments(url, reading=False)
    bootstrap = clickhouse_connect.get_client(**arguments)
    try:
        bootstrap.command(f"CREATE DATABASE IF NOT EXISTS `{clickhouse.database}`")
    finally:
        bootstrap.close()
    client = clickhouse_connect.get_client(**arguments, database=clickhouse.database)
    for statement in ddl_statements():
        client.command(statement)
    return client


def chdb_path(url: str) -> str | None:
    """The data directory of a ``chdb://`` URL, or None for a server URL."""
    if not url.startswith("chdb:"):
        return None
    path = url.removeprefix("chdb://").split("?", 1)[0]
    return os.path.realpath(path)


# -- Avro container building ------------------------------------------------------------------------


def _bytes(value: bytes) -> bytes:
    return zigzag_varint(len(value)) + value


class AvroContainer:
    """Avro Object Container File framing for one writer schema: a header, then one block per record."""

    def __init__(self, schema_json: str) -> None:
        self.sync = secrets.token_bytes(16)
        metadata = {b"avro.schema": schema_json.encode(), b"avro.codec": b"null"}
        entries = b"".join(_bytes(key) + _bytes(value) for key, value in metadata.items())
        self.header = b"Obj\x01" + zigzag_varint(len(metadata)) + entries + b"\x00" + self.sync

    def file(self, bodies: Iterable[bytes]) -> bytes:
        """A container holding each Avro body as a block of one record."""
        parts = [self.header]
        sync = self.sync
        for body in bodies:
            parts.append(b"\x02" + zigzag_varint(len(body)))  # count 1, zig-zag encoded
            parts.append(body)
            parts.append(sync)
        return b"".join(parts)


# -- the archiver: Avro messages in, rows out ---------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """Where one topic's records go: the record type and the ClickHouse table family. An experiment's
    outputs (``experiment`` set) go to ``experiment_<name>``, each row with the experiment's name in front."""

    record: str
    name: str
    experiment: str = ""

    @property
    def target(self) -> str:
        return f"experiment_{self.name}" if self.experiment else self.name


@dataclass
class Rejected:
    """A message that cannot be archived, and why; ``keep_value`` False leaves its value out of the dead letter."""

    item: Any
    reason: str
    error_type: str
    keep_value: bool = True


class Backoff:
    """How the archive waits for the server: bounded exponential waits, each one reported.

    :meth:`wait` is called after each failed attempt; it sleeps through ``sleep`` (the worker's keeps
    its consumer in the group) and raises :class:`StopRequested` when ``stopping`` is set.
    :meth:`resume` is called after each success. ``report`` hears of every change of state.
    """

    def __init__(
        self,
        max_wait: float,
        *,
        sleep: Callable[[float], None] = time.sleep,
        report: Callable[[dict[str, Any]], None] = lambda _state: None,
        stopping: threading.Event | None = None,
    ) -> None:
        self.max_wait = max_wait
        self.sleep = sleep
        self.report = report
        self.stopping = stopping or threading.Event()
        self.since: float | None = None
        self.attempts = 0

    def wait(self, problem: str) -> None:
        """Wait before the next attempt of what just failed because of ``problem``."""
        if self.since is None:
            self.since, self.attempts = time.time(), 0
        delay = min(self.max_wait, FIRST_RETRY_WAIT * 2 ** min(self.attempts, 30))
        self.attempts += 1
        self.report(
            {
                "state": "waiting",
                "problem": problem,
                "since": self.since,
                "attempts": self.attempts,
                "next_attempt_at": time.time() + delay,
            }
        )
        log.warning("waiting: %s; attempt %d failed, next in %.1f s", problem, self.attempts, delay)
        self.sleep(delay)
        if self.stopping.is_set():
            raise StopRequested(problem)

    def resume(self) -> None:
        """The last attempt succeeded: back to work (said once, after a wait)."""
        if self.since is None:
            return
        log.info("resumed after %.0f s and %d failed attempts", time.time() - self.since, self.attempts)
        self.since, self.attempts = None, 0
        self.report({"state": "archiving"})


class Archiver:
    """Writes framed Avro records into the archive tables through a clickhouse-connect client.

    Knows nothing of Kafka: :meth:`write` takes ``(item, value bytes)`` pairs, where ``item`` is
    whatever the caller needs back for the rejected ones. Inserts the server cannot take are tried
    again after ``backoff`` waits, until they succeed.
    """

    def __init__(
        self,
        client: Any,
        *,
        registry_url: str = "",
        max_partitions_per_insert: int = 1000,
        backoff: Backoff | None = None,
    ) -> None:
        self.client = client
        self._codecs: dict[str, AvroCodec] = {}
        self._containers: dict[str, AvroContainer] = {}
        self._registry_url = registry_url
        self.max_partitions_per_insert = max_partitions_per_insert
        self._settings = {**INSERT_SETTINGS, "max_partitions_per_insert_block": max_partitions_per_insert}
        self.backoff = backoff or Backoff(30.0)

    def _codec(self, record: str) -> AvroCodec:
        if record not in self._codecs:
            self._codecs[record] = (
                AvroCodec(record, registry_url=self._registry_url) if self._registry_url else codec(record)
            )
        return self._codecs[record]

    def _container(self, table: Table) -> AvroContainer:
        key = f"experiment:{table.record}" if table.experiment else table.record
        if key not in self._containers:
            schema = latest(table.record).schema
            if table.experiment:  # an Avro record is its fields in order: the name's string, then the body
                fields = [{"name": "experiment", "type": "string"}, *schema["fields"]]
                schema = {**schema, "name": f"Experiment{table.record}", "fields": fields}
            self._containers[key] = AvroContainer(json.dumps(schema))
        return self._containers[key]

    def body(self, record: str, value: bytes) -> bytes:
        """The Avro body of ``value`` under the newest ``record`` schema; CodecError if it has none."""
        record_codec = self._codec(record)
        writer, body_start = record_codec.writer_schema(value)
        if writer is record_codec.reader.parsed:
            return value[body_start:]  # the fast path: ClickHouse decodes it
        # An older schema version or Confluent framing: decode (resolving to the newest), re-encode.
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, record_codec.reader.parsed, record_codec.decode(value))
        return buffer.getvalue()

    def write(self, table: Table, messages: list[tuple[Any, bytes]]) -> list[Rejected]:
        """Insert the messages' records into ``table``; return those that could not be archived."""
        rejected: list[Rejected] = []
        bodies: list[tuple[Any, bytes, bytes]] = []
        prefix = _bytes(table.experiment.encode()) if table.experiment else b""
        for item, value in messages:
            try:
                bodies.append((item, value, prefix + self.body(table.record, value)))
            except CodecError as exc:
                rejected.append(Rejected(item, str(exc), "decode_error"))
        self._insert_or_isolate(table, bodies, rejected)
        return rejected

    def _insert(self, table: Table, bodies: list[bytes]) -> None:
        """Insert ``bodies``; wait and try again while the server cannot take them; raise a data error."""
        from clickhouse_connect.driver.exceptions import Error

        data = self._container(table).file(bodies)
        while True:
            try:
                self.client.raw_insert(f"{table.target}_ingest", None, data, settings=self._settings, fmt="Avro")
            except (Error, OSError) as exc:
                if classify(exc, len(bodies)) != SERVER:
                    raise
                self.backoff.wait(f"inserting into {table.name}: {server_problem(exc)}")
            else:
                self.backoff.resume()
                return

    def _insert_or_isolate(
        self, table: Table, bodies: list[tuple[Any, bytes, bytes]], rejected: list[Rejected]
    ) -> None:
        """Insert all; if ClickHouse rejects the data or the batch, bisect until each bad message is alone."""
        from clickhouse_connect.driver.exceptions import Error

        if not bodies:
            return
        try:
            self._insert(table, [body for _, _, body in bodies])
            return
        except Error as exc:  # a record's or the batch's fault (_insert waits out the server's)
            if len(bodies) == 1:
                item, value, _ = bodies[0]
                rejected.append(self._why(table, item, value, exc))
                return
        middle = len(bodies) // 2
        self._insert_or_isolate(table, bodies[:middle], rejected)
        self._insert_or_isolate(table, bodies[middle:], rejected)

    def _why(self, table: Table, item: Any, value: bytes, exc: Exception) -> Rejected:
        """The clearest reason for a message ClickHouse rejected: fastavro's if it cannot decode it either."""
        try:
            self._codec(table.record).decode(value)
        except CodecError as decode_error:
            return Rejected(item, str(decode_error), "decode_error")
        message = str(exc).split("server response: ", 1)[-1].strip()
        code = getattr(exc, "code", None)
        if code == VIOLATED_CONSTRAINT:
            return Rejected(item, f"invariant violated: {message}", "invariant_violation")
        if code == TOO_MANY_PARTS:
            days = self.max_partitions_per_insert
            reason = f"its records fall on more than {days} days (clickhouse.max_partitions_per_insert): {message}"
            return Rejected(item, reason, "too_many_partitions")
        return Rejected(item, f"rejected by ClickHouse: {message}", "rejected")


# -- the worker: Kafka in, archive and DLQ out --------------------------------------------------------


def topic_tables(settings: Settings) -> dict[str, Table]:
    """Archived topics and where they go."""
    topics = settings.topics
    return {
        topics.spans: Table("SpanBatch", "spans"),
        topics.rewards: Table("Reward", "rewards"),
        topics.trajectories: Table("Trajectory", "trajectories"),
        topics.samples: Table("TrainingSample", "samples"),
        topics.dlq: Table("DeadLetter", "dead_letters"),
        topics.canary_decisions: Table("CanaryDecision", "canary_decisions"),
        topics.experiments: Table("Experiment", "experiments"),
    }


def fitting_dead_letter(message: Message, reject: Rejected, max_message_bytes: int) -> dict[str, Any]:
    """The dead letter of ``reject``, small enough for the DLQ: its value (then its key) is left out, and
    the reason says so, when the dead letter would be larger than ``max_message_bytes``. Its id comes
    from the message's position: a message redelivered after a crash is dead-lettered under the same id."""
    record = build_dead_letter(
        worker=WORKER_NAME,
        source_topic=message.topic() or "",
        source_partition=message.partition() if message.partition() is not None else -1,
        source_offset=message.offset() if message.offset() is not None else -1,
        key=message.key(),
        value=message.value() if reject.keep_value else b"",  # value() copies: not a 200 MB one for nothing
        reason=reject.reason,
        error_type=reject.error_type,
    )
    return fit_dead_letter(record, max_message_bytes)


def experiment_outputs(settings: Settings) -> dict[str, Table]:
    """Subscription patterns of the experiments' outputs (``replay.<name>.<trajectories or samples topic>``,
    see :mod:`boltstream.stream_processors.replay`) and their tables, the experiment's name left empty."""
    topics = settings.topics
    outputs = {
        topics.trajectories: Table("Trajectory", "trajectories"),
        topics.samples: Table("TrainingSample", "samples"),
    }
    return {rf"^replay\.[A-Za-z0-9_-]+\.{re.escape(topic)}$": table for topic, table in outputs.items()}


@dataclass
class BatchStats:
    """What a batch (or a stretch of batches) did: messages consumed, of which dead-lettered."""

    messages: int = 0
    dead_letters: int = 0


# -- the worker's state, for `boltstream status` ------------------------------------------------------


def archive_state_path(home: Path, pid: int) -> Path:
    """The state file of the archive worker with process id ``pid`` under ``home``."""
    return home / "run" / f"archive-{pid}.json"


def read_archive_states(home: Path) -> list[dict[str, Any]]:
    """What each archive worker running under ``home`` last said it does (:class:`StateFile`), by pid.

    Found by their files, not by a pid recorded elsewhere, so a worker started by a supervisor or by
    hand shows up too; files of processes that are gone (a SIGKILL leaves its file) are passed over."""
    return [state for _, state in _archive_states(home) if state is not None]


def _archive_states(home: Path) -> list[tuple[Path, dict[str, Any] | None]]:
    """Every archive state file under ``home`` with its state, None where its process is gone."""
    found = []
    for path in sorted((home / "run").glob("archive-*.json")):
        try:
            state = json.loads(path.read_text())
            os.kill(state["pid"], 0)
        except PermissionError:  # alive, someone else's
            pass
        except (OSError, ValueError, KeyError, TypeError):
            state = None
        found.append((path, state))
    return found


def describe_archive_state(state: dict[str, Any]) -> str:
    """One line for a person: ``archiving (N messages, M dead-lettered)`` or ``waiting since ...: why``."""
    counts = f"{state.get('messages', 0):,} messages archived, {state.get('dead_letters', 0):,} dead-lettered"
    if state.get("state") != "waiting":
        return f"archiving ({counts} since it started)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state["since"]))
    next_in = max(0.0, state["next_attempt_at"] - time.time())
    return (
        f"waiting since {since} ({time.time() - state['since']:.0f} s): {state['problem']}; "
        f"{state['attempts']} failed attempts, next in {next_in:.0f} s ({counts})"
    )


class StateFile:
    """The worker's state as JSON in :func:`archive_state_path`, replaced whole at every change.

    Best effort: the home may sit on the very disk that is full, and not being able to say so must not
    stop the archive (the log says it too)."""

    def __init__(self, home: Path, pid: int | None = None) -> None:
        pid = os.getpid() if pid is None else pid
        self.path = archive_state_path(home, pid)
        self.state: dict[str, Any] = {"pid": pid, "state": "archiving", "messages": 0, "dead_letters": 0}

    def prune(self) -> None:
        """Remove the files of archive workers that are gone (SIGKILLed), before a new one's pid reuses them."""
        for path, state in _archive_states(self.path.parent.parent):
            if state is None:
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    def update(self, **changes: Any) -> None:
        if changes.get("state") == "archiving":
            for key in ("problem", "since", "attempts", "next_attempt_at"):
                self.state.pop(key, None)
        self.state.update(changes, updated_at=time.time())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            scratch = self.path.with_suffix(".tmp")
            scratch.write_text(json.dumps(self.state))
            scratch.replace(self.path)
        except OSError as exc:
            log.debug("cannot write %s: %s", self.path, exc)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class ArchiveWorker:
    """Consumes the archived topics in batches, writes them with an :class:`Archiver`, dead-letters the rest."""

    def __init__(self, settings: Settings, client: Any) -> None:
        self.settings = settings
        self.tables = topic_tables(settings)
        self.experiment_tables = experiment_outputs(settings)
        kafka = settings.kafka
        self.stopping = threading.Event()
        self.state = StateFile(settings.home)
        self.backoff = Backoff(
            settings.clickhouse.retry_max_wait,
            sleep=self._sleep_in_group,
            report=lambda state: self.state.update(**state),
            stopping=self.stopping,
        )
        self.archiver = Archiver(
            client,
            registry_url=kafka.schema_registry_url,
            max_partitions_per_insert=settings.clickhouse.max_partitions_per_insert,
            backoff=self.backoff,
        )
        self.consumer = Consumer(
            kafka.consumer_config(
                **{
                    "group.id": settings.clickhouse.archive_group,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": kafka.session_timeout_ms,
                    "heartbeat.interval.ms": min(1000, kafka.session_timeout_ms // 3),
                    # How soon a new experiment's output topics are found (they match a pattern).
                    "topic.metadata.refresh.interval.ms": EXPERIMENT_DISCOVERY_MS,
                }
            )
        )
        self.producer = Producer(kafka.client_config(**{"enable.idempotence": True, "acks": "all"}))
        self._dead_letter_codec = codec("DeadLetter")
        #: Messages the consumer returned while it waited (its partitions paused): the next batch's first.
        self._held: list[Message] = []
        self.totals = BatchStats()

    def run(self) -> None:
        """Archive until :attr:`stopping` is set; commit each batch after it is durable."""
        self.consumer.subscribe([*self.tables, *self.experiment_tables])
        stream = self.settings.stream
        progress, since = BatchStats(), time.monotonic()
        self.state.prune()
        self.state.update(state="archiving")
        try:
            while not self.stopping.is_set():
                messages = self.consumer.consume(num_messages=stream.batch_size, timeout=stream.batch_within)
                if self._held:
                    messages, self._held = self._held + messages, []
                if messages:
                    stats = self.process(messages)
                    progress.messages += stats.messages
                    progress.dead_letters += stats.dead_letters
                if progress.messages and time.monotonic() - since >= PROGRESS_INTERVAL:
                    log.info(
                        "archived %d messages (%d dead-lettered) in %.0f s",
                        progress.messages,
                        progress.dead_letters,
                        time.monotonic() - since,
                    )
                    self.state.update(messages=self.totals.messages, dead_letters=self.totals.dead_letters)
                    progress, since = BatchStats(), time.monotonic()
        except StopRequested as stopped:
            log.info(
                "stopped while waiting (%s); the batch is not committed and comes again at the next start", stopped
            )
        finally:
            self.consumer.close()
            self.producer.flush(self.settings.producer.flush_timeout)
            self.state.remove()

    def _sleep_in_group(self, seconds: float) -> None:
        """Wait ``seconds`` (less if asked to stop) while the consumer stays in its group: its partitions
        are paused and it is polled, so the group does not count it as gone (``max.poll.interval.ms``)."""
        assignment = self.consumer.assignment()
        self.consumer.pause(assignment)
        deadline = time.monotonic() + seconds
        try:
            while not self.stopping.is_set() and (left := deadline - time.monotonic()) > 0:
                message = self.consumer.poll(min(left, 0.5))
                if message is not None and message.error() is None:
                    self._held.append(message)  # fetched before the pause: archived with the next batch
        finally:
            try:
                self.consumer.resume(assignment)
            except KafkaException as exc:  # a rebalance took some of them meanwhile; the new ones run anyway
                log.info("resuming after the wait: %s", exc)

    def process(self, messages: list[Message]) -> BatchStats:
        """Archive one batch: insert, dead-letter the rejects, then commit its offsets."""
        by_table: dict[Table, list[tuple[Message, bytes]]] = {}
        rejected: list[Rejected] = []
        ends: dict[tuple[str, int], int] = {}
        limit = self.settings.kafka.max_message_bytes
        for message in messages:
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", error)
                continue
            ends[(message.topic(), message.partition())] = message.offset() + 1
            table = self.table_of(message.topic())
            value = message.value()
            if not value:
                rejected.append(Rejected(message, "empty message value (tombstone?)", "decode_error"))
                continue
            size = len(value) + len(message.key() or b"")
            if size > limit:
                reason = f"message of {size:,} bytes is larger than kafka.max_message_bytes ({limit:,}); value not kept"
                rejected.append(Rejected(message, reason, "too_large", keep_value=False))
                continue
            by_table.setdefault(table, []).append((message, value))
        for table, items in by_table.items():
            rejected.extend(self.archiver.write(table, items))
        if rejected:
            self._deliver_dead_letters(rejected)
        if ends:
            offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in ends.items()]
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                # A rebalance took the partitions: their new owner re-archives them, idempotently.
                log.warning("commit failed (%s); the batch will be redelivered", exc)
        self.totals.messages += len(messages)
        self.totals.dead_letters += len(rejected)
        return BatchStats(messages=len(messages), dead_letters=len(rejected))

    def _deliver_dead_letters(self, rejected: list[Rejected]) -> None:
        """Produce the dead letters and wait until the broker acknowledged every one (waiting out a broker
        that does not answer): the batch is committed only then."""
        limit = self.settings.kafka.max_message_bytes
        pending: list[tuple[bytes | None, bytes]] = []
        for reject in rejected:
            message: Message = reject.item
            log.warning(
                "dead-lettering %s[%d]@%d: %s", message.topic(), message.partition(), message.offset(), reject.reason
            )
            record = fitting_dead_letter(message, reject, limit)
            pending.append((record["key"], self._dead_letter_codec.encode(record)))
        while pending:
            refused: list[tuple[bytes | None, bytes, KafkaError]] = []
            for key, value in pending:

                def delivered(
                    error: KafkaError | None, _message: Message, key=key, value=value, refused=refused
                ) -> None:
                    if error is not None:
                        refused.append((key, value, error))

                self.producer.produce(self.settings.topics.dlq, value, key=key, on_delivery=delivered)
                self.producer.poll(0)
            while waiting := self.producer.flush(self.settings.producer.flush_timeout):
                self.backoff.wait(f"the broker has not acknowledged {waiting} dead letters")
            if refused:
                self.backoff.wait(f"the broker refused {len(refused)} dead letters: {refused[0][2].str()}")
            pending = [(key, value) for key, value, _ in refused]
        self.backoff.resume()

    def table_of(self, topic: str) -> Table:
        """Where a message of ``topic`` goes: an archived topic's table, or an experiment output's."""
        if topic in self.tables:
            return self.tables[topic]
        for pattern, table in self.experiment_tables.items():
            if re.match(pattern, topic):
                return replace(table, experiment=topic.split(".")[1])
        raise KeyError(f"{topic} is not an archived topic")


# -- the CLI command ---------------------------------------------------------------------------------


def archive_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--read-port", type=int, default=None, help="port of the read-only endpoint (default: config, 0 = free)"
    )
    # Refused, not removed: whoever passes it learns where the token goes instead.
    parser.add_argument("--read-token", default=None, help=argparse.SUPPRESS)


def archive_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the archive worker in the foreground; with the embedded store, serve reads on loopback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.read_token is not None:
        raise ConfigError(
            "--read-token is refused: a command line is visible to every user of the machine (ps, /proc). "
            "Set clickhouse.read_token in the config file or BOLTSTREAM_CLICKHOUSE__READ_TOKEN instead"
        )
    url = settings.archive_url
    data_path = chdb_path(url)
    if data_path is None and args.read_port is not None:
        raise ConfigError("--read-port serves the embedded store only; readers of a server use its own HTTP port")
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        client = connect(settings.clickhouse, url)
    except ClickHouseError as exc:
        hint = " (chDB allows one process per data directory: is another archive running on it?)" if data_path else ""
        print(f"boltstream archive: cannot open the archive at {redacted(url)}{hint}: {exc}", file=sys.stderr)
        return 1
    endpoint = None
    if data_path is not None:
        from boltstream.stream_processors.read_endpoint import READ_USER, ReadEndpoint

        port = settings.clickhouse.read_port if args.read_port is None else args.read_port
        token = settings.clickhouse.read_token or secrets.token_hex(16)
        try:
            endpoint = ReadEndpoint(data_path, settings.clickhouse, token=token, port=port).start()
        except OSError as exc:
            client.close()
            print(f"boltstream archive: cannot serve reads on 127.0.0.1:{port}: {exc.strerror}", file=sys.stderr)
            return 1

    worker = ArchiveWorker(settings, client)

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d: finishing the current batch", signum)
        worker.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # A server's URL may hold a password: only its host and port are shown.
    store = f"chDB in {data_path}" if data_path else f"ClickHouse at {urlsplit(url).netloc.rpartition('@')[2]}"
    group = settings.clickhouse.archive_group
    print(f"boltstream archive: {', '.join(worker.tables)} into {store} (consumer group {group})")
    if endpoint is not None:
        shown = "as configured" if settings.clickhouse.read_token else token  # a new one: say it once
        print(f"  read endpoint http://{READ_USER}:<token>@127.0.0.1:{endpoint.port}, token {shown}")
    print("  stops on Ctrl-C or SIGTERM, after the current batch", flush=True)
    try:
        worker.run()
    finally:
        if endpoint is not None:
            endpoint.stop()
        client.close()
    return 0
