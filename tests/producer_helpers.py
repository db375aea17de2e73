"""Helpers for the SDK tests and benchmarks: read what reached the broker, tweak producer settings, run an
agent in a process of its own."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from boltstream.infra.common.config import Settings
from boltstream.schemas.codec import codec


def with_producer(settings: Settings, **producer: object) -> Settings:
    return replace(settings, producer=replace(settings.producer, **producer))


def sdk_environment(settings: Settings) -> dict[str, str]:
    """This process's environment, with what makes the SDK of a child process send where ``settings`` say."""
    return {
        **os.environ,
        "BOLTSTREAM_HOME": str(settings.home),
        "BOLTSTREAM_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BOLTSTREAM_TOPICS__SPANS": settings.topics.spans,
        "BOLTSTREAM_TOPICS__REWARDS": settings.topics.rewards,
    }


def consume(
    bootstrap: str, topic: str, until: Callable[[list[dict]], bool], timeout: float = 30.0, record: str = "SpanBatch"
) -> list[dict]:
    """Every record of ``topic`` from the beginning (spans unpacked from their batches) until ``until`` holds."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "log.connection.close": False,
            "log_level": 2,  # the outage test reads while the broker is down; spare the log
        }
    )
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    found: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while not until(found) and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.2):
                if message.error():
                    continue
                value = codec(record).decode(message.value())
                if record == "SpanBatch":
                    assert message.key().decode() == value["rollout_id"]
                    found.extend(value["spans"])
                else:
                    found.append(value)
    finally:
        consumer.close()
    return found


def at_least(n: int) -> Callable[[list[dict]], bool]:
    return lambda found: len(found) >= n


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``"64k"``) mounted at ``mountpoint`` for the block; the test is skipped, with the
    reason, where mounting is not permitted (it needs root or CAP_SYS_ADMIN)."""
    import pytest

    mountpoint.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)
