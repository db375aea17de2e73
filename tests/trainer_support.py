"""Helpers for the trainer tests: topics on the real broker, producing samples, reading records back."""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from boltstream.infra.common.config import Settings
from boltstream.schemas.codec import codec


def create_topics(settings: Settings) -> None:
    admin = AdminClient(settings.kafka.client_config())
    topics = [
        NewTopic(name, num_partitions=partitions, replication_factor=1)
        for name, partitions in settings.topics.all().items()
    ]
    for future in admin.create_topics(topics).values():
        future.result(timeout=15)


def produce_samples(settings: Settings, samples: list[dict[str, Any]], raw: list[tuple[bytes, bytes]] = ()) -> None:
    """Each sample as a TrainingSample keyed by task_id (plus ``raw`` (key, value) pairs as they are)."""
    producer = Producer(settings.kafka.client_config(**{"acks": "all", "linger.ms": 5}))
    for sample in samples:
        producer.produce(
            settings.topics.samples, key=sample["task_id"].encode(), value=codec("TrainingSample").encode(sample)
        )
    for key, value in raw:
        producer.produce(settings.topics.samples, key=key, value=value)
    assert producer.flush(15) == 0


def read_all(
    settings: Settings, topic: str, record: str, expect: int | None = None, timeout: float = 15.0
) -> list[dict]:
    """Every record on ``topic`` from the beginning (waiting until ``expect`` of them arrived)."""
    consumer = Consumer(settings.kafka.client_config(**{"group.id": f"reader-{time.monotonic_ns()}"}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        records, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = consumer.poll(0.2)
            if message is not None and message.error() is None:
                records.append(codec(record).decode(message.value()))
            elif message is None and (expect is None or len(records) >= expect):
                break
        return records
    finally:
        consumer.close()
