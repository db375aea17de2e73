"""Benchmark: replay throughput at ``--speed max``, from the archive and from Kafka offsets, beside a raw
produce of the same messages measured in the same run (target: a replay at >= 0.5x the raw rate).

Traffic: 5,000 rollouts of 20 spans (half llm_call spans with 100 prompt token ids, 50 completion token
ids and 50 logprobs, half tool_call spans) in SpanBatch messages of 20, plus one Reward each: 100,000
spans and 5,000 rewards, archived by the real archive worker (chDB) and read through its read endpoint.
The three are measured in turns, ``ROUNDS`` times; each reports its best round:

* ``raw produce``: confluent-kafka producing the replay's messages from memory into a fresh topic pair,
  with the replay's producer settings (the floor of any replay);
* ``replay from the archive``: :func:`boltstream.stream_processors.replay.replay` of an
  :class:`ArchiveSource` (one query, sorted and Avro-encoded by ClickHouse, cut into messages, produced,
  acknowledged);
* ``replay from Kafka``: the same of a :class:`KafkaSource` on the source topics (read, merged by
  timestamp, produced byte for byte, acknowledged).

Where the time went before ClickHouse encoded the rows (cProfile, 1,000 rollouts): about 45% fastavro
encoding the re-built SpanBatches, 25% reading the Native result, the rest building the records.

Run: ``python -m pytest tests/benchmarks/bench_replay.py -m benchmark -s``.
"""

from __future__ import annotations

import time
import uuid

import pytest

from boltstream.schemas.codec import codec
from tests.records import make_llm, make_span
from tests.test_archive import wait_for

ROLLOUTS = 5000
SPANS_PER_ROLLOUT = 20
ROUNDS = 3
TARGET_RATIO = 0.5  # issue 16: a replay at least half as fast as producing the same messages


def _produce(settings) -> None:
    from confluent_kafka import Producer

    producer = Producer(settings.kafka.client_config(**{"linger.ms": 20, "compression.type": "lz4"}))
    batches, rewards = codec("SpanBatch"), codec("Reward")
    llm = make_llm(prompt_tokens=100, completion_tokens=50)
    start = int(time.time() * 1e6) - 3600 * 1_000_000
    for index in range(ROLLOUTS):
        rollout_id = str(uuid.uuid4())
        at = start + index * 1000
        spans = []
        for i in range(SPANS_PER_ROLLOUT):
            kind = "llm_call" if i % 2 == 0 else "tool_call"
            spans.append(
                make_span(
                    rollout_id,
                    kind=kind,
                    sequence=i,
                    start_time_us=at + i,
                    end_time_us=at + i + 1,
                    llm=llm if kind == "llm_call" else None,
                )
            )
        batch = {"rollout_id": rollout_id, "producer_id": "bench", "sent_at_us": at + SPANS_PER_ROLLOUT, "spans": spans}
        producer.produce(settings.topics.spans, batches.encode(batch), key=rollout_id.encode())
        reward = {
            "event_id": str(uuid.uuid4()),
            "rollout_id": rollout_id,
            "value": 1.0,
            "name": "final",
            "is_final": True,
            "source": "bench",
            "task_id": "task-1",
            "agent_name": "math-agent",
            "timestamp_us": at + 500,
            "attributes": {},
        }
        producer.produce(settings.topics.rewards, rewards.encode(reward), key=rollout_id.encode())
        producer.poll(0)
    assert producer.flush(60) == 0


@pytest.mark.benchmark
def test_replay_throughput(settings, archive) -> None:
    from confluent_kafka import Producer

    from boltstream.infra.common.topics import ensure_topics
    from boltstream.stream_processors.replay import ArchiveSource, KafkaSource, Selection, replay, replay_settings
    from boltstream.stream_processors.replay.publish import PRODUCER_SETTINGS

    _produce(settings)
    archive.start()
    reader = archive.client()
    total_spans = ROLLOUTS * SPANS_PER_ROLLOUT
    wait_for(lambda: reader.command("SELECT count() FROM spans") == total_spans, 300, "every span archived")
    wait_for(lambda: reader.command("SELECT count() FROM rewards") == ROLLOUTS, 60, "every reward archived")
    events = total_spans + ROLLOUTS
    messages = list(ArchiveSource(reader, Selection()).messages())

    def raw_produce() -> float:
        target = replay_settings(settings, f"raw-{uuid.uuid4().hex[:6]}")
        ensure_topics(target)
        topics = {"spans": target.topics.spans, "rewards": target.topics.rewards}
        producer = Producer(settings.kafka.client_config(**PRODUCER_SETTINGS))
        started = time.perf_counter()
        for message in messages:
            while True:
                try:
                    producer.produce(topics[message.topic], message.value, message.key)
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
        assert producer.flush(60) == 0
        return time.perf_counter() - started

    def replayed(source) -> float:
        result = replay(settings, f"bench-{uuid.uuid4().hex[:6]}", source, speed=None, progress=False)
        assert (result.spans, result.rewards) == (total_spans, ROLLOUTS)
        return result.seconds

    measures = {
        "raw produce": raw_produce,
        "replay from the archive": lambda: replayed(ArchiveSource(reader, Selection())),
        "replay from Kafka": lambda: replayed(KafkaSource(settings)),
    }
    rounds: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(ROUNDS):
        for name, measure in measures.items():
            rounds[name].append(measure())
    baseline = events / min(rounds["raw produce"])
    megabytes = sum(len(m.value) for m in messages) / 1e6
    print(
        f"\nreplay benchmark: {total_spans:,} spans + {ROLLOUTS:,} rewards, "
        f"{len(messages):,} messages ({megabytes:.0f} MB), best of {ROUNDS} rounds"
    )
    for name, seconds in rounds.items():
        rate = events / min(seconds)
        target = "" if name == "raw produce" else f"  (target >= {TARGET_RATIO}x)"
        shown = f"{min(seconds):6.2f} s  {rate:>10,.0f} events/s  {rate / baseline:5.2f}x raw produce"
        print(f"  {name:<24} {shown}{target}")
