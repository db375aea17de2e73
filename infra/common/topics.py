"""Topic administration and the one way to read topics to their end.

"Read to the end" is told by partition EOF events (``enable.partition.eof``), which come from the fetch
responses, and never by a high-watermark query (ListOffsets): the embedded broker answers that one with
the first offset of a partition's last record batch + 1, so a reader stopping there would miss the rest
of that batch. Every component that catches up on a topic (canary analysis, weight sync, status, prompt
updates, replay) reads through :func:`read_to_end`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from boltstream.infra.common.config import Settings

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Message, TopicPartition

log = logging.getLogger("boltstream.topics")

#: The topic the local stack creates on a (re)started broker once that broker holds again what it must (the
#: restored snapshot): a new broker incarnation without it is still being restored, and the SDK holds its
#: messages back until it appears (producers/retention.py), so nothing lands between restored records.
STACK_READY_TOPIC = "boltstream.stack-ready"


class TopicError(RuntimeError):
    """A topic could not be created, listed or read."""


def admin_client(settings: Settings):
    """A short-lived confluent-kafka AdminClient for ``settings.kafka``."""
    from confluent_kafka.admin import AdminClient

    # librdkafka's informational logs (idle connections the broker closes, events purged at teardown)
    # would only clutter a command's output; warnings still show.
    return AdminClient(settings.kafka.client_config(**{"log.connection.close": False, "log_level": 4}))


def ensure_topics(settings: Settings, timeout: float = 15.0) -> dict[str, int]:
    """Create every topic of ``settings.topics`` that does not exist yet, with ``max.message.bytes`` of
    ``kafka.max_message_bytes``; compacted ones get ``cleanup.policy=compact``. Existing topics are left
    as they are. Returns each topic's partition count as the broker reports it."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    wanted = settings.topics.all()
    compacted = set(settings.topics.compacted())
    admin = admin_client(settings)
    new_topics = [
        NewTopic(
            name,
            num_partitions=partitions,
            replication_factor=settings.topics.replication_factor,
            # Brokers that enforce it refuse what the producers refuse (the embedded one stores it only).
            config={
                "max.message.bytes": str(settings.kafka.max_message_bytes),
                **({"cleanup.policy": "compact"} if name in compacted else {}),
            },
        )
        for name, partitions in wanted.items()
    ]
    for name, future in admin.create_topics(new_topics, request_timeout=timeout).items():
        try:
            future.result()
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(
                    f"cannot create topic {name} on {settings.kafka.bootstrap_servers}: {error.str()}"
                ) from None
    deadline = time.monotonic() + timeout
    while True:  # metadata may trail the creation by a moment
        try:
            metadata = admin.list_topics(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            raise TopicError(f"cannot list topics on {settings.kafka.bootstrap_servers}: {exc.args[0].str()}") from None
        present = {name: len(metadata.topics[name].partitions) for name in wanted if name in metadata.topics}
        if len(present) == len(wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise TopicError(f"topics {missing} do not show up on {settings.kafka.bootstrap_servers} after {timeout:.0f}s")
    return present


def mark_ready(settings: Settings, timeout: float = 15.0) -> None:
    """Create :data:`STACK_READY_TOPIC` on the broker of ``settings``: it holds what it must, producers may write."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic

    admin = admin_client(settings)
    topic = NewTopic(STACK_READY_TOPIC, num_partitions=1, replication_factor=settings.topics.replication_factor)
    for future in admin.create_topics([topic], request_timeout=timeout).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"cannot create topic {STACK_READY_TOPIC}: {exc.args[0].str()}") from None


def reader_config(settings: Settings, purpose: str, **extra: Any) -> dict[str, Any]:
    """Client settings of a consumer that reads by explicit assignment and is told where each partition
    ends: partition EOF events on, no commits, a group id of its own that it never joins. The client
    insists on a group id; one that is never joined nor committed to leaves no group on the broker, so
    readers such as ``boltstream status`` do not show up among the consumer groups."""
    return settings.kafka.consumer_config(
        **{
            "group.id": f"boltstream-{purpose}-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            **extra,
        }
    )


def partitions_of(
    consumer: Consumer, topic: str, offset: int | None = None, timeout: float = 10.0
) -> list[TopicPartition]:
    """Every partition of ``topic`` at ``offset`` (default: the beginning)."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise TopicError(f"topic {topic}: {metadata.error if metadata is not None else 'unknown'}")
    start = OFFSET_BEGINNING if offset is None else offset
    return [TopicPartition(topic, partition, start) for partition in sorted(metadata.partitions)]


def read_to_end(
    consumer: Consumer, partitions: Iterable[TopicPartition] | None = None, *, idle_timeout: float = 30.0
) -> Iterator[Message]:
    """Every message of ``partitions`` (assigned here; default: the consumer's assignment) from their
    offsets to each partition's end, as the consumer reaches it. The consumer must report partition EOF
    (:func:`reader_config`). Raises TimeoutError when nothing arrives for ``idle_timeout`` seconds while a
    partition has not reached its end, and TopicError on a fatal client error."""
    from confluent_kafka import KafkaError

    if partitions is not None:
        partitions = list(partitions)
        consumer.assign(partitions)
    else:
        partitions = consumer.assignment()
    unfinished = {(tp.topic, tp.partition) for tp in partitions}
    answered = time.monotonic()
    while unfinished:
        batch = consumer.consume(num_messages=1000, timeout=0.2)
        if batch:
            answered = time.monotonic()
        elif time.monotonic() - answered > idle_timeout:
            names = ", ".join(f"{topic}[{partition}]" for topic, partition in sorted(unfinished))
            raise TimeoutError(f"no end of {names} after {idle_timeout:.0f} s without a message")
        for message in batch:
            error = message.error()
            where = (message.topic(), message.partition())
            if error is None:
                unfinished.add(where)  # a message after an EOF: the partition grew, its end moved
                yield message
            elif error.code() == KafkaError._PARTITION_EOF:
                unfinished.discard(where)
            elif error.fatal():
                raise TopicError(f"reading {message.topic()}: {error.str()}")
            else:
                log.warning("reading %s: %s", message.topic(), error.str())


def read_records(settings: Settings, topic: str, record: str, idle_timeout: float = 10.0) -> list[dict[str, Any]]:
    """Every decodable ``record`` of ``topic``, from its beginning to its end. Undecodable messages are
    skipped with a warning (the archive dead-letters them)."""
    from confluent_kafka import Consumer

    from boltstream.schemas.codec import CodecError, codec

    consumer = Consumer(reader_config(settings, "reader"))
    records = []
    try:
        for message in read_to_end(consumer, partitions_of(consumer, topic), idle_timeout=idle_timeout):
            try:
                records.append(codec(record).decode(message.value() or b""))
            except CodecError as exc:
                log.warning("%s offset %s skipped: %s", topic, message.offset(), exc)
    finally:
        consumer.close()
    return records
