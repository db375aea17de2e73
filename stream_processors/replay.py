"""Streaming replay: yesterday's spans and rewards re-published into a topic set of their own.

``boltstream replay`` selects traffic from the archive (ClickHouse, by SQL: time range, agent, model
version, rollout ids, a raw ``--where``) or from the source topics themselves (Kafka offsets or
timestamps), and publishes it into the *replay topic set* ``replay.<name>.<topic>`` for every topic of
the configuration, at the original pacing or N× faster. An offline experiment then runs the real join
and trainer on that set (``BOLTSTREAM_CONFIG=<home>/replays/<name>.toml boltstream join``, with any
parameter changed by ``BOLTSTREAM_<SECTION>__<FIELD>``) and never touches the production topics. Every
replayed message carries the header ``boltstream-replay: <name>`` and its original time in
``boltstream-replay-source-time-us``.

Determinism: the same selection yields the same messages in the same order, hence (the join decides
by event time, see :mod:`boltstream.stream_processors.join_core`) the same trajectories and samples.

* From the archive, a rollout is replayed whole: every archived span and reward of each selected
  rollout. Spans are re-batched the way they were sent: one SpanBatch per (rollout, producer_id,
  sent_at_us) of the archive, spans in sequence order, cut at ``batch_spans``. A batch is published at
  its ``sent_at_us`` (when the SDK sent it), or at its last span's end time when that is unknown (0);
  a reward at its ``timestamp_us``. Ties are broken by rollout id, then sequence or event id.
* From Kafka, the messages are replayed byte for byte (batches as sent), ordered by their Kafka
  timestamp, then topic (spans first), partition and offset. The selection is read into memory.
* The archive keeps each event once, so duplicate deliveries of the original run are not replayed
  (``Trajectory.duplicate_count`` is 0 in a replay). An ``llm`` record whose fields are all empty is
  archived as no record, and replayed as none.

Replay topics are created with the configured partition counts and filled through librdkafka's
default partitioner, like the SDK's, so every rollout lands in the partition it had. A replay refuses
a topic set that already holds messages: a second replay under one name would double every input.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import re
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import ConfigError, Settings
from boltstream.infra.common.contract import REPLAY_HEADER, SOURCE_TIME_HEADER
from boltstream.infra.common.topics import read_to_end, reader_config
from boltstream.schemas.codec import CodecError, codec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SPANS, _REWARDS = 0, 1  # order of the two inputs at equal times: spans first

_SPAN_COLUMNS = (
    "event_id, rollout_id, attempt_id, task_id, agent_name, toString(kind) AS kind, name, parent_id, sequence, "
    "start_time_us, end_time_us, status, error, reward, attributes, llm_model, llm_model_version, "
    "llm_prompt_token_ids, llm_completion_token_ids, llm_completion_logprobs, llm_prompt_text, llm_completion_text, "
    "llm_prompt_tokens, llm_completion_tokens, llm_latency_ms, llm_finish_reason, server_id, producer_id, sent_at_us"
)
_REWARD_COLUMNS = "event_id, rollout_id, value, name, is_final, source, task_id, agent_name, timestamp_us, attributes"


class ReplayError(RuntimeError):
    """A replay that cannot run as asked (occupied topic set, bad selection, unreachable source)."""


# -- the replay topic set --------------------------------------------------------------------------


def replay_settings(settings: Settings, name: str) -> Settings:
    """``settings`` with every topic renamed ``replay.<name>.<topic>``, and the consumer groups and trainer
    model name that would otherwise be shared with production made the replay's own."""
    if not _NAME.match(name):
        raise ConfigError(f"replay name {name!r}: use letters, digits, '-' and '_' (at most 64)")
    prefix = f"replay.{name}."
    topics = {key: prefix + value for key, value in vars(settings.topics).items() if isinstance(value, str)}
    return replace(
        settings,
        topics=replace(settings.topics, **topics),
        stream=replace(settings.stream, join_group=prefix + settings.stream.join_group),
        # The trainer's group and checkpoint directory are named after the model.
        trainer=replace(settings.trainer, model_name=f"{settings.trainer.model_name}-replay-{name}"),
    )


def write_replay_config(settings: Settings, name: str) -> Path:
    """Write the replay's settings to ``<home>/replays/<name>.toml`` (for ``BOLTSTREAM_CONFIG``)."""
    from boltstream.infra.common.config import settings_toml

    path = Path(settings.home) / "replays" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(settings_toml(settings))
    return path


# -- what is replayed ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayMessage:
    """One message to publish: ``topic`` is ``spans`` or ``rewards``; ``time_us`` paces it."""

    time_us: int
    topic: str
    key: bytes
    value: bytes
    events: int  # spans in the batch, or 1
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Selection:
    """Which rollouts to replay from the archive; criteria combine with AND, a rollout is replayed whole.

    ``since_us``/``until_us`` select rollouts with a span starting (or a reward timed) in
    ``[since, until)``; ``model_versions`` those with an LLM call of one of the versions; ``where`` is a
    condition on rows of the ``spans`` view (a rollout is selected if one of its spans matches). With
    ``model_versions`` or ``where``, rollouts without spans (rewards only) are never selected.
    """

    since_us: int | None = None
    until_us: int | None = None
    agents: tuple[str, ...] = ()
    model_versions: tuple[str, ...] = ()
    rollouts: tuple[str, ...] = ()
    where: str = ""

    def rollouts_sql(self) -> tuple[str, dict[str, Any]]:
        """A subquery of the selected rollout ids, and its parameters."""
        spans, rewards, parameters = ["1"], ["1"], {}
        if self.since_us is not None:
            spans.append("start_time_us >= {since:Int64}")
            rewards.append("timestamp_us >= {since:Int64}")
            parameters["since"] = self.since_us
        if self.until_us is not None:
            spans.append("start_time_us < {until:Int64}")
            rewards.append("timestamp_us < {until:Int64}")
            parameters["until"] = self.until_us
        if self.agents:
            spans.append("agent_name IN {agents:Array(String)}")
            rewards.append("agent_name IN {agents:Array(String)}")
            parameters["agents"] = list(self.agents)
        if self.rollouts:
            spans.append("rollout_id IN {rollouts:Array(String)}")
            rewards.append("rollout_id IN {rollouts:Array(String)}")
            parameters["rollouts"] = list(self.rollouts)
        if self.model_versions:
            spans.append(
                "rollout_id IN (SELECT rollout_id FROM spans WHERE kind = 'llm_call' "
                "AND llm_model_version IN {versions:Array(String)})"
            )
            parameters["versions"] = list(self.model_versions)
        if self.where:
            spans.append(f"({self.where})")
        sql = f"SELECT rollout_id FROM spans WHERE {' AND '.join(spans)}"
        if not (self.model_versions or self.where):
            sql += f" UNION DISTINCT SELECT rollout_id FROM rewards WHERE {' AND '.join(rewards)}"
        return sql, parameters


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _llm_record(row: dict[str, Any]) -> dict[str, Any] | None:
    record = {
        "model": row["llm_model"],
        "model_version": row["llm_model_version"],
        "prompt_token_ids": list(row["llm_prompt_token_ids"]),
        "completion_token_ids": list(row["llm_completion_token_ids"]),
        "completion_logprobs": list(row["llm_completion_logprobs"]),
        "prompt_text": row["llm_prompt_text"],
        "completion_text": row["llm_completion_text"],
        "prompt_tokens": row["llm_prompt_tokens"],
        "completion_tokens": row["llm_completion_tokens"],
        "latency_ms": row["llm_latency_ms"],
        "finish_reason": row["llm_finish_reason"],
    }
    return record if any(record.values()) else None


def _span_record(row: dict[str, Any]) -> dict[str, Any]:
    span = {name: row[name] for name in ("event_id", "rollout_id", "attempt_id", "task_id", "agent_name", "kind")}
    for name in ("name", "parent_id", "sequence", "start_time_us", "end_time_us", "status", "error", "reward"):
        span[name] = row[name]
    span["attributes"] = dict(row["attributes"])
    span["llm"] = _llm_record(row)
    span["server_id"] = row["server_id"]
    return span


class ArchiveSource:
    """The archived spans and rewards of a :class:`Selection`, as messages in replay order."""

    def __init__(self, client: Any, selection: Selection, batch_spans: int = 500) -> None:
        if batch_spans < 1:
            raise ConfigError("batch_spans must be at least 1")
        self.client, self.selection, self.batch_spans = client, selection, batch_spans
        self._selected, self._parameters = selection.rollouts_sql()

    def count(self) -> tuple[int, int]:
        """Spans and rewards selected."""
        where = f"rollout_id IN ({self._selected})"
        spans = self.client.command(f"SELECT count() FROM spans WHERE {where}", parameters=self._parameters)
        rewards = self.client.command(f"SELECT count() FROM rewards WHERE {where}", parameters=self._parameters)
        return int(spans), int(rewards)

    def messages(self) -> Iterator[ReplayMessage]:
        """Span batches and rewards merged by publication time (ties: spans first, then rollout id)."""
        spans = ((m.time_us, _SPANS, m.key, index, m) for index, m in enumerate(self._span_batches()))
        rewards = ((m.time_us, _REWARDS, m.key, index, m) for index, m in enumerate(self._rewards()))
        for *_, message in heapq.merge(spans, rewards):
            yield message

    def _rewards(self) -> Iterator[ReplayMessage]:
        encode = codec("Reward").encode
        result = self.client.query(
            f"SELECT {_REWARD_COLUMNS} FROM rewards WHERE rollout_id IN ({self._selected}) "
            "ORDER BY timestamp_us, rollout_id, event_id",
            parameters=self._parameters,
        )
        names = result.column_names
        for values in result.result_rows:
            row = dict(zip(names, values, strict=True))
            row["attributes"] = dict(row["attributes"])
            yield ReplayMessage(row["timestamp_us"], "rewards", row["rollout_id"].encode(), encode(row), 1)

    def _span_batches(self) -> Iterator[ReplayMessage]:
        encode = codec("SpanBatch").encode
        sql = (
            f"SELECT {_SPAN_COLUMNS}, if(sent_at_us > 0, sent_at_us, "
            "max(end_time_us) OVER (PARTITION BY rollout_id, producer_id, sent_at_us)) AS batch_time_us "
            f"FROM spans WHERE rollout_id IN ({self._selected}) "
            "ORDER BY batch_time_us, rollout_id, producer_id, sent_at_us, sequence, event_id"
        )
        with self.client.query_rows_stream(sql, parameters=self._parameters) as stream:
            names = stream.source.column_names
            rows = (dict(zip(names, values, strict=True)) for values in stream)
            for (time_us, rollout_id, producer_id, sent_at_us), group in itertools.groupby(
                rows, key=lambda r: (r["batch_time_us"], r["rollout_id"], r["producer_id"], r["sent_at_us"])
            ):
                for chunk in _chunks((_span_record(row) for row in group), self.batch_spans):
                    batch = {
                        "rollout_id": rollout_id,
                        "producer_id": producer_id,
                        "sent_at_us": sent_at_us,
                        "spans": list(chunk),
                    }
                    yield ReplayMessage(time_us, "spans", rollout_id.encode(), encode(batch), len(chunk))


def _span_count(value: bytes) -> int:
    # Bad input is replayed as it was (the experiment should meet it too); it counts as one event.
    try:
        return len(codec("SpanBatch").decode(value)["spans"])
    except CodecError:
        return 1


class KafkaSource:
    """Messages of the source spans and rewards topics from given offsets or a time up to the end of the
    topics when they are read (or ``until_us``), byte for byte, in Kafka-timestamp order."""

    def __init__(
        self,
        settings: Settings,
        *,
        since_us: int | None = None,
        until_us: int | None = None,
        offsets: dict[tuple[str, int], int] | None = None,
        rollouts: tuple[str, ...] = (),
        idle_timeout: float = 15.0,
    ) -> None:
        self.settings, self.idle_timeout = settings, idle_timeout
        self.since_us, self.until_us = since_us, until_us
        self.offsets = offsets or {}
        self.rollouts = {r.encode() for r in rollouts}
        self._messages: list[ReplayMessage] | None = None

    def count(self) -> tuple[int, int]:
        messages = self._read()
        spans = sum(m.events for m in messages if m.topic == "spans")
        return spans, sum(1 for m in messages if m.topic == "rewards")

    def messages(self) -> Iterator[ReplayMessage]:
        yield from self._read()

    def _read(self) -> list[ReplayMessage]:
        if self._messages is not None:
            return self._messages
        from confluent_kafka import Consumer, TopicPartition

        settings = self.settings
        topics = {settings.topics.spans: ("spans", _SPANS), settings.topics.rewards: ("rewards", _REWARDS)}
        unknown = {topic for topic, _ in self.offsets} - set(topics)
        if unknown:
            raise ReplayError(f"--kafka-offset names {sorted(unknown)}; the source topics are {sorted(topics)}")
        # The end of each partition is where the consumer reaches it (read_to_end).
        consumer = Consumer(reader_config(settings, "replay", **{"auto.offset.reset": "latest"}))
        try:
            starts = []
            for topic in topics:
                metadata = consumer.list_topics(topic, timeout=10).topics[topic]
                if metadata.error is not None:
                    raise ReplayError(f"source topic {topic}: {metadata.error}")
                for partition in sorted(metadata.partitions):
                    low, _ = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                    if (topic, partition) in self.offsets:
                        start = self.offsets[topic, partition]
                    elif self.since_us is not None:
                        wanted = TopicPartition(topic, partition, self.since_us // 1000)
                        start = consumer.offsets_for_times([wanted], timeout=10)[0].offset
                        if start < 0:  # no message at or after that time
                            continue
                    else:
                        start = low
                    # An offset past the end resets to the end ("latest"), so the partition is done at once.
                    starts.append(TopicPartition(topic, partition, max(start, low)))
            messages = []
            for message in self._read_to_end(consumer, starts):
                time_us = message.timestamp()[1] * 1000
                # Also checked here: offsets_for_times only finds where to start (and not on every broker).
                if self.since_us is not None and time_us < self.since_us:
                    continue
                if self.until_us is not None and time_us >= self.until_us:
                    continue
                if self.rollouts and message.key() not in self.rollouts:
                    continue
                name, order = topics[message.topic()]
                events = _span_count(message.value()) if order == _SPANS else 1
                kept = tuple((k, v) for k, v in (message.headers() or []) if v is not None)
                sort_key = (time_us, order, message.partition(), message.offset())
                replayed = ReplayMessage(time_us, name, message.key(), message.value(), events, kept)
                messages.append((sort_key, replayed))
        finally:
            consumer.close()
        messages.sort(key=lambda item: item[0])
        self._messages = [message for _, message in messages]
        return self._messages

    def _read_to_end(self, consumer: Any, starts: list[Any]) -> Iterator[Any]:
        try:
            yield from read_to_end(consumer, starts, idle_timeout=self.idle_timeout)
        except TimeoutError as exc:
            raise ReplayError(f"{exc} (an offset past the end?)") from None


# -- publishing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    name: str
    settings: Settings  # the replay topic set
    messages: int
    spans: int
    rewards: int
    seconds: float


def _occupied(settings: Settings, topics: Iterable[str]) -> dict[str, int]:
    """Messages already in each of ``topics`` (only those holding any)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(settings.kafka.client_config(**{"group.id": f"boltstream-replay-{uuid.uuid4().hex[:8]}"}))
    try:
        held = {}
        for topic in topics:
            metadata = consumer.list_topics(topic, timeout=10).topics[topic]
            total = 0
            for partition in metadata.partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                total += high - low
            if total:
                held[topic] = total
        return held
    finally:
        consumer.close()


class Pacer:
    """Sleeps so that message times map to wall time ``speed`` times faster (``None``: no waiting)."""

    def __init__(self, speed: float | None) -> None:
        if speed is not None and speed <= 0:
            raise ConfigError(f"replay speed must be positive or 'max', not {speed}")
        self.speed = speed
        self._origin: tuple[int, float] | None = None  # (first message time, wall time it was sent)

    def wait(self, time_us: int) -> None:
        if self.speed is None:
            return
        if self._origin is None:
            self._origin = (time_us, time.monotonic())
            return
        first_us, started = self._origin
        delay = started + (time_us - first_us) / 1e6 / self.speed - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def replay(
    settings: Settings,
    name: str,
    source: ArchiveSource | KafkaSource,
    *,
    speed: float | None = None,
    progress: bool = True,
) -> ReplayResult:
    """Publish ``source``'s messages into the replay topic set ``name`` (created here); return what was sent.

    ``speed`` 1.0 keeps the original pacing, N is N× faster, ``None`` as fast as the broker takes them.
    Raises :class:`ReplayError` if the replay topic set already holds spans or rewards.
    """
    from confluent_kafka import Producer
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from boltstream.infra.common.topics import ensure_topics

    target = replay_settings(settings, name)
    ensure_topics(target)
    occupied = _occupied(target, (target.topics.spans, target.topics.rewards))
    if occupied:
        held = ", ".join(f"{topic} ({count} messages)" for topic, count in occupied.items())
        raise ReplayError(f"replay topic set {name!r} is not empty: {held}; choose another --name")
    spans_total, rewards_total = source.count()
    producer = Producer(
        settings.kafka.client_config(
            **{"enable.idempotence": True, "acks": "all", "linger.ms": 5, "compression.type": "lz4"}
        )
    )
    topics = {"spans": target.topics.spans, "rewards": target.topics.rewards}
    marker = (REPLAY_HEADER, name.encode())
    pacer = Pacer(speed)
    failures: list[str] = []

    def delivered(error: Any, _message: Any) -> None:
        if error is not None:
            failures.append(str(error))

    counts = {"spans": 0, "rewards": 0, "messages": 0}
    started = time.monotonic()
    columns = (
        TextColumn(f"replay {name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("replay", total=spans_total + rewards_total)
        for message in source.messages():
            pacer.wait(message.time_us)
            headers = [*message.headers, marker, (SOURCE_TIME_HEADER, str(message.time_us).encode())]
            while True:
                try:
                    producer.produce(
                        topics[message.topic], message.value, message.key, headers=headers, on_delivery=delivered
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
            counts[message.topic] += message.events
            counts["messages"] += 1
            bar.advance(task, message.events)
        undelivered = producer.flush(settings.producer.flush_timeout * 3)
    if undelivered or failures:
        raise ReplayError(
            f"{undelivered} messages not delivered, {len(failures)} refused by the broker: {failures[:3]}"
        )
    return ReplayResult(
        name, target, counts["messages"], counts["spans"], counts["rewards"], time.monotonic() - started
    )


# -- the CLI command ---------------------------------------------------------------------------------


def parse_time_us(text: str) -> int:
    """Microseconds since the epoch from ISO 8601 (``2026-11-25T08:00``, UTC unless it names a zone) or
    epoch seconds."""
    try:
        return int(float(text) * 1e6)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"not a time: {text!r} (use ISO 8601, e.g. 2026-11-25T08:00, or epoch seconds)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # naive means UTC
    return int(moment.timestamp() * 1e6)


def parse_speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        speed = float(text.removesuffix("x"))
    except ValueError:
        raise ConfigError(f"--speed: {text!r} is neither a number nor 'max'") from None
    if speed <= 0:
        raise ConfigError(f"--speed must be positive, not {text}")
    return speed


def _kafka_offset(text: str) -> tuple[tuple[str, int], int]:
    topic, _, rest = text.rpartition(":")
    topic, _, partition = topic.rpartition(":")
    try:
        return (topic, int(partition)), int(rest)
    except ValueError:
        raise ConfigError(f"--kafka-offset {text!r}: use TOPIC:PARTITION:OFFSET") from None


def replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="", help="replay topic set replay.<name>.* (default: replay-<UTC time>)")
    parser.add_argument(
        "--source", choices=("clickhouse", "kafka"), default="clickhouse", help="archive (SQL) or source topics"
    )
    parser.add_argument("--since", help="start: ISO 8601 time (UTC) or epoch seconds")
    parser.add_argument("--until", help="end (exclusive): ISO 8601 time (UTC) or epoch seconds")
    parser.add_argument("--agent", action="append", default=[], help="agent name (repeatable; archive)")
    parser.add_argument("--model-version", action="append", default=[], help="model version used (repeatable)")
    parser.add_argument("--rollout", action="append", default=[], help="rollout id (repeatable)")
    parser.add_argument("--rollouts-file", help="file of rollout ids, one per line")
    parser.add_argument("--where", default="", help="extra SQL condition on rows of the spans view (archive)")
    parser.add_argument(
        "--kafka-offset", action="append", default=[], help="TOPIC:PARTITION:OFFSET to start from (Kafka; repeatable)"
    )
    parser.add_argument("--speed", default="1", help="1 = original pacing, N = N× faster, max = no pacing")
    parser.add_argument("--batch-spans", type=int, default=500, help="most spans per re-built SpanBatch (archive)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def replay_command(args: argparse.Namespace, settings: Settings) -> int:
    name = args.name or datetime.now(UTC).strftime("replay-%Y%m%d-%H%M%S")
    since = parse_time_us(args.since) if args.since else None
    until = parse_time_us(args.until) if args.until else None
    rollouts = list(args.rollout)
    if args.rollouts_file:
        rollouts += [line.strip() for line in Path(args.rollouts_file).read_text().splitlines() if line.strip()]
    speed = parse_speed(args.speed)
    client = None
    if args.source == "clickhouse":
        if args.kafka_offset:
            raise ConfigError("--kafka-offset needs --source kafka")
        from boltstream.stream_processors.analytics import read_client

        client = read_client(settings)
        selection = Selection(since, until, tuple(args.agent), tuple(args.model_version), tuple(rollouts), args.where)
        source: ArchiveSource | KafkaSource = ArchiveSource(client, selection, args.batch_spans)
    else:
        if args.agent or args.model_version or args.where:
            raise ConfigError("--agent, --model-version and --where select from the archive (--source clickhouse)")
        offsets = dict(_kafka_offset(text) for text in args.kafka_offset)
        source = KafkaSource(settings, since_us=since, until_us=until, offsets=offsets, rollouts=tuple(rollouts))
    from clickhouse_connect.driver.exceptions import ClickHouseError

    try:
        result = replay(settings, name, source, speed=speed, progress=not args.quiet)
    except (ReplayError, ClickHouseError) as exc:
        print(f"boltstream replay: {exc}", file=sys.stderr)
        return 1
    finally:
        if client is not None:
            client.close()
    config = write_replay_config(result.settings, name)
    print(
        f"replayed {result.spans} spans and {result.rewards} rewards in {result.messages} messages "
        f"({result.seconds:.1f} s) into {result.settings.topics.spans}, {result.settings.topics.rewards}"
    )
    print(f"replay settings: {config}")
    print(f"run the experiment on it: BOLTSTREAM_CONFIG={config} BOLTSTREAM_STREAM__REWARD_TIMEOUT=... boltstream join")
    return 0
