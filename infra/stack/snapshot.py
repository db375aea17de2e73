"""The broker snapshot: every topic's records and every consumer group's committed offsets, on disk.

The embedded broker keeps everything in memory. ``boltstream down`` stops the workers (the archive and the
join commit, the join's changelog is flushed), then :func:`take_snapshot` writes the broker's whole
content under ``<home>/snapshot``; ``boltstream up`` starts a new broker and :func:`restore_snapshot` puts
it back before any worker starts: the topics with their partition counts and cleanup policy, each
partition's records in their order (keys, values, headers, timestamps), and each group's committed
offsets. A snapshot is restored once: ``up`` renames it ``snapshot.restored``, whose compacted topics
(published model versions, prompt templates, served versions) are what a broker restarted after a
crash gets back (:func:`restore_compacted`).

Offsets. Records are appended to empty partitions, so a log without holes gets back the offsets it had;
a log with holes (transaction markers, compaction) gets them closed up. A committed offset is mapped to
the new offset of the first restored record at or after it, so a group resumes exactly where it was.

Layout: ``manifest.json`` (topics, groups, record counts) and one ``<n>.records`` file per partition:
entries of ``i64 offset | i64 timestamp ms | i32 key length (-1: none) | key | i32 value length | value
| u16 headers | (u16 name length | name | i32 value length | value)*``, big endian.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from boltstream.infra.common.config import Settings
from boltstream.infra.common.topics import STACK_READY_TOPIC, TopicError, admin_client, ensure_topics, reader_config

log = logging.getLogger("boltstream.snapshot")

SNAPSHOT_VERSION = 1
_ENTRY = struct.Struct(">qqi")
_LENGTH = struct.Struct(">i")
_SHORT = struct.Struct(">H")
#: Messages asked of the client per call while reading the broker.
READ_BATCH = 5000
#: Offsets, keys, values, headers and timestamps of one partition's records, in order.
Record = tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]


class SnapshotError(RuntimeError):
    """The broker could not be snapshotted, or a snapshot not restored; the message says why."""


@dataclass
class SnapshotSummary:
    """What a snapshot holds (or what a restore put back)."""

    topics: int = 0
    records: int = 0
    groups: int = 0
    #: Partitions whose restored records got offsets other than their originals (holes closed up).
    moved_partitions: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.records:,} records in {self.topics} topics, {self.groups} consumer groups"


def snapshot_dir(settings: Settings) -> Path:
    """Where ``down`` leaves the broker's content for the next ``up``."""
    return settings.home / "snapshot"


def restored_snapshot_dir(settings: Settings) -> Path:
    """The last snapshot once ``up`` restored it: its compacted topics serve a broker restarted after a crash."""
    return settings.home / "snapshot.restored"


# -- taking -------------------------------------------------------------------------------------


def take_snapshot(settings: Settings, directory: Path, *, idle_timeout: float = 30.0) -> SnapshotSummary:
    """Write every topic and committed group offset of the broker of ``settings`` to ``directory``.

    Each partition is read to where it ended when the snapshot began, or further: what producers still add
    while this runs may be left out (the SDK's retention sends it to the next broker, producers/retention.py).
    The snapshot replaces ``directory`` only once it is complete.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import ConfigResource

    admin = admin_client(settings)
    try:
        metadata = admin.list_topics(timeout=15)
        topics = {
            name: len(meta.partitions)
            for name, meta in metadata.topics.items()
            # Kafka's internal topics and the readiness marker, which the next broker gets once restored
            if not name.startswith("__") and name != STACK_READY_TOPIC and meta.error is None
        }
        compacted: dict[str, bool] = {}
        resources = [ConfigResource("topic", name) for name in topics]
        for resource, future in (admin.describe_configs(resources) if resources else {}).items():
            policy = future.result().get("cleanup.policy")
            compacted[resource.name] = policy is not None and "compact" in (policy.value or "")
        groups = _committed_offsets(admin)
    except KafkaException as exc:
        raise SnapshotError(f"cannot read the broker at {settings.kafka.bootstrap_servers}: {exc}") from None
    partial = directory.with_name(f".{directory.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files: dict[str, str] = {}
    counts: dict[str, int] = {}
    writers: dict[tuple[str, int], Any] = {}
    try:
        for topic, partitions in topics.items():
            for partition in range(partitions):
                name = f"{len(files)}.records"
                files[f"{topic}|{partition}"] = name
                writers[topic, partition] = (partial / name).open("wb")
        total = 0
        for topic, partition, record in _read_all(settings, topics, idle_timeout):
            writers[topic, partition].write(_encode(record))
            where = f"{topic}|{partition}"
            counts[where] = counts.get(where, 0) + 1
            total += 1
    finally:
        for handle in writers.values():
            handle.close()
    manifest = {
        "version": SNAPSHOT_VERSION,
        "taken_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "topics": {name: {"partitions": n, "compacted": compacted.get(name, False)} for name, n in topics.items()},
        "files": files,
        "records": counts,
        "groups": groups,
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(partial, directory)
    return SnapshotSummary(topics=len(topics), records=total, groups=len(groups))


def _committed_offsets(admin: Any) -> dict[str, list[list[Any]]]:
    """Every consumer group's committed offsets: ``{group: [[topic, partition, offset], ...]}``."""
    from confluent_kafka import ConsumerGroupTopicPartitions

    listed = admin.list_consumer_groups().result(timeout=15)
    groups: dict[str, list[list[Any]]] = {}
    for listing in listed.valid:
        request = [ConsumerGroupTopicPartitions(listing.group_id)]
        for group, future in admin.list_consumer_group_offsets(request).items():
            offsets = [
                [tp.topic, tp.partition, tp.offset]
                for tp in future.result(timeout=15).topic_partitions
                if tp.offset >= 0 and tp.error is None
            ]
            if offsets:
                groups[group] = offsets
    return groups


def _read_all(settings: Settings, topics: dict[str, int], idle_timeout: float) -> Iterator[tuple[str, int, Record]]:
    """Every record of ``topics``, partition by partition in order, each partition up to its end.

    A partition ends at its end-of-partition event, or, while producers keep appending (no such event
    comes then), once the read has passed what the partition held when the snapshot began. The embedded
    broker's high watermark then is the first offset of the partition's last record batch + 1, so reaching
    it is not the end: the rest of that batch came in the same fetch, but a call that fills
    :data:`READ_BATCH` may hand out only part of it. The partition ends at the first call after its
    watermark that leaves the client's queue empty (fewer messages than asked for).
    """
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer(reader_config(settings, "snapshot"))
    unfinished = {(topic, partition) for topic, n in topics.items() for partition in range(n)}
    if not unfinished:
        consumer.close()
        return
    marks = {where: consumer.get_watermark_offsets(TopicPartition(*where), timeout=15)[1] for where in unfinished}
    consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for topic, partition in unfinished])
    answered = time.monotonic()
    passed_mark: set[tuple[str, int]] = set()  # read to the watermark; ends once the client's queue is empty
    try:
        while unfinished:
            batch = consumer.consume(num_messages=READ_BATCH, timeout=0.2)
            if batch:
                answered = time.monotonic()
            elif time.monotonic() - answered > idle_timeout:
                raise SnapshotError(f"no end of {sorted(unfinished)[:5]} after {idle_timeout:.0f} s")
            reached = set()
            for message in batch:
                error = message.error()
                where = message.topic(), message.partition()
                if where not in unfinished:
                    continue
                if error is None:
                    timestamp = message.timestamp()[1]
                    headers = [(name, value) for name, value in (message.headers() or [])]
                    yield *where, (message.offset(), timestamp, message.key(), message.value(), headers)
                    if marks[where] > 0 and message.offset() >= marks[where] - 1:
                        passed_mark.add(where)
                elif error.code() == KafkaError._PARTITION_EOF:
                    reached.add(where)
                elif error.fatal():
                    raise SnapshotError(f"reading {message.topic()}: {error.str()}")
            if len(batch) < READ_BATCH:
                reached |= passed_mark & unfinished
            if reached:
                unfinished -= reached
                consumer.incremental_unassign([TopicPartition(*where) for where in reached])
    finally:
        consumer.close()


def _encode(record: Record) -> bytes:
    offset, timestamp, key, value, headers = record
    parts = [_ENTRY.pack(offset, timestamp, -1 if key is None else len(key)), key or b""]
    parts += [_LENGTH.pack(-1 if value is None else len(value)), value or b"", _SHORT.pack(len(headers))]
    for name, header in headers:
        encoded = name.encode()
        parts += [_SHORT.pack(len(encoded)), encoded, _LENGTH.pack(-1 if header is None else len(header))]
        parts.append(header or b"")
    return b"".join(parts)


def _decode_all(data: bytes) -> Iterator[Record]:
    at = 0

    def take(length: int) -> bytes | None:
        nonlocal at
        if length < 0:
            return None
        chunk = data[at : at + length]
        at += length
        return chunk

    while at < len(data):
        offset, timestamp, key_length = _ENTRY.unpack_from(data, at)
        at += _ENTRY.size
        key = take(key_length)
        (value_length,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        value = take(value_length)
        (count,) = _SHORT.unpack_from(data, at)
        at += _SHORT.size
        headers = []
        for _ in range(count):
            (name_length,) = _SHORT.unpack_from(data, at)
            name = data[at + _SHORT.size : at + _SHORT.size + name_length].decode()
            at += _SHORT.size + name_length
            (header_length,) = _LENGTH.unpack_from(data, at)
            at += _LENGTH.size
            headers.append((name, take(header_length)))
        yield offset, timestamp, key, value, headers


# -- restoring ----------------------------------------------------------------------------------


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{directory} holds no readable snapshot: {exc}") from None
    if manifest.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"{directory}: snapshot version {manifest.get('version')!r}, expected {SNAPSHOT_VERSION}")
    return manifest


def snapshot_records(
    directory: Path, manifest: dict[str, Any], topics: Collection[str]
) -> dict[tuple[str, int], list[Record]]:
    """The records the snapshot in ``directory`` (its ``manifest``, :func:`read_manifest`) holds of ``topics``,
    by (topic, partition), each partition's in order; partitions without records are left out."""
    partitions: dict[tuple[str, int], list[Record]] = {}
    for where, name in manifest["files"].items():
        topic, partition = where.rsplit("|", 1)
        if topic in topics:
            records = list(_decode_all((directory / name).read_bytes()))
            if records:
                partitions[topic, int(partition)] = records
    return partitions


def restore_snapshot(settings: Settings, directory: Path, *, only_compacted: bool = False) -> SnapshotSummary:
    """Put the snapshot in ``directory`` back on the (new, empty) broker of ``settings``.

    Creates the stack's topics and the snapshot's others (a Faust changelog ...), produces each
    partition's records in order, then commits each group's offsets mapped to the restored records.
    ``only_compacted`` restores the compacted topics' records alone and no group offsets.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import NewTopic

    manifest = read_manifest(directory)
    wanted = settings.topics.all()
    differ = {
        name: (meta["partitions"], wanted[name])
        for name, meta in manifest["topics"].items()
        if name in wanted and meta["partitions"] != wanted[name]
    }
    if differ:
        name, (kept, configured) = next(iter(differ.items()))
        raise SnapshotError(
            f"the snapshot in {directory} has {kept} partitions of {name}, the settings {configured}: start with "
            f"the partition counts it was taken with, or move the snapshot away to start without it"
        )
    try:
        ensure_topics(settings)
    except TopicError as exc:
        raise SnapshotError(str(exc)) from None
    topics = {
        name: meta
        for name, meta in manifest["topics"].items()
        if not only_compacted or meta["compacted"] or name in settings.topics.compacted()
    }
    admin = admin_client(settings)
    others = [
        NewTopic(
            name,
            num_partitions=meta["partitions"],
            replication_factor=settings.topics.replication_factor,
            config={"cleanup.policy": "compact"} if meta["compacted"] else {},
        )
        for name, meta in topics.items()
        if name not in settings.topics.all()
    ]
    if others:
        for name, future in admin.create_topics(others, request_timeout=15).items():
            try:
                future.result()
            except KafkaException as exc:
                if "already exists" not in str(exc).lower():
                    raise SnapshotError(f"cannot create topic {name}: {exc}") from None
    summary = SnapshotSummary(topics=len(topics))
    moves = _produce(settings, snapshot_records(directory, manifest, topics))
    for (topic, partition), (old, new) in moves.items():
        summary.records += len(old)
        if old != new:
            summary.moved_partitions.append(f"{topic}[{partition}]")
    if summary.moved_partitions:
        log.warning("restored offsets differ from the originals (holes closed up) in %s", summary.moved_partitions)
    if not only_compacted:
        summary.groups = _commit_groups(settings, manifest["groups"], moves)
    return summary


def _produce(
    settings: Settings, partitions: dict[tuple[str, int], list[Record]]
) -> dict[tuple[str, int], tuple[list[int], list[int]]]:
    """Append each partition's records to it in order; return their old and new offsets per partition."""
    from confluent_kafka import Producer

    producer = Producer(
        settings.kafka.client_config(
            **{
                "enable.idempotence": True,  # in order, no duplicates on a retry
                "acks": "all",
                "linger.ms": 5,
                "allow.auto.create.topics": False,
                "queue.buffering.max.kbytes": 256 * 1024,
            }
        )
    )
    new_offsets = {where: [-1] * len(records) for where, records in partitions.items()}
    failures: list[str] = []

    def delivered(offsets: list[int], index: int):
        def report(error: Any, message: Any) -> None:
            if error is not None:
                failures.append(f"{message.topic()}[{message.partition()}]: {error}")
            else:
                offsets[index] = message.offset()

        return report

    def produce(topic: str, partition: int, index: int) -> None:
        _, timestamp, key, value, headers = partitions[topic, partition][index]
        while True:
            try:
                producer.produce(
                    topic,
                    value,
                    key,
                    partition=partition,
                    timestamp=max(0, timestamp),
                    headers=headers or None,
                    on_delivery=delivered(new_offsets[topic, partition], index),
                )
                return
            except BufferError:
                producer.poll(0.05)

    for (topic, partition), records in partitions.items():
        for index in range(len(records) - 1):
            produce(topic, partition, index)
            producer.poll(0)
    # Each partition's last record goes alone, in a batch of its own: the embedded broker reports the high
    # watermark as the first offset of the last batch + 1, and a reader that stops there (Faust's changelog
    # recovery of the join's open rollouts) would miss the rest of a last batch.
    left = producer.flush(120)
    for (topic, partition), records in partitions.items():
        produce(topic, partition, len(records) - 1)
    left += producer.flush(120)
    if left or failures:
        raise SnapshotError(f"restoring the snapshot: {left} records unacknowledged, errors {failures[:3]}")
    return {where: ([record[0] for record in records], new_offsets[where]) for where, records in partitions.items()}


def map_offset(committed: int, old: list[int], new: list[int]) -> int:
    """The new offset of the first restored record at or after old offset ``committed`` (the end if none)."""
    index = bisect.bisect_left(old, committed)
    if index < len(new):
        return new[index]
    return new[-1] + 1 if new else 0


def _commit_groups(
    settings: Settings, groups: dict[str, list[list[Any]]], moves: dict[tuple[str, int], tuple[list[int], list[int]]]
) -> int:
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    for group, offsets in groups.items():
        mapped = []
        for topic, partition, offset in offsets:
            old, new = moves.get((topic, partition), ([], []))
            mapped.append(TopicPartition(topic, partition, map_offset(offset, old, new)))
        consumer = Consumer(settings.kafka.client_config(**{"group.id": group, "enable.auto.commit": False}))
        try:
            consumer.commit(offsets=mapped, asynchronous=False)
        except KafkaException as exc:
            raise SnapshotError(f"cannot restore the offsets of group {group}: {exc}") from None
        finally:
            consumer.close()
    return len(groups)
