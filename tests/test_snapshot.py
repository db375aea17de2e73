"""The broker snapshot (infra/stack/snapshot.py): taken from one real broker, restored into a new one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from boltstream.infra.common.config import Settings, load_settings
from boltstream.infra.common.topics import STACK_READY_TOPIC, ensure_topics, mark_ready, read_to_end, reader_config
from boltstream.infra.stack import snapshot
from boltstream.infra.stack.broker import EmbeddedBroker
from boltstream.infra.stack.snapshot import (
    SnapshotError,
    map_offset,
    read_manifest,
    restore_snapshot,
    snapshot_records,
    take_snapshot,
)

GROUP = "snapshot-test-group"


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[EmbeddedBroker, EmbeddedBroker]]:
    source = EmbeddedBroker(log_path=tmp_path / "source.log").start()
    target = EmbeddedBroker(log_path=tmp_path / "target.log").start()
    yield source, target
    source.stop()
    target.stop()


def on(broker: EmbeddedBroker, home: Path) -> Settings:
    return load_settings(environ={"BOLTSTREAM_HOME": str(home)}, kafka={"bootstrap_servers": broker.bootstrap_servers})


def everything(settings: Settings, topic: str, partitions: int) -> list[tuple]:
    consumer = Consumer(reader_config(settings, "test"))
    try:
        tps = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)]
        return sorted(  # partitions arrive interleaved in any order
            (m.partition(), m.offset(), m.key(), m.value(), m.headers(), m.timestamp()[1])
            for m in read_to_end(consumer, tps, idle_timeout=15)
        )
    finally:
        consumer.close()


def test_a_restored_broker_has_every_record_offset_header_and_committed_offset(brokers, tmp_path: Path) -> None:
    source, target = (on(broker, tmp_path) for broker in brokers)
    ensure_topics(source)
    mark_ready(source)
    spans, models = source.topics.spans, source.topics.model_updates
    producer = Producer(source.kafka.client_config(**{"enable.idempotence": True}))
    for n in range(500):
        key = None if n % 50 == 0 else f"rollout-{n % 7}".encode()
        headers = [("trace", f"t{n}".encode())] if n % 3 == 0 else None
        producer.produce(spans, f"span {n}".encode(), key, partition=n % 3, headers=headers, timestamp=1_700_000 + n)
    producer.produce(models, b"v1", b"tiny")
    producer.produce(models, b"v2", b"tiny")
    assert producer.flush(15) == 0
    consumer = Consumer(source.kafka.client_config(**{"group.id": GROUP, "enable.auto.commit": False}))
    consumer.commit(offsets=[TopicPartition(spans, 0, 40), TopicPartition(spans, 2, 7)], asynchronous=False)
    consumer.close()

    summary = take_snapshot(source, tmp_path / "snapshot")
    manifest = read_manifest(tmp_path / "snapshot")
    assert STACK_READY_TOPIC not in manifest["topics"]  # the next broker gets it only once restored
    assert manifest["topics"][models]["compacted"] and not manifest["topics"][spans]["compacted"]
    assert summary.records == 502 and summary.groups == 1

    restored = restore_snapshot(target, tmp_path / "snapshot")
    assert restored.records == 502 and restored.moved_partitions == []
    # Each partition's last record in a batch of its own: the broker's high watermark (the first offset of the
    # last batch + 1) is the true end, where Faust's changelog recovery stops.
    watermarks = Consumer(reader_config(target, "test"))
    ends = [watermarks.get_watermark_offsets(TopicPartition(spans, p), timeout=10)[1] for p in range(3)]
    watermarks.close()
    assert ends == [167, 167, 166]
    partitions = source.topics.partitions
    assert everything(target, spans, partitions) == everything(source, spans, partitions)
    assert everything(target, models, source.topics.control_partitions) == everything(
        source, models, source.topics.control_partitions
    )
    consumer = Consumer(target.kafka.client_config(**{"group.id": GROUP, "enable.auto.commit": False}))
    committed = consumer.committed([TopicPartition(spans, 0), TopicPartition(spans, 2)], timeout=10)
    consumer.close()
    assert [(tp.partition, tp.offset) for tp in committed] == [(0, 40), (2, 7)]


def test_only_the_compacted_topics_come_back_after_a_crash(brokers, tmp_path: Path) -> None:
    source, target = (on(broker, tmp_path) for broker in brokers)
    ensure_topics(source)
    producer = Producer(source.kafka.client_config())
    producer.produce(source.topics.spans, b"span", b"r")
    producer.produce(source.topics.model_updates, b"v1", b"tiny")
    assert producer.flush(15) == 0
    take_snapshot(source, tmp_path / "snapshot")
    summary = restore_snapshot(target, tmp_path / "snapshot", only_compacted=True)
    assert summary.records == 1 and summary.groups == 0
    assert [r[3] for r in everything(target, source.topics.model_updates, source.topics.control_partitions)] == [b"v1"]
    assert everything(target, source.topics.spans, source.topics.partitions) == []


def test_committed_offsets_follow_their_records_when_holes_close_up() -> None:
    old, new = [0, 1, 2, 5, 6, 9], [0, 1, 2, 3, 4, 5]  # offsets 3, 4, 7, 8 were transaction markers
    assert [map_offset(c, old, new) for c in (0, 3, 5, 7, 9, 10)] == [0, 3, 3, 5, 5, 6]
    assert map_offset(4, [], []) == 0


def test_a_snapshot_with_other_partition_counts_is_refused_not_spread_over_other_partitions(
    brokers, tmp_path: Path
) -> None:
    source, target = (on(broker, tmp_path) for broker in brokers)
    ensure_topics(source)
    take_snapshot(source, tmp_path / "snapshot")
    target = replace(target, topics=replace(target.topics, partitions=source.topics.partitions + 1))
    with pytest.raises(SnapshotError, match=f"has {source.topics.partitions} partitions of"):
        restore_snapshot(target, tmp_path / "snapshot")


def test_a_snapshot_ends_while_producers_keep_appending(brokers, tmp_path: Path) -> None:
    source, _ = (on(broker, tmp_path) for broker in brokers)
    ensure_topics(source)
    acknowledged: list[bytes] = []
    producer = Producer(source.kafka.client_config(**{"linger.ms": 20}))  # batches of many records
    stop = threading.Event()

    def append() -> None:
        n = 0
        while not stop.is_set():
            for _ in range(50):
                producer.produce(
                    source.topics.spans,
                    b"%d" % n,
                    b"k",
                    on_delivery=lambda error, m: error is None and acknowledged.append(m.value()),
                )
                n += 1
            producer.poll(0.01)

    appender = threading.Thread(target=append)
    appender.start()
    try:
        while len(acknowledged) < 2000:
            time.sleep(0.05)
        before = set(acknowledged)
        summary = take_snapshot(source, tmp_path / "snapshot", idle_timeout=20)
    finally:
        stop.set()
        appender.join()
        producer.flush(10)
    assert summary.records >= len(before)
    snapshotted = {record[3] for record in records_of(tmp_path / "snapshot", source.topics.spans)}
    assert before <= snapshotted, f"{len(before - snapshotted)} records acknowledged before the snapshot are not in it"


def test_a_partitions_last_batch_is_snapshotted_whole_when_the_read_splits_it(
    brokers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's high watermark is the first offset of a partition's last record batch + 1; the rest of that
    batch comes to the reader in the same fetch, but a read call of READ_BATCH messages can end inside it."""
    source, _ = (on(broker, tmp_path) for broker in brokers)
    ensure_topics(source)
    spans = source.topics.spans
    producer = Producer(source.kafka.client_config(**{"linger.ms": 500}))
    for batch in range(5):  # five record batches of 11 records each, in partition 0
        for n in range(11):
            producer.produce(spans, b"%d" % (batch * 11 + n), b"k", partition=0)
        assert producer.flush(15) == 0
    watermarks = Consumer(reader_config(source, "test"))
    assert watermarks.get_watermark_offsets(TopicPartition(spans, 0), timeout=10)[1] == 45  # 44 starts the last batch
    watermarks.close()
    monkeypatch.setattr(snapshot, "READ_BATCH", 7)  # calls end at offsets 6, 13, ... 48: inside the last batch

    summary = take_snapshot(source, tmp_path / "snapshot")

    assert summary.records == 55
    assert [record[0] for record in records_of(tmp_path / "snapshot", spans)] == list(range(55))


def records_of(directory: Path, topic: str) -> list[tuple]:
    """The records a snapshot holds of ``topic``, partition by partition."""
    partitions = snapshot_records(directory, read_manifest(directory), [topic])
    return [record for where in sorted(partitions) for record in partitions[where]]
