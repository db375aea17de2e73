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
import io
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from boltstream.infra.common.config import ConfigError, Settings
from boltstream.infra.common.topics import reader_config
from boltstream.schemas.codec import CodecError, codec
from boltstream.stream_processors.replay.avro_rows import (
    RowReader,
    avro_long,
    clickhouse_type,
    new_marker,
    replay_schema,
)

_SPANS, _REWARDS = 0, 1  # order of the two inputs at equal times: spans first
#: Spans and rewards per page read from the archive (a page is one query, held whole by the read endpoint).
PAGE_EVENTS = 200_000
#: Buckets of the histogram that plans the pages (a page is at least one bucket wide).
PLAN_BUCKETS = 10_000
#: Messages a Kafka partition may hold in memory waiting for the merge; more and it is paused.
PARTITION_BUFFER = 2000


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


def _span_expression() -> str:
    """A span row of the ``spans`` view as a tuple of the newest ``Span`` shape, its ``llm`` record rebuilt
    from the ``llm_*`` columns (NULL when all are empty: the span was archived without one)."""
    batch = replay_schema("SpanBatch").schema
    span = next(field["type"]["items"] for field in batch["fields"] if field["name"] == "spans")
    llm = next(field["type"] for field in span["fields"] if field["name"] == "llm")
    llm_fields = [f"llm_{field['name']}" for field in next(b for b in llm if b != "null")["fields"]]
    empty = " AND ".join(f"{column} = defaultValueOfArgumentType({column})" for column in llm_fields)
    llm_sql = f"if({empty}, NULL, CAST(tuple({', '.join(llm_fields)}) AS {clickhouse_type(llm)}))"
    columns = [llm_sql if field["name"] == "llm" else field["name"] for field in span["fields"]]
    return f"CAST(tuple({', '.join(columns)}) AS {clickhouse_type(span)})"


class ArchiveSource:
    """The archived spans and rewards of a :class:`Selection`, as messages in replay order.

    Read in pages: consecutive windows of publication time holding about ``page_events`` spans and
    rewards each, planned from a histogram of the selection, each one query sorted and Avro-encoded by
    ClickHouse (:mod:`.avro_rows`). A thread fetches the next page while this one is sent, so the query
    and the produce overlap; memory (here and in the read endpoint, which answers a query whole) is that
    of a few pages, whatever the selection's size.
    """

    def __init__(
        self, client: Any, selection: Selection, batch_spans: int = 500, page_events: int = PAGE_EVENTS
    ) -> None:
        if batch_spans < 1 or page_events < 1:
            raise ConfigError("batch_spans and page_events must be at least 1")
        self.client, self.selection, self.batch_spans = client, selection, batch_spans
        self.page_events = page_events
        self._selected, self._parameters = selection.rollouts_sql()

    def _where(self) -> str:
        """The condition on rows of the selected rollouts (none for the whole archive: no scan to find them)."""
        return "1" if self.selection == Selection() else f"rollout_id IN ({self._selected})"

    def count(self) -> tuple[int, int]:
        """Spans and rewards selected."""
        where = self._where()
        spans = self.client.command(f"SELECT count() FROM spans WHERE {where}", parameters=self._parameters)
        rewards = self.client.command(f"SELECT count() FROM rewards WHERE {where}", parameters=self._parameters)
        return int(spans), int(rewards)

    def pages(self) -> list[tuple[int, int]]:
        """Windows ``[start, end)`` of publication time that cover the selection, each holding about
        ``page_events`` events (a span batch counts at its spans' time here, at its own in the page)."""
        times = (
            f"SELECT if(sent_at_us > 0, sent_at_us, end_time_us) AS t FROM spans WHERE {self._where()} "
            f"UNION ALL SELECT timestamp_us FROM rewards WHERE {self._where()}"
        )
        events, first, last = self.client.query(
            f"SELECT count(), min(t), max(t) FROM ({times})", parameters=self._parameters
        ).result_rows[0]
        if not events:
            return []
        if events <= self.page_events:
            return [(first, last + 1)]  # one page: no histogram to plan it
        width = -(-(last - first + 1) // PLAN_BUCKETS)
        histogram = self.client.query(
            f"SELECT intDiv(t - {first}, {width}) AS bucket, count() FROM ({times}) GROUP BY bucket ORDER BY bucket",
            parameters=self._parameters,
        ).result_rows
        pages, start, filled = [], first, 0
        for bucket, count in histogram:
            if filled and filled + count > self.page_events:
                pages.append((start, first + bucket * width))
                start, filled = first + bucket * width, 0
            filled += count
        pages.append((start, last + 1))
        return pages

    def query(self, marker: bytes, start_us: int, end_us: int, paged: bool = False) -> str:
        """Span batches and rewards published in ``[start_us, end_us)``, in publication order (ties: spans
        first, then rollout id), one row each. ``paged``: the window is one of several."""
        batch_type = clickhouse_type(replay_schema("SpanBatch").schema)
        reward_type = clickhouse_type(replay_schema("Reward").schema)
        reward_fields = ", ".join(field["name"] for field in replay_schema("Reward").schema["fields"])
        selected = spans_selected = self._where()
        in_window = f"((sent_at_us >= {start_us} AND sent_at_us < {end_us}) OR sent_at_us = 0)"
        if paged:
            # The rollouts sent in the window first, from the store's two narrow columns: the rows read
            # through FINAL are then a key range of those rollouts, not the whole selection once per page.
            spans_selected += f" AND rollout_id IN (SELECT rollout_id FROM spans_store WHERE {in_window})"
        # One group per original batch, its spans sorted, then cut into chunks of at most batch_spans.
        chunks = f"arrayMap(i -> arraySlice(spans, i * {self.batch_spans} + 1, {self.batch_spans}), "
        chunks += f"range(toUInt64(ceil(length(spans) / {self.batch_spans}))))"
        batches = (
            "SELECT if(sent_at_us > 0, sent_at_us, last_end_us) AS time_us, 0 AS input, rollout_id, producer_id, "
            "sent_at_us, chunk, '' AS reward_id, toInt32(length(chunk_spans)) AS events, "
            f"CAST(tuple(rollout_id, producer_id, sent_at_us, chunk_spans) AS Nullable({batch_type})) AS batch, "
            f"CAST(NULL AS Nullable({reward_type})) AS reward "
            "FROM (SELECT rollout_id, producer_id, sent_at_us, max(end_time_us) AS last_end_us, "
            f"arraySort(span -> (span.sequence, span.event_id), groupArray({_span_expression()})) AS spans "
            f"FROM spans WHERE {spans_selected} AND {in_window} "
            "GROUP BY rollout_id, producer_id, sent_at_us "
            f"HAVING if(sent_at_us > 0, sent_at_us, last_end_us) >= {start_us} "
            f"AND if(sent_at_us > 0, sent_at_us, last_end_us) < {end_us}) "
            f"ARRAY JOIN {chunks} AS chunk_spans, arrayEnumerate({chunks}) AS chunk"
        )
        rewards = (
            "SELECT timestamp_us, 1, rollout_id, '', 0, 0, event_id, toInt32(1), "
            f"CAST(NULL AS Nullable({batch_type})), CAST(tuple({reward_fields}) AS Nullable({reward_type})) "
            f"FROM rewards WHERE {selected} AND timestamp_us >= {start_us} AND timestamp_us < {end_us}"
        )
        return (
            f"SELECT toFixedString(unhex('{marker.hex()}'), {len(marker)}) AS marker, time_us, events, rollout_id, "
            f"batch, reward FROM ({batches} UNION ALL {rewards}) "
            "ORDER BY time_us, input, rollout_id, producer_id, sent_at_us, chunk, reward_id"
        )

    def messages(self) -> Iterator[ReplayMessage]:
        """Span batches and rewards in publication order (ties: spans first, then rollout id)."""
        marker = new_marker()
        reader = RowReader(marker)
        fetched: queue.Queue[bytes | Exception | None] = queue.Queue(maxsize=1)
        stopping = threading.Event()

        def offer(item: bytes | Exception | None) -> None:
            while not stopping.is_set():
                try:
                    fetched.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue

        def fetch() -> None:
            try:
                pages = self.pages()
                for start_us, end_us in pages:
                    if stopping.is_set():
                        return
                    sql = self.query(marker, start_us, end_us, paged=len(pages) > 1)
                    offer(self.client.raw_query(sql, parameters=self._parameters, fmt="Avro"))
                offer(None)
            except Exception as exc:  # raised where the messages are read
                offer(exc)

        fetcher = threading.Thread(target=fetch, name="replay-archive-pages", daemon=True)
        fetcher.start()
        try:
            while (page := fetched.get()) is not None:
                if isinstance(page, Exception):
                    raise page
                for row in reader.rows(io.BytesIO(page)):
                    yield ReplayMessage(row.time_us, row.topic, row.key, row.value, row.events)
        finally:
            stopping.set()
            fetcher.join()


def _span_count(value: bytes) -> int:
    """Spans in a SpanBatch message, read from its first bytes (no decoding of the spans): the fields before
    the spans array, then the array's first block count. Every writer of boltstream (fastavro) writes an
    array as one block. Bad input is replayed as it was (the experiment should meet it too); it counts as
    one event."""
    try:
        _writer, position = codec("SpanBatch").writer_schema(value)
        for _ in range(2):  # rollout_id, producer_id: a length and the bytes
            size, position = avro_long(value, position)
            position += size
        _sent_at, position = avro_long(value, position)  # sent_at_us
        count, _ = avro_long(value, position)
    except (CodecError, IndexError):
        return 1
    return abs(count)


class KafkaSource:
    """Messages of the source spans and rewards topics from given offsets or a time up to the end of the
    topics when they are read (or ``until_us``), byte for byte.

    Order: a merge of the partitions by Kafka timestamp (ties: spans first, then partition, offset); each
    partition keeps its own order. Memory is bounded whatever the range: a partition whose messages wait
    for another's (the merge cannot decide yet) is paused after ``partition_buffer`` messages.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        since_us: int | None = None,
        until_us: int | None = None,
        offsets: dict[tuple[str, int], int] | None = None,
        rollouts: tuple[str, ...] = (),
        idle_timeout: float = 15.0,
        partition_buffer: int = PARTITION_BUFFER,
    ) -> None:
        self.settings, self.idle_timeout, self.partition_buffer = settings, idle_timeout, partition_buffer
        self.since_us, self.until_us = since_us, until_us
        self.offsets = offsets or {}
        self.rollouts = {r.encode() for r in rollouts}

    def count(self) -> None:
        """Unknown before the topics are read (the events of a message are counted as it is sent)."""
        return None

    def _starts(self, consumer: Any) -> list[Any]:
        from confluent_kafka import TopicPartition

        settings = self.settings
        topics = (settings.topics.spans, settings.topics.rewards)
        unknown = {topic for topic, _ in self.offsets} - set(topics)
        if unknown:
            raise ReplayError(f"--kafka-offset names {sorted(unknown)}; the source topics are {sorted(topics)}")
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
        return starts

    def _kept(self, message: Any) -> ReplayMessage | None:
        time_us = message.timestamp()[1] * 1000
        # Also checked here: offsets_for_times only finds where to start (and not on every broker).
        if self.since_us is not None and time_us < self.since_us:
            return None
        if self.until_us is not None and time_us >= self.until_us:
            return None
        if self.rollouts and message.key() not in self.rollouts:
            return None
        spans = message.topic() == self.settings.topics.spans
        events = _span_count(message.value()) if spans else 1
        kept = tuple((k, v) for k, v in (message.headers() or []) if v is not None)
        return ReplayMessage(time_us, "spans" if spans else "rewards", message.key(), message.value(), events, kept)

    def messages(self) -> Iterator[ReplayMessage]:
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        # The end of each partition is where the consumer reaches it (partition EOF events).
        consumer = Consumer(reader_config(self.settings, "replay", **{"auto.offset.reset": "latest"}))
        try:
            starts = self._starts(consumer)
            consumer.assign(starts)
            queues: dict[tuple[str, int], deque[tuple[tuple[int, int, int, int], ReplayMessage]]] = {
                (tp.topic, tp.partition): deque() for tp in starts
            }
            reading = set(queues)  # not at their end yet
            starved = set(queues)  # reading, and nothing buffered: the merge must wait for them
            paused: set[tuple[str, int]] = set()
            heads: list[tuple[tuple[int, int, int, int], tuple[str, int]]] = []
            answered = time.monotonic()
            while True:
                while heads and not starved:
                    _, where = heapq.heappop(heads)
                    queue = queues[where]
                    yield queue.popleft()[1]
                    if queue:
                        heapq.heappush(heads, (queue[0][0], where))
                    elif where in reading:
                        starved.add(where)
                    if where in paused and len(queue) <= self.partition_buffer // 2:
                        consumer.resume([TopicPartition(*where)])
                        paused.discard(where)
                if not reading:
                    return
                batch = consumer.consume(num_messages=1000, timeout=0.2)
                if batch:
                    answered = time.monotonic()
                elif time.monotonic() - answered > self.idle_timeout:
                    names = ", ".join(f"{topic}[{partition}]" for topic, partition in sorted(reading))
                    raise ReplayError(f"no end of {names} after {self.idle_timeout:.0f} s (an offset past the end?)")
                for message in batch:
                    where = (message.topic(), message.partition())
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            reading.discard(where)
                            starved.discard(where)
                        elif error.fatal():
                            raise ReplayError(f"reading {message.topic()}: {error.str()}")
                        continue
                    reading.add(where)  # a message after an EOF: the partition grew
                    replayed = self._kept(message)
                    if replayed is None:
                        continue
                    order = _SPANS if replayed.topic == "spans" else _REWARDS
                    key = (replayed.time_us, order, message.partition(), message.offset())
                    queue = queues[where]
                    if not queue:
                        heapq.heappush(heads, (key, where))
                        starved.discard(where)
                    queue.append((key, replayed))
                    if len(queue) >= self.partition_buffer and where not in paused:
                        consumer.pause([TopicPartition(*where)])
                        paused.add(where)
        finally:
            consumer.close()
