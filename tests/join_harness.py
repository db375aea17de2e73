"""Running join workers as real subprocesses against the test broker, and reading what they emit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Producer, TopicPartition

from boltstream.infra.common.config import Settings, settings_toml
from boltstream.infra.common.ports import free_port
from boltstream.infra.common.topics import ensure_topics
from boltstream.schemas.codec import codec
from tests.traffic import Message

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def join_settings(settings: Settings, reward_timeout: float = 2.0, **stream: Any) -> Settings:
    """The test settings with a short timeout, a join group of their own, and fast group joins."""
    return replace(
        settings,
        kafka=replace(settings.kafka, session_timeout_ms=2000),
        stream=replace(
            settings.stream,
            reward_timeout=reward_timeout,
            join_group=f"join-{uuid.uuid4().hex[:8]}",
            join_grace=0.5,
            **stream,
        ),
    )


def copy_topics(settings: Settings) -> Settings:
    """Same settings, fresh topic names and join group: a second, independent run over the same traffic."""
    suffix = uuid.uuid4().hex[:6]
    topics = {name: f"{value}.{suffix}" for name, value in vars(settings.topics).items() if isinstance(value, str)}
    return replace(
        settings,
        topics=replace(settings.topics, **topics),
        stream=replace(settings.stream, join_group=f"{settings.stream.join_group}-{suffix}"),
    )


class JoinProcess:
    """One ``boltstream join`` worker process."""

    def __init__(self, settings: Settings, name: str = "join") -> None:
        self.settings = settings
        self.port = free_port()
        home = Path(settings.home)
        home.mkdir(parents=True, exist_ok=True)
        config = home / f"{settings.stream.join_group}.toml"
        config.write_text(settings_toml(settings))
        self.log_path = home / f"{name}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOLTSTREAM_")}
        env.update(
            BOLTSTREAM_CONFIG=str(config),
            BOLTSTREAM_HOME=str(home),
            PYTHONUNBUFFERED="1",
        )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "boltstream.infra.cli",
                    "join",
                    "--metrics-port",
                    str(self.port),
                    "--loglevel",
                    "warning",
                ],
                env=env,
                cwd=PROJECT_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit, no flush."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def prepare(settings: Settings) -> None:
    ensure_topics(settings)


class Collector:
    """Reads a topic (from the beginning, or only what comes after it started) and keeps each record by
    its id (outputs are at-least-once), and every distinct version of it (a second one is a conflict)."""

    def __init__(self, settings: Settings, topic: str, record: str, id_field: str, *, from_end: bool = False) -> None:
        self.codec, self.id_field = codec(record), id_field
        self.consumer = Consumer(
            settings.kafka.client_config(
                **{"group.id": f"collect-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False, "fetch.wait.max.ms": 10}
            )
        )
        partitions = settings.topics.partitions
        start = OFFSET_END if from_end else OFFSET_BEGINNING
        self.consumer.assign([TopicPartition(topic, p, start) for p in range(partitions)])
        self.records: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}  # every distinct record delivered under each id
        self.deliveries = 0

    def poll(self, seconds: float = 0.5) -> None:
        for message in self.consumer.consume(10_000, seconds):
            if message.error():
                continue
            record = self.codec.decode(message.value())
            self.deliveries += 1
            self.records[record[self.id_field]] = record
            versions = self.versions.setdefault(record[self.id_field], [])
            if record not in versions:
                versions.append(record)

    def until(self, count: int, timeout: float, also: Any = None) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline:
            self.poll()
            if also is not None:
                also()
        return self.records

    def close(self) -> None:
        self.consumer.close()


def _span_ids(message: Message) -> list[str]:
    if message.topic != "spans" or message.value is None:
        return []
    try:
        return [s["event_id"] for s in codec("SpanBatch").decode(message.value)["spans"]]
    except Exception:
        return []


def _count_into(acknowledged: set[str], spans: list[str]) -> Callable[[Any, Any], None]:
    def delivered(error: Any, _: Any) -> None:
        if error is None:
            acknowledged.update(spans)

    return delivered


def produce_live(
    settings: Settings,
    messages: list[Message],
    actions: dict[int, Callable[[], None]] | None = None,
    *,
    slowdown: float = 1.0,
) -> set[str]:
    """Produce ``messages`` at the pace of their event times (``slowdown`` times slower; 0: all at once),
    each stamped with its event time as its broker timestamp, as the SDK's records are when sent as they
    happen; at message index ``i`` start ``actions[i]`` in a thread (the traffic does not wait for it).
    Returns the event ids of the spans the broker acknowledged."""
    actions = actions or {}
    producer = Producer(settings.kafka.client_config(**{"linger.ms": 5, "enable.idempotence": True}))
    topics = {"spans": settings.topics.spans, "rewards": settings.topics.rewards}
    acknowledged: set[str] = set()
    threads = []
    first, started = messages[0].event_time_us, time.monotonic()
    for index, message in enumerate(messages):
        if index in actions:
            threads.append(threading.Thread(target=actions[index], daemon=True))
            threads[-1].start()
        wait = started + slowdown * (message.event_time_us - first) / 1e6 - time.monotonic()
        if wait > 0:
            producer.poll(wait)

        while True:
            try:
                producer.produce(
                    topics[message.topic],
                    message.value,
                    message.key,
                    timestamp=message.event_time_us // 1000,
                    on_delivery=_count_into(acknowledged, _span_ids(message)),
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(30) == 0, "traffic not fully delivered"
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a worker action did not finish"
    return acknowledged
