"""Publishing a replay: a source's messages into the replay topic set, paced like the original or faster.

Every replayed message carries the header ``boltstream-replay: <name>`` and its original time in
``boltstream-replay-source-time-us``. Replay topics are created with the configured partition counts and
filled through librdkafka's default partitioner, like the SDK's, so every rollout lands in the partition it
had. A replay refuses a topic set that already holds messages: a second replay under one name would double
every input.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from boltstream.infra.common.config import ConfigError, Settings
from boltstream.infra.common.contract import REPLAY_HEADER, SOURCE_TIME_HEADER
from boltstream.stream_processors.replay.sources import ArchiveSource, KafkaSource, ReplayError
from boltstream.stream_processors.replay.topic_set import replay_settings

#: The replay producer's client settings: idempotent and acknowledged by all replicas like the SDK's, with
#: larger batches (a replay sends a backlog at once, no agent waits on it).
PRODUCER_SETTINGS = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "compression.type": "lz4",
}
#: Events between two updates of the progress bar (an update per message costs as much as the send).
PROGRESS_EVERY = 5000


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

    consumer = Consumer(settings.kafka.consumer_config(**{"group.id": f"boltstream-replay-{uuid.uuid4().hex[:8]}"}))
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
    totals = source.count()
    producer = Producer(settings.kafka.client_config(**PRODUCER_SETTINGS))
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
        task = bar.add_task("replay", total=None if totals is None else sum(totals))
        unshown = 0
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
            unshown += message.events
            if unshown >= PROGRESS_EVERY:
                bar.advance(task, unshown)
                unshown = 0
        bar.advance(task, unshown)
        undelivered = producer.flush(settings.producer.flush_timeout * 3)
    if undelivered or failures:
        raise ReplayError(
            f"{undelivered} messages not delivered, {len(failures)} refused by the broker: {failures[:3]}"
        )
    return ReplayResult(
        name, target, counts["messages"], counts["spans"], counts["rewards"], time.monotonic() - started
    )
