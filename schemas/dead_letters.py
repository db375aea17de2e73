"""The DeadLetter record: one builder, so every worker dead-letters alike.

Its event_id is derived from the input's position (and what went wrong), so an input redelivered after
a crash is dead-lettered again under the same id and the ``dead_letters`` view counts it once. A dead
letter must fit in ``kafka.max_message_bytes`` like any message: :func:`fit_dead_letter` leaves out what
would not fit (the input's value, then its key) and says so in the reason.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Protocol

from boltstream.schemas.codec import codec

NAMESPACE = uuid.UUID("6f1c2b1e-4d0a-5b7e-9c1d-a2f3e4b5c6d7")


def dead_letter(
    *,
    worker: str,
    source_topic: str,
    source_partition: int,
    source_offset: int,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    error_type: str,
    identity: str = "",
    timestamp_us: int | None = None,
) -> dict[str, Any]:
    """A DeadLetter record; ``identity`` tells apart several dead letters of one input."""
    position = f"{worker}:{source_topic}:{source_partition}:{source_offset}"
    return {
        "event_id": str(uuid.uuid5(NAMESPACE, f"{position}:{identity}" if identity else position)),
        "source_topic": source_topic,
        "source_partition": source_partition,
        "source_offset": source_offset,
        "key": key,
        "value": value or b"",
        "reason": reason,
        "error_type": error_type,
        "worker": worker,
        "timestamp_us": time.time_ns() // 1000 if timestamp_us is None else timestamp_us,
    }


class KafkaMessage(Protocol):
    """What dead_letter_of reads of a confluent-kafka Message."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...


def dead_letter_of(message: KafkaMessage, *, worker: str, reason: str, error_type: str) -> dict[str, Any]:
    """The DeadLetter record of a confluent-kafka message."""
    return dead_letter(
        worker=worker,
        source_topic=message.topic() or "",
        source_partition=message.partition() if message.partition() is not None else -1,
        source_offset=message.offset() if message.offset() is not None else -1,
        key=message.key(),
        value=message.value(),
        reason=reason,
        error_type=error_type,
    )


#: Bytes a dead letter's Kafka message needs beside its encoded record and its key (headers, framing).
MESSAGE_OVERHEAD = 512


def fit_dead_letter(record: dict[str, Any], max_message_bytes: int) -> dict[str, Any]:
    """``record`` (changed in place) without its value, then without its key, while its Kafka message
    would be larger than ``max_message_bytes``; the reason says what was left out."""
    for field_name in ("value", "key"):
        held = record[field_name]
        size = len(record["key"] or b"") + len(codec("DeadLetter").encode(record)) + MESSAGE_OVERHEAD
        if held and size > max_message_bytes:
            record[field_name] = b"" if field_name == "value" else None
            record["reason"] += (
                f"; its {field_name} ({len(held):,} bytes) is not kept: a dead letter must fit in "
                f"kafka.max_message_bytes ({max_message_bytes:,})"
            )
    return record
