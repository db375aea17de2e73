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

Failures. Bad framing goes to the DLQ at once. A batch ClickHouse rejects (a corrupt body, a violated
table CONSTRAINT — the archive's invariants) is split in halves until the offending messages are
alone; those go to the DLQ as ``DeadLetter`` records with the reason, the rest is archived. Offsets
are committed only after the insert returned and the dead letters were acknowledged: at-least-once
delivery into ReplacingMergeTree tables read through FINAL views is exactly-once in the views. An
insert that fails for a transport reason (a server restarting) is retried with backoff; any other
failure stops the worker before it commits, so a restart resumes where it stopped.

Why confluent-kafka and not Faust (DESIGN.md lists the archiver among the Faust apps): the archive
needs ``Consumer.consume(num_messages, timeout)`` batches of raw bytes and a synchronous commit after
each insert; Faust decodes and dispatches message by message through asyncio, which costs more per
message than the whole insert budget of 5 µs per span.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterable
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import fastavro
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from boltstream.infra.common.config import ClickHouseConfig, ConfigError, Settings, redacted
from boltstream.schemas.codec import AvroCodec, CodecError, codec, latest, zigzag_varint
from boltstream.schemas.dead_letters import dead_letter_of

log = logging.getLogger("boltstream.archive")

WORKER_NAME = "archive"
#: ClickHouse error codes that say "this data", not "this server": a batch failing with one of these
#: is split to find the offending messages; any other failure stops the worker before it commits.
DATA_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        33,  # CANNOT_READ_ALL_DATA
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        117,  # INCORRECT_DATA
        190,  # SIZES_OF_ARRAYS_DONT_MATCH
        469,  # VIOLATED_CONSTRAINT
        748,  # AVRO_EXCEPTION
    }
)
VIOLATED_CONSTRAINT = 469
#: Avro decoding errors of some ClickHouse builds come wrapped as STD_EXCEPTION.
STD_EXCEPTION = 1001
#: Settings of every archive insert: the ReplacingMergeTree deduplicates at merge time and in FINAL,
#: so sorting out duplicates while inserting is wasted work.
INSERT_SETTINGS = {"optimize_on_insert": 0}
#: Waits before retrying an insert that failed for a transport reason (a server restarting); after
#: the last one the worker stops without committing, so a restart resumes where it was.
INSERT_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0)
#: Milliseconds between the consumer's looks for new topics (an experiment's outputs, by pattern).
EXPERIMENT_DISCOVERY_MS = 5000
#: Seconds between the worker's progress lines in the log.
PROGRESS_INTERVAL = 10.0


def is_data_error(exc: Exception) -> bool:
    """True when ClickHouse refused an insert because of its data (not because of the server)."""
    code = getattr(exc, "code", None)
    return code in DATA_ERROR_CODES or (code == STD_EXCEPTION and "avro::Exception" in str(exc))


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
    """A message that cannot be archived, and why."""

    item: Any
    reason: str
    error_type: str


class Archiver:
    """Writes framed Avro records into the archive tables through a clickhouse-connect client.

    Knows nothing of Kafka: :meth:`write` takes ``(item, value bytes)`` pairs, where ``item`` is
    whatever the caller needs back for the rejected ones.
    """

    def __init__(self, client: Any, *, registry_url: str = "") -> None:
        self.client = client
        self._codecs: dict[str, AvroCodec] = {}
        self._containers: dict[str, AvroContainer] = {}
        self._registry_url = registry_url

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
        from clickhouse_connect.driver.exceptions import OperationalError

        data = self._container(table).file(bodies)
        for delay in (*INSERT_RETRY_DELAYS, None):
            try:
                self.client.raw_insert(f"{table.target}_ingest", None, data, settings=INSERT_SETTINGS, fmt="Avro")
                return
            except OperationalError as exc:  # the server is unreachable or went away: not the data's fault
                if delay is None or is_data_error(exc):
                    raise
                log.warning("insert into %s failed (%s); retrying in %.1f s", table.name, exc, delay)
                time.sleep(delay)

    def _insert_or_isolate(
        self, table: Table, bodies: list[tuple[Any, bytes, bytes]], rejected: list[Rejected]
    ) -> None:
        """Insert all; if ClickHouse rejects the data, bisect until each bad message is alone."""
        if not bodies:
            return
        try:
            self._insert(table, [body for _, _, body in bodies])
            return
        except Exception as exc:
            if not is_data_error(exc):
                raise
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
        if getattr(exc, "code", None) == VIOLATED_CONSTRAINT:
            return Rejected(item, f"invariant violated: {message}", "invariant_violation")
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


def experiment_outputs(settings: Settings) -> dict[str, Table]:
    """Subscription patterns of the experiments' outputs (``replay.<name>.<trajectories or samples topic>``,
    see :mod:`boltstream.stream_processors.replay`) and their tables, the experiment's name left empty."""
    topics = settings.topics
    outputs = {
        topics.trajectories: Table("Trajectory", "trajectories"),
        topics.samples: Table("TrainingSample", "samples"),
    }
    return {rf"^replay\.[A-Za-z0-9_-]+\.{re.escape(topic)}$": table for topic, table in outputs.items()}


def dead_letter(message: Message, reason: str, error_type: str) -> dict[str, Any]:
    """The DeadLetter record of a Kafka message the archive could not store (position-derived id)."""
    return dead_letter_of(message, worker=WORKER_NAME, reason=reason, error_type=error_type)


@dataclass
class BatchStats:
    """What a batch (or a stretch of batches) did: messages consumed, of which dead-lettered."""

    messages: int = 0
    dead_letters: int = 0


class ArchiveWorker:
    """Consumes the archived topics in batches, writes them with an :class:`Archiver`, dead-letters the rest."""

    def __init__(self, settings: Settings, client: Any) -> None:
        self.settings = settings
        self.tables = topic_tables(settings)
        self.experiment_tables = experiment_outputs(settings)
        self.archiver = Archiver(client, registry_url=settings.kafka.schema_registry_url)
        kafka = settings.kafka
        self.consumer = Consumer(
            kafka.client_config(
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
        self.stopping = threading.Event()

    def run(self) -> None:
        """Archive until :attr:`stopping` is set; commit each batch after it is durable."""
        self.consumer.subscribe([*self.tables, *self.experiment_tables])
        stream = self.settings.stream
        progress, since = BatchStats(), time.monotonic()
        try:
            while not self.stopping.is_set():
                messages = self.consumer.consume(num_messages=stream.batch_size, timeout=stream.batch_within)
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
                    progress, since = BatchStats(), time.monotonic()
        finally:
            self.consumer.close()
            self.producer.flush(self.settings.producer.flush_timeout)

    def process(self, messages: list[Message]) -> BatchStats:
        """Archive one batch: insert, dead-letter the rejects, then commit its offsets."""
        by_table: dict[Table, list[tuple[Message, bytes]]] = {}
        rejected: list[Rejected] = []
        ends: dict[tuple[str, int], int] = {}
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
            by_table.setdefault(table, []).append((message, value))
        for table, items in by_table.items():
            rejected.extend(self.archiver.write(table, items))
        for reject in rejected:
            self._send_dead_letter(reject)
        if rejected:
            undelivered = self.producer.flush(self.settings.producer.flush_timeout)
            if undelivered:
                raise KafkaException(f"{undelivered} dead letters not acknowledged by the broker; not committing")
        if ends:
            offsets = [TopicPartition(topic, partition, offset) for (topic, partition), offset in ends.items()]
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                # A rebalance took the partitions: their new owner re-archives them, idempotently.
                log.warning("commit failed (%s); the batch will be redelivered", exc)
        return BatchStats(messages=len(messages), dead_letters=len(rejected))

    def table_of(self, topic: str) -> Table:
        """Where a message of ``topic`` goes: an archived topic's table, or an experiment output's."""
        if topic in self.tables:
            return self.tables[topic]
        for pattern, table in self.experiment_tables.items():
            if re.match(pattern, topic):
                return replace(table, experiment=topic.split(".")[1])
        raise KeyError(f"{topic} is not an archived topic")

    def _send_dead_letter(self, reject: Rejected) -> None:
        message: Message = reject.item
        log.warning(
            "dead-lettering %s[%d]@%d: %s", message.topic(), message.partition(), message.offset(), reject.reason
        )
        record = dead_letter(message, reject.reason, reject.error_type)
        self.producer.produce(self.settings.topics.dlq, self._dead_letter_codec.encode(record), key=message.key())
        self.producer.poll(0)


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
