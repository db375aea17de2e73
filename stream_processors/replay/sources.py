"""Where a replay's messages come from: the archive (ClickHouse, by SQL) or the source topics (Kafka offsets
or timestamps), each yielding :class:`ReplayMessage` in replay order.

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

:class:`ReplayError` is the error of the whole replay, defined here at the first step that raises it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from boltstream.infra.common.config import ConfigError, Settings
from boltstream.infra.common.topics import read_to_end, reader_config
from boltstream.schemas.codec import CodecError, codec

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
